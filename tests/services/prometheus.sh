#!/usr/bin/env bash
# tests/services/prometheus.sh install|up|down STATE_DIR
#
# A real Prometheus (Debian's package) on 127.0.0.1, without systemd, that discovers training
# ranks through file_sd: `up` uses STATE_DIR/prometheus.yml if present, else writes one whose
# vitscale job watches STATE_DIR/targets/*.json (1 s scrape and file_sd refresh); checks it with
# promtool, starts the server and waits for /-/ready.
# Port: PROMETHEUS_PORT (default 19090). `down` stops it by its saved PID.
set -euo pipefail

action=${1:?usage: prometheus.sh install|up|down STATE_DIR}
state=${2:-}
port=${PROMETHEUS_PORT:-19090}
[[ $port =~ ^[0-9]+$ ]] || { echo "prometheus.sh: PROMETHEUS_PORT must be a number" >&2; exit 2; }

install() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v amtool >/dev/null && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "prometheus.sh: prometheus missing; run as root or: apt-get install --no-install-recommends prometheus prometheus-alertmanager" >&2
    exit 1
  fi
  apt-get update -q >/dev/null
  # Without --no-install-recommends apt also pulls node-exporter and friends (~45 MB more).
  # prometheus-alertmanager for amtool, which checks docker/alertmanager/alertmanager.yml.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus prometheus-alertmanager >/dev/null
}

http_ok() {
  if command -v curl >/dev/null; then
    curl -sf "$1" >/dev/null 2>&1
  else
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1" >/dev/null 2>&1
  fi
}

up() {
  mkdir -p "$state/data" "$state/targets"
  # A config placed in STATE_DIR beforehand wins (the tests derive one from docker/prometheus/).
  [ -f "$state/prometheus.yml" ] || cat >"$state/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: vitscale
    file_sd_configs:
      - files: ["$state/targets/*.json"]
        refresh_interval: 1s
EOF
  promtool check config "$state/prometheus.yml" >/dev/null
  setsid prometheus --config.file="$state/prometheus.yml" --storage.tsdb.path="$state/data" \
    --web.listen-address="127.0.0.1:$port" --storage.tsdb.retention.time=1h \
    </dev/null >"$state/prometheus.log" 2>&1 &
  echo $! >"$state/prometheus.bgpid"
  for _ in $(seq 300); do
    http_ok "http://127.0.0.1:$port/-/ready" && return 0
    kill -0 "$(cat "$state/prometheus.bgpid")" 2>/dev/null || break
    sleep 0.1
  done
  echo "prometheus.sh: not ready" >&2
  tail -20 "$state/prometheus.log" >&2 || true
  return 1
}

down() {
  local file=$state/prometheus.bgpid pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
}

case "$action" in
  install) install ;;
  up) [ -n "$state" ] || { echo "prometheus.sh up STATE_DIR" >&2; exit 2; }; up ;;
  down) [ -n "$state" ] || { echo "prometheus.sh down STATE_DIR" >&2; exit 2; }; down ;;
  *) echo "usage: prometheus.sh install|up|down STATE_DIR" >&2; exit 2 ;;
esac
