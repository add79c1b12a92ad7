#!/usr/bin/env bash
# tests/services/slurm.sh install|up|down|env STATE_DIR
#
# A real single-node Slurm (Debian's slurmctld + slurmd + munge) on 127.0.0.1, without systemd,
# for the launcher tests. `install` apt-installs the packages when missing (root; about 13 MB);
# `up` writes a slurm.conf from this machine's hardware into STATE_DIR, starts munged, slurmctld
# and slurmd in the background and waits until the node is idle; `down` cancels every job, then
# stops the three daemons by their saved PIDs. `env` prints the SLURM_CONF every client needs.
# Ports: SLURM_CTLD_PORT / SLURMD_PORT (defaults 16817 / 16818; tests pass free ones).
# STATE_DIR must be reachable by the munge user (mode 755 on the path), e.g. from mktemp -d.
#
# Several nodes: SLURM_HOSTS="host0=10.77.0.1:PID host1=10.77.0.2:PID" (name=address[:PID]) gives
# one slurmd per node, each started inside the test host whose PID 1 is PID (tests/services/
# hosts.py: nsenter into its network, hostname, mounts and PIDs); slurmctld and every client
# command run on the first. munged stays here: its socket is a file, seen from every host.
set -euo pipefail

action=${1:?usage: slurm.sh install|up|down|env STATE_DIR}
state=${2:-}
ctld_port=${SLURM_CTLD_PORT:-16817}
slurmd_port=${SLURMD_PORT:-16818}
[[ $ctld_port =~ ^[0-9]+$ && $slurmd_port =~ ^[0-9]+$ ]] || { echo "slurm.sh: ports must be numbers" >&2; exit 2; }
read -r -a hosts <<<"${SLURM_HOSTS:-localhost=127.0.0.1}"
for spec in "${hosts[@]}"; do
  [[ $spec =~ ^[A-Za-z0-9-]+=[0-9.]+(:[0-9]+)?$ ]] || { echo "slurm.sh: SLURM_HOSTS entry '$spec' is not name=address[:pid]" >&2; exit 2; }
done

# Per-node spool, PID and log files when there are several slurmd (%n: the node's name).
per_node=""
if [ "${#hosts[@]}" -gt 1 ]; then per_node=-%n; fi

host_name() { local spec=${1%%:*}; echo "${spec%%=*}"; }
host_address() { local spec=${1%%:*}; echo "${spec#*=}"; }

on_host() {
  # on_host SPEC COMMAND...: COMMAND inside the test host of SPEC (its PID 1 after ':'), else here.
  local spec=$1
  shift
  if [[ $spec == *:* ]]; then
    nsenter --target="${spec##*:}" --net --uts --mount --pid -- "$@"
  else
    "$@"
  fi
}

start_daemon() {
  # start_daemon SPEC NAME COMMAND...: in the background, its own session; saves the daemon's PID
  # as this machine sees it (inside a test host, nsenter's child) for `down`.
  local spec=$1 name=$2 pid child=""
  shift 2
  if [[ $spec == *:* ]]; then
    setsid nsenter --target="${spec##*:}" --net --uts --mount --pid -- "$@" </dev/null >"$state/log/$name.out" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
      child=$(cat "/proc/$pid/task/$pid/children" 2>/dev/null || true)
      [ -n "$child" ] && break
      sleep 0.05
    done
    pid=${child%% *}
  else
    setsid "$@" </dev/null >"$state/log/$name.out" 2>&1 &
    pid=$!
  fi
  echo "$pid" >"$state/$name.bgpid"
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "slurm.sh: slurmctld/slurmd/munge missing; run as root or: apt-get install slurmctld slurmd slurm-client munge" >&2
    exit 1
  fi
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  mkdir -p "$state/munge"
  chown munge:munge "$state/munge"
  chmod 755 "$state/munge"
  if [ ! -s "$state/munge/munge.key" ]; then
    mungekey --create --keyfile="$state/munge/munge.key"
    chown munge:munge "$state/munge/munge.key"
    chmod 400 "$state/munge/munge.key"
  fi
  setsid setpriv --reuid=munge --regid=munge --init-groups \
    munged -F --key-file="$state/munge/munge.key" --socket="$state/munge/munge.socket" \
      --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" \
      --seed-file="$state/munge/munged.seed" </dev/null >"$state/log/munged.out" 2>&1 &
  echo $! >"$state/munged.bgpid"
  for _ in $(seq 100); do
    munge -S "$state/munge/munge.socket" -n 2>/dev/null | unmunge -S "$state/munge/munge.socket" >/dev/null 2>&1 \
      && return 0
    sleep 0.1
  done
  echo "slurm.sh: munged did not start:" >&2
  cat "$state/log/munged.out" "$state/munge/munged.log" >&2 || true
  return 1
}

