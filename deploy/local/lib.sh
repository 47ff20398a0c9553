# shellcheck shell=bash
# Shared by deploy/local/{up,down,start,stop,env}: the loopback topology's state directory,
# ports, and how each component is started and stopped. Sourced, not run.
#
# State directory ($DEPLOY_LOCAL_DIR, default target/deploy-local):
#   ports            name=port for every component (chosen once by `up`)
#   secrets          the JWT secret and API key the nodes share (mode 600)
#   crier.env        the CRIER_* settings every node gets (captured by `up`)
#   broker           redis or memory
#   crier-bin        the crier binary `up` started the nodes with (`start` uses it again)
#   env              shell-sourceable summary for clients and tests (`deploy/local/env`)
#   pids/NAME        the PID of each running component; pids/NAME.exit its exit code
#   NAME.log         its output
# Only PIDs recorded there are ever signalled, and only while /proc/PID/exe is still the
# program that was started (so a recycled PID is never hit).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${DEPLOY_LOCAL_DIR:-$ROOT/target/deploy-local}
COMPONENTS=(redis node1 node2 node3 nginx prometheus)

die() { echo "deploy/local: $*" >&2; exit 1; }
log() { echo "deploy/local: $*" >&2; }

need() { # program...: fails with the install command when one is missing
  local missing=() p
  for p in "$@"; do command -v "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]} == 0)) && return 0
  die "missing ${missing[*]}: apt-get install -y --no-install-recommends redis-server nginx-light prometheus curl python3"
}

export PATH="$PATH:/usr/sbin:/sbin"

port_of() { sed -n "s/^$1=//p" "$STATE/ports"; }
# The three crier nodes as a comma list of addresses (nginx upstreams, Prometheus targets).
node_addrs() { echo "127.0.0.1:$(port_of node1),127.0.0.1:$(port_of node2),127.0.0.1:$(port_of node3)"; }

crier_bin() { # DEPLOY_CRIER_BIN, else the binary `up` used (recorded), else target/{release,debug}
  if [ -n "${DEPLOY_CRIER_BIN:-}" ]; then echo "$DEPLOY_CRIER_BIN"; return; fi
  local t=${CARGO_TARGET_DIR:-$ROOT/target} p
  if [ -f "$STATE/crier-bin" ]; then
    p=$(cat "$STATE/crier-bin")
    [ -x "$p" ] || die "the crier binary deploy/local/up used, $p, is gone: set DEPLOY_CRIER_BIN"
    echo "$p"
    return
  fi
  for p in "$t/release/crier" "$t/debug/crier"; do [ -x "$p" ] && { echo "$p"; return; }; done
  die "no crier binary: run 'cargo build --release -p crier' or set DEPLOY_CRIER_BIN"
}

alive() { # name: is the recorded process still running the program it was started as?
  local f="$STATE/pids/$1" pid exe
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  # A binary replaced on disk (a rebuild) shows as "PATH (deleted)".
  [ "${exe% (deleted)}" = "$(cat "$f.exe")" ]
}

spawn() { # name program args...: starts it in the background, records PID, program and exit code
  local name=$1; shift
  local exe
  exe=$(readlink -f "$(command -v "$1")")
  rm -f "$STATE/pids/$name" "$STATE/pids/$name.exit"
  echo "$exe" > "$STATE/pids/$name.exe"
  # The subshell waits for the program to record its exit status; its stdio is detached so that
  # whoever ran `up` (a test capturing output) is not kept waiting.
  (
    "$@" >>"$STATE/$name.log" 2>&1 </dev/null &
    echo $! > "$STATE/pids/$name.tmp" && mv "$STATE/pids/$name.tmp" "$STATE/pids/$name"
    wait $!
    echo $? > "$STATE/pids/$name.exit"
  ) </dev/null >/dev/null 2>&1 &
  local deadline=$((SECONDS + 5))
  until [ -f "$STATE/pids/$name" ]; do
    ((SECONDS < deadline)) || die "$name: no PID recorded"
    sleep 0.05
  done
}

