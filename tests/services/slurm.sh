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
set -euo pipefail

action=${1:?usage: slurm.sh install|up|down|env STATE_DIR}
state=${2:-}
ctld_port=${SLURM_CTLD_PORT:-16817}
slurmd_port=${SLURMD_PORT:-16818}
[[ $ctld_port =~ ^[0-9]+$ && $slurmd_port =~ ^[0-9]+$ ]] || { echo "slurm.sh: ports must be numbers" >&2; exit 2; }

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
  local node
  node=$(SLURM_CONF=/dev/null slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
  cat >"$state/etc/slurm.conf" <<EOF
ClusterName=vitscale
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge/munge.socket,cred_expire=10
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
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
NodeName=localhost NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  mkdir -p "$state/etc" "$state/spool/ctld" "$state/spool/d" "$state/log"
  export SLURM_CONF="$state/etc/slurm.conf"
  start_munge
  write_conf
  setsid slurmctld -D -i -f "$SLURM_CONF" </dev/null >"$state/log/slurmctld.out" 2>&1 &
  echo $! >"$state/slurmctld.bgpid"
  for _ in $(seq 100); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.1
  done
  setsid slurmd -D -N localhost -f "$SLURM_CONF" </dev/null >"$state/log/slurmd.out" 2>&1 &
  echo $! >"$state/slurmd.bgpid"
  for _ in $(seq 300); do
    [ "$(sinfo -h -N -o %T 2>/dev/null)" = idle ] && return 0
    sleep 0.1
  done
  echo "slurm.sh: the node never became idle" >&2
  sinfo -N -l >&2 || true
  tail -20 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
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
  if [ -f "$state/slurmctld.bgpid" ] && scontrol ping 2>/dev/null | grep -q 'is UP'; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
      # shellcheck disable=SC2086  # job ids are digits from squeue
      scancel $jobs || true
      for _ in $(seq 150); do
        [ -z "$(squeue -h 2>/dev/null)" ] && break
        sleep 0.2
      done
    fi
    # Anything the job steps left behind on this node, by PID.
    local pids
    pids=$(scontrol listpids 2>/dev/null | awk 'NR > 1 && $1 ~ /^[0-9]+$/ {print $1}' | tr '\n' ' ' || true)
    # shellcheck disable=SC2086
    [ -n "${pids// /}" ] && kill -9 $pids 2>/dev/null || true
  fi
  stop_daemons "$state/slurmd.bgpid" "$state/slurmctld.bgpid" "$state/munged.bgpid"
}

case "$action" in
  install) install ;;
  up) [ -n "$state" ] || { echo "slurm.sh up STATE_DIR" >&2; exit 2; }; up ;;
  down) [ -n "$state" ] || { echo "slurm.sh down STATE_DIR" >&2; exit 2; }; down ;;
  env) echo "SLURM_CONF=$state/etc/slurm.conf" ;;
  *) echo "usage: slurm.sh install|up|down|env STATE_DIR" >&2; exit 2 ;;
esac