write_conf() {
  # The node line (CPUs, sockets, cores, memory) from this machine, so the scheduler accepts jobs.
  local node spec nodes="" names="" communication=NoCtldInAddrAny,NoInAddrAny
  node=$(SLURM_CONF=/dev/null slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
  for spec in "${hosts[@]}"; do
    nodes+="NodeName=$(host_name "$spec") NodeAddr=$(host_address "$spec") $node State=UNKNOWN"$'\n'
    names+="${names:+,}$(host_name "$spec")"
  done
  nodes=${nodes%$'\n'}
  # Bound to the address of their hostname (No*InAddrAny), slurmctld and srun would listen on
  # 127.0.1.1 under Debian's /etc/hosts, unreachable from the other hosts; a host's network
  # namespace holds any port to itself.
  if [ "${#hosts[@]}" -gt 1 ]; then communication=""; fi
  cat >"$state/etc/slurm.conf" <<EOF
ClusterName=vitscale
SlurmctldHost=$(host_name "${hosts[0]}")($(host_address "${hosts[0]}"))
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge/munge.socket,cred_expire=10
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d$per_node
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd$per_node.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd$per_node.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
${communication:+CommunicationParameters=$communication}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
JobRequeue=1
$nodes
PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  mkdir -p "$state/etc" "$state/spool/ctld" "$state/log"
  export SLURM_CONF="$state/etc/slurm.conf"
  start_munge
  write_conf
  local spec idle suffix
  start_daemon "${hosts[0]}" slurmctld slurmctld -D -i -f "$SLURM_CONF"
  for _ in $(seq 100); do
    on_host "${hosts[0]}" scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.1
  done
  for spec in "${hosts[@]}"; do
    suffix=${per_node/\%n/$(host_name "$spec")}
    mkdir -p "$state/spool/d$suffix"
    start_daemon "$spec" "slurmd$suffix" slurmd -D -N "$(host_name "$spec")" -f "$SLURM_CONF"
  done
  for _ in $(seq 300); do
    idle=$(on_host "${hosts[0]}" sinfo -h -N -o %T 2>/dev/null | grep -cx idle || true)
    [ "$idle" = "${#hosts[@]}" ] && return 0
    sleep 0.1
  done
  echo "slurm.sh: the nodes never became idle" >&2
  on_host "${hosts[0]}" sinfo -N -l >&2 || true
  tail -20 "$state/log/slurmctld.log" "$state"/log/slurmd*.log >&2 || true
  return 1
}

stop_daemons() {
  # SIGTERM to all at once (each takes ~2 s to save state and exit), then wait; SIGKILL after 10 s.
  local file pid pids=()
  for file in "$@"; do
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$file"
  done
  for _ in $(seq 100); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

down() {
  export SLURM_CONF="$state/etc/slurm.conf"
  # Jobs first, so no slurmstepd or training process outlives slurmd.
  local first=${hosts[0]} spec
  if [ -f "$state/slurmctld.bgpid" ] && on_host "$first" scontrol ping 2>/dev/null | grep -q 'is UP'; then
    local jobs
    jobs=$(on_host "$first" squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
      # shellcheck disable=SC2086  # job ids are digits from squeue
      on_host "$first" scancel $jobs || true
      for _ in $(seq 150); do
        [ -z "$(on_host "$first" squeue -h 2>/dev/null)" ] && break
        sleep 0.2
      done
    fi
    # Anything the job steps left behind on each node, by PID (as that node sees them).
    local pids
    for spec in "${hosts[@]}"; do
      pids=$(on_host "$spec" scontrol listpids 2>/dev/null | awk 'NR > 1 && $1 ~ /^[0-9]+$/ {print $1}' | tr '\n' ' ' || true)
      # shellcheck disable=SC2086
      [ -n "${pids// /}" ] && on_host "$spec" kill -9 $pids 2>/dev/null || true
    done
  fi
  stop_daemons "$state"/slurmd*.bgpid "$state/slurmctld.bgpid" "$state/munged.bgpid"
}

case "$action" in
  install) install ;;
  up) [ -n "$state" ] || { echo "slurm.sh up STATE_DIR" >&2; exit 2; }; up ;;
  down) [ -n "$state" ] || { echo "slurm.sh down STATE_DIR" >&2; exit 2; }; down ;;
  env) echo "SLURM_CONF=$state/etc/slurm.conf" ;;
  *) echo "usage: slurm.sh install|up|down|env STATE_DIR" >&2; exit 2 ;;
esac