wait_until() { # name timeout-seconds description command...: polls command until it succeeds
  local name=$1 timeout=$2 what=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then
      log "$name exited (status $(cat "$STATE/pids/$name.exit" 2>/dev/null || echo '?')) before $what; last lines of $STATE/$name.log:"
      tail -n 20 "$STATE/$name.log" >&2 || true
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "$name: no $what within ${timeout}s; last lines of $STATE/$name.log:"
      tail -n 20 "$STATE/$name.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

http_ok() { curl -fsS -o /dev/null --noproxy "*" --max-time 2 "$1"; }

start_redis() {
  local port
  port=$(port_of redis)
  mkdir -p "$STATE/redis"
  spawn redis redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --dir "$STATE/redis" --daemonize no --logfile "" \
    --maxmemory 256mb --maxmemory-policy noeviction
  wait_until redis 10 "PONG on port $port" bash -c "[ \"\$(redis-cli -h 127.0.0.1 -p $port ping)\" = PONG ]"
}

start_node() { # nodeN
  local name=$1 port bin
  port=$(port_of "$name")
  bin=$(crier_bin)
  (
    # Every node gets exactly the CRIER_* settings captured by `up`, plus its address and name.
    for v in $(compgen -e); do [[ $v == CRIER_* ]] && unset "$v"; done
    while IFS= read -r line; do [ -n "$line" ] && export "${line?}"; done < "$STATE/crier.env"
    export CRIER_LISTEN="127.0.0.1:$port" CRIER_NODE_ID="$name"
    if [ "$(cat "$STATE/broker")" = redis ]; then
      CRIER_REDIS_URL="redis://127.0.0.1:$(port_of redis)/0"
      export CRIER_REDIS_URL
    fi
    spawn "$name" "$bin"
  ) || exit 1
  wait_until "$name" 30 "ready on port $port" http_ok "http://127.0.0.1:$port/readyz"
}

start_nginx() {
  local port ups
  port=$(port_of nginx)
  ups=$(node_addrs)
  mkdir -p "$STATE/nginx/tmp"
  python3 "$ROOT/deploy/local/render.py" nginx "$ROOT/deploy/nginx.conf" "$STATE/nginx/nginx.conf" \
    --listen "127.0.0.1:$port" --upstreams "$ups" --prefix "$STATE/nginx"
  local -a args=(-p "$STATE/nginx/" -e "$STATE/nginx/error.log" -c "$STATE/nginx/nginx.conf")
  nginx -t -q "${args[@]}" || die "nginx -t rejected $STATE/nginx/nginx.conf"
  spawn nginx nginx "${args[@]}" -g "daemon off;"
  wait_until nginx 10 "a proxied /healthz on port $port" http_ok "http://127.0.0.1:$port/healthz"
}

start_prometheus() {
  local port targets
  port=$(port_of prometheus)
  targets=$(node_addrs)
  mkdir -p "$STATE/prometheus/data"
  python3 "$ROOT/deploy/local/render.py" prometheus "$ROOT/deploy/prometheus.yml" "$STATE/prometheus/prometheus.yml" \
    --targets "$targets" --rules "$ROOT/deploy/alerts.yml" --interval "${DEPLOY_LOCAL_SCRAPE_INTERVAL:-1s}"
  promtool check config "$STATE/prometheus/prometheus.yml" >/dev/null || die "promtool rejected $STATE/prometheus/prometheus.yml"
  spawn prometheus prometheus --config.file="$STATE/prometheus/prometheus.yml" \
    --storage.tsdb.path="$STATE/prometheus/data" --storage.tsdb.retention.time=1d \
    --web.listen-address="127.0.0.1:$port" --log.level=warn
  wait_until prometheus 20 "/-/ready on port $port" http_ok "http://127.0.0.1:$port/-/ready"
}

start_component() {
  case $1 in
    redis) start_redis ;;
    node[123]) start_node "$1" ;;
    nginx) start_nginx ;;
    prometheus) start_prometheus ;;
    *) die "unknown component '$1' (one of: ${COMPONENTS[*]})" ;;
  esac
}

signal_component() { # name signal
  alive "$1" && kill "-$2" "$(cat "$STATE/pids/$1")" 2>/dev/null || true
}

wait_stopped() { # timeout names...: waits for the named components to exit; KILLs what remains
  local timeout=$1; shift
  local deadline=$((SECONDS + timeout)) n left
  while :; do
    left=()
    for n in "$@"; do alive "$n" && left+=("$n"); done
    ((${#left[@]} == 0)) && break
    if ((SECONDS >= deadline)); then
      log "still running after ${timeout}s, killing: ${left[*]}"
      for n in "${left[@]}"; do signal_component "$n" KILL; done
      sleep 0.2
      break
    fi
    sleep 0.1
  done
}

stop_components() { # names...: SIGTERM (crier drains over shutdown_drain), then waits
  local n
  for n in "$@"; do signal_component "$n" TERM; done
  wait_stopped "${DEPLOY_LOCAL_STOP_TIMEOUT:-40}" "$@"
}

running_components() {
  local n
  for n in "${COMPONENTS[@]}"; do alive "$n" && echo "$n"; done
  return 0
}
