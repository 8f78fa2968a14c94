#!/usr/bin/env bash
# benches/tcp_compare.sh (also `benches/compare.sh --workload tcp`): edge-router's tcp
# listener vs HAProxy `mode tcp` vs nginx `stream`, on one machine, loopback only.
#
# One echo upstream (benches/tools/tcp_load.rs, compiled here with rustc -O), three
# equivalent TCP proxies in front of it, each pinned to the same single core with one
# worker; the load generator (the same tool) and the upstream on the other core. Runs are
# interleaved, A B C A B C ..., and each proxy's figures are the median of the rounds.
# Two workloads per run:
#   bulk: BULK_CONNS threads, each in a loop: new connection, 1 MiB up, half-close, the
#         same 1 MiB back (checked byte for byte), close. Reported: transfers/s, MiB/s one
#         way, the proxy's CPU microseconds per transfer.
#   cps:  CPS_CONNS threads, each in a loop: new connection, 1 byte each way, close.
#         Reported: connections/s and CPU microseconds per connection.
# Also the proxy's peak RSS, and the share of the proxy core that other processes took
# during the run (the noise: this script does not wait for a quiet machine).
# "baseline" is the load generator straight to the upstream, no proxy.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: benches/tcp_compare.sh [options]     (or: benches/compare.sh --workload tcp [options])
  --rounds N          ROUNDS       rounds, each runs every proxy once (default 3)
  --duration S        DURATION     seconds per workload and run (default 5; "5s" works too)
  --bulk-conns N      BULK_CONNS   concurrent 1 MiB transfers (default 8)
  --cps-conns N       CPS_CONNS    concurrent connect/close loops (default 16)
  --edge-router PATH  EDGE_ROUTER  edge-router binary (default target/release/edge-router)
  --proxies "LIST"    PROXIES      subset/order of: nginx haproxy edge-router baseline
                                   edge-router-b (a second edge-router binary, for an A/B
                                   of a change in the same run: EDGE_ROUTER_B=PATH)
  --results FILE      RESULTS      markdown results (default target/bench-compare/tcp-<time>.md)
  --quick                          1 round of 2 s (a smoke test)
Other environment: PROXY_CORE (0), LOAD_CORE (1), PORT_BASE (18180), KEEP_TMP=1.
Needs: nginx with the stream module (Debian: libnginx-mod-stream), haproxy, taskset, rustc.
Exit: 0 done; 2 missing tool or bad arguments; 1 a proxy failed to start or run.
EOF
}

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
BULK_CONNS=${BULK_CONNS:-8}
CPS_CONNS=${CPS_CONNS:-16}
PROXIES=${PROXIES:-nginx haproxy edge-router baseline}
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
PORT_BASE=${PORT_BASE:-18180}
RESULTS=${RESULTS:-}
KEEP_TMP=${KEEP_TMP:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EDGE_ROUTER=${EDGE_ROUTER:-$ROOT/target/release/edge-router}
EDGE_ROUTER_B=${EDGE_ROUTER_B:-}

die2() { echo "tcp_compare.sh: $*" >&2; exit 2; }
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die2 "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) need_arg "$@"; ROUNDS=$2; shift 2 ;;
    --duration) need_arg "$@"; DURATION=$2; shift 2 ;;
    --bulk-conns) need_arg "$@"; BULK_CONNS=$2; shift 2 ;;
    --cps-conns) need_arg "$@"; CPS_CONNS=$2; shift 2 ;;
    --edge-router) need_arg "$@"; EDGE_ROUTER=$2; shift 2 ;;
    --proxies) need_arg "$@"; PROXIES=$2; shift 2 ;;
    --results) need_arg "$@"; RESULTS=$2; shift 2 ;;
    --quick) ROUNDS=1; DURATION=2; shift ;;
    --workload) need_arg "$@"; [ "$2" = tcp ] || die2 "only --workload tcp here"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "tcp_compare.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
DURATION=${DURATION%s}
for v in ROUNDS DURATION BULK_CONNS CPS_CONNS PROXY_CORE LOAD_CORE PORT_BASE; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die2 "$v must be a non-negative integer, got '${!v}'"
done
[ "$ROUNDS" -ge 1 ] && [ "$DURATION" -ge 1 ] && [ "$BULK_CONNS" -ge 1 ] && [ "$CPS_CONNS" -ge 1 ] || die2 "ROUNDS, DURATION, BULK_CONNS and CPS_CONNS must be >= 1"
for p in $PROXIES; do case "$p" in nginx|haproxy|edge-router|edge-router-b|baseline) ;; *) die2 "unknown proxy '$p' in PROXIES" ;; esac; done

missing=()
for t in nginx haproxy taskset rustc; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
[ ${#missing[@]} -eq 0 ] || die2 "missing: ${missing[*]} (Debian: apt-get install nginx libnginx-mod-stream haproxy util-linux; rustc from rustup)"
STREAM_MODULE=""
if ! nginx -V 2>&1 | grep -q -- '--with-stream\( \|$\)'; then
  for m in /usr/lib/nginx/modules/ngx_stream_module.so /usr/share/nginx/modules/ngx_stream_module.so; do
    [ -f "$m" ] && { STREAM_MODULE="load_module $m;"; break; }
  done
  case " $PROXIES " in *" nginx "*)
    [ -n "$STREAM_MODULE" ] || die2 "nginx has no stream module (Debian: apt-get install libnginx-mod-stream)" ;;
  esac
fi
case " $PROXIES " in *" edge-router "*)
  [ -x "$EDGE_ROUTER" ] || die2 "edge-router binary not found at $EDGE_ROUTER (cargo build --release, or --edge-router PATH)" ;;
esac
case " $PROXIES " in *" edge-router-b "*)
  [ -n "$EDGE_ROUTER_B" ] && [ -x "$EDGE_ROUTER_B" ] || die2 "edge-router-b needs EDGE_ROUTER_B=PATH to a binary" ;;
esac
[ "$PROXY_CORE" != "$LOAD_CORE" ] && [ "$PROXY_CORE" -lt "$(nproc)" ] && [ "$LOAD_CORE" -lt "$(nproc)" ] || die2 "need two distinct cores PROXY_CORE=$PROXY_CORE LOAD_CORE=$LOAD_CORE"

PORT_BACKEND=$PORT_BASE
declare -A PORT=( [nginx]=$((PORT_BASE + 1)) [haproxy]=$((PORT_BASE + 2)) [edge-router]=$((PORT_BASE + 3)) [edge-router-b]=$((PORT_BASE + 4)) [baseline]=$PORT_BASE )
declare -A ADMIN=( [edge-router]=$((PORT_BASE + 13)) [edge-router-b]=$((PORT_BASE + 14)) )
declare -A BIN=( [edge-router]=$EDGE_ROUTER [edge-router-b]=$EDGE_ROUTER_B )
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

W=$(mktemp -d "${TMPDIR:-/tmp}/edge-tcp-compare.XXXXXX") || { echo "mktemp failed" >&2; exit 1; }
STARTED=()
declare -A PIDOF=()
cleanup() {
  local rc=$? pid i
  trap - EXIT INT TERM
  for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${STARTED[@]}"; do
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  done
  if [ "$KEEP_TMP" = 1 ]; then echo "kept temp dir: $W" >&2; else rm -rf "$W"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
fail() { echo "tcp_compare.sh: $1" >&2; [ -n "${2:-}" ] && [ -s "$2" ] && tail -n 15 "$2" >&2; exit 1; }

port_busy() { ( exec 3<>"/dev/tcp/127.0.0.1/$1" ) 2>/dev/null; }
for p in $PORT_BACKEND ${PORT[nginx]} ${PORT[haproxy]} ${PORT[edge-router]} ${PORT[edge-router-b]} ${ADMIN[edge-router]} ${ADMIN[edge-router-b]}; do
  port_busy "$p" && die2 "127.0.0.1:$p is already in use (set PORT_BASE)"
done

rustc --edition 2021 -O -o "$W/tcp_load" "$ROOT/benches/tools/tcp_load.rs" 2>"$W/rustc.log" || fail "could not compile benches/tools/tcp_load.rs" "$W/rustc.log"

pids_of() { # name -> the proxy's pids (nginx: master and its workers)
  local pid=${PIDOF[$1]} f line rest
  echo "$pid"
  if [ "$1" = nginx ]; then
    for f in /proc/[0-9]*/stat; do
      IFS= read -r line 2>/dev/null <"$f" || continue
      rest=${line##*) }; set -- $rest
      [ "$2" = "$pid" ] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
  fi
}
cpu_ticks() { local t=0 pid line rest; for pid in "$@"; do IFS= read -r line 2>/dev/null <"/proc/$pid/stat" || continue; rest=${line##*) }; set -- $rest; t=$((t + ${12} + ${13})); done; echo "$t"; }
hwm_kb() { local t=0 pid v; for pid in "$@"; do v=$(awk '$1 == "VmHWM:" {print $2}' "/proc/$pid/status" 2>/dev/null); t=$((t + ${v:-0})); done; echo "$t"; }
core_busy() { awk -v c="cpu$1" '$1 == c { print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat; }
CLK_TCK=$(getconf CLK_TCK)

start() { # name core logfile cmd...
  local name=$1 core=$2 log=$3; shift 3
  taskset -c "$core" "$@" >"$log" 2>&1 &
  PIDOF[$name]=$!; STARTED+=("$!")
}
wait_port() { # name port deadline_s log
  local deadline=$((SECONDS + $3))
  until port_busy "$2"; do
    kill -0 "${PIDOF[$1]}" 2>/dev/null || fail "$1 exited during start-up" "$4"
    [ $SECONDS -ge $deadline ] && fail "$1 did not listen on 127.0.0.1:$2 within $3 s" "$4"
    sleep 0.05
  done
}

mkdir -p "$W/nginx" "$W/haproxy" "$W/edge-router" "$W/edge-router-b" "$W/backend" "$W/runs"
start backend "$LOAD_CORE" "$W/backend/log" "$W/tcp_load" echo "127.0.0.1:$PORT_BACKEND"
wait_port backend "$PORT_BACKEND" 10 "$W/backend/log"

USER_LINE=""; [ "$(id -u)" = 0 ] && USER_LINE="user $(id -un) $(id -gn);"
cat >"$W/nginx/nginx.conf" <<EOF
$STREAM_MODULE
$USER_LINE
worker_processes 1;
daemon off;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log warn;
worker_rlimit_nofile 10000;
events { worker_connections 4096; }
stream {
  upstream echo { server 127.0.0.1:$PORT_BACKEND; }
  server {
    listen 127.0.0.1:${PORT[nginx]} backlog=4096;
    proxy_pass echo;
    # Without it nginx ends the session when the client half-closes (the echo's reply
    # is lost); HAProxy and edge-router keep the other direction open by default.
    proxy_half_close on;
    proxy_connect_timeout 5s;
    proxy_timeout 300s;
  }
}
EOF
cat >"$W/haproxy/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend fe
  bind 127.0.0.1:${PORT[haproxy]}
  default_backend be
backend be
  server s1 127.0.0.1:$PORT_BACKEND check inter 1s
EOF
for e in edge-router edge-router-b; do
cat >"$W/$e/edge.toml" <<EOF
[[listener]]
name = "echo"
address = "127.0.0.1:${PORT[$e]}"
protocol = "tcp"
cluster = "echo"

[admin]
address = "127.0.0.1:${ADMIN[$e]}"

[locality]
region = "local"
zone = "local-a"

[[cluster]]
name = "echo"
[cluster.health_check]
interval = "1s"
timeout = "500ms"
healthy_threshold = 1

[[cluster.endpoint]]
address = "127.0.0.1:$PORT_BACKEND"
region = "local"
zone = "local-a"
EOF
done

start_proxy() {
  case "$1" in
    nginx)
      nginx -t -q -p "$W/nginx/" -e "$W/nginx/error.log" -c "$W/nginx/nginx.conf" 2>"$W/nginx/t.log" || fail "nginx config rejected" "$W/nginx/t.log"
      start nginx "$PROXY_CORE" "$W/nginx/stdout.log" nginx -p "$W/nginx/" -e "$W/nginx/error.log" -c "$W/nginx/nginx.conf"
      wait_port nginx "${PORT[nginx]}" 10 "$W/nginx/error.log" ;;
    haproxy)
      haproxy -c -q -f "$W/haproxy/haproxy.cfg" >"$W/haproxy/t.log" 2>&1 || fail "haproxy config rejected" "$W/haproxy/t.log"
      start haproxy "$PROXY_CORE" "$W/haproxy/stdout.log" haproxy -db -f "$W/haproxy/haproxy.cfg"
      wait_port haproxy "${PORT[haproxy]}" 10 "$W/haproxy/stdout.log" ;;
    edge-router|edge-router-b)
      start "$1" "$PROXY_CORE" "$W/$1/stdout.log" "${BIN[$1]}" run -c "$W/$1/edge.toml" --workers 1
      wait_port "$1" "${PORT[$1]}" 20 "$W/$1/stdout.log"
      local deadline=$((SECONDS + 10)) ok=""
      # Ready means the endpoint has been probed healthy: connections are then routed.
      until [ -n "$ok" ]; do
        ok=$( ( exec 3<>"/dev/tcp/127.0.0.1/${ADMIN[$1]}" && printf 'GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n' >&3 && IFS= read -r -t 2 l <&3 && case "$l" in *" 200 "*) echo y ;; esac ) 2>/dev/null)
        [ $SECONDS -ge $deadline ] && fail "$1 not ready within 10 s" "$W/$1/stdout.log"
        [ -n "$ok" ] || sleep 0.05
      done ;;
    baseline) PIDOF[baseline]=${PIDOF[backend]} ;;
  esac
}
for p in $PROXIES; do start_proxy "$p"; done

# run proxy workload round -> "done seconds errors cpu_ticks others_pct"
run_one() {
  local p=$1 wl=$2 r=$3 out="$W/runs/$1.$2.$3" pids t0 t1 a b c d rc
  pids=$(pids_of "$p")
  t0=$(cpu_ticks $pids); read -r a b < <(core_busy "$PROXY_CORE")
  if [ "$wl" = bulk ]; then
    taskset -c "$LOAD_CORE" "$W/tcp_load" bulk "127.0.0.1:${PORT[$p]}" "$BULK_CONNS" "$DURATION" 1048576 >"$out" 2>&1
  else
    taskset -c "$LOAD_CORE" "$W/tcp_load" cps "127.0.0.1:${PORT[$p]}" "$CPS_CONNS" "$DURATION" >"$out" 2>&1
  fi
  rc=$?
  t1=$(cpu_ticks $pids); read -r c d < <(core_busy "$PROXY_CORE")
  [ $rc = 0 ] || fail "$p $wl run $r failed" "$out"
  local done secs errs
  read -r done errs secs < <(awk '/^done/ {print $2, $4, $6}' "$out")
  [ -n "${done:-}" ] || fail "$p $wl run $r printed no result" "$out"
  # Other processes' share of the proxy core during the run: its busy time minus the
  # proxy's own (for the baseline the proxy core is idle: all of it is others').
  local own=$((t1 - t0)) busy=$((c - a)) total=$((d - b)) others
  [ "$p" = baseline ] && own=0
  others=$(( total > 0 ? 100 * (busy - own) / total : 0 )); [ $others -lt 0 ] && others=0
  echo "$done $secs $errs $own $others"
}

median() { sort -g | awk '{a[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

declare -A ROWS=()
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "tcp_compare: $ROUNDS round(s) of ${DURATION}s per workload; bulk $BULK_CONNS x 1 MiB each way, cps $CPS_CONNS loops; proxies on core $PROXY_CORE, load on core $LOAD_CORE; loadavg $LOAD_BEFORE" >&2
for ((r = 1; r <= ROUNDS; r++)); do
  for p in $PROXIES; do
    for wl in bulk cps; do
      line=$(run_one "$p" "$wl" "$r") || exit 1
      read -r done secs errs own others <<<"$line"
      rate=$(awk -v n="$done" -v s="$secs" 'BEGIN {printf "%.1f", n / s}')
      us=$(awk -v t="$own" -v n="$done" -v k="$CLK_TCK" 'BEGIN {printf "%.1f", (n > 0 ? t * 1e6 / k / n : 0)}')
      ROWS[$p.$wl]+="$rate $us $errs $others"$'\n'
      echo "round $r $p $wl: $rate/s, $us CPU us each, errors $errs, others on the proxy core ${others}%" >&2
    done
  done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

col() { printf '%s' "${ROWS[$1]}" | awk -v k="$2" 'NF {print $k}' | median; }
sumcol() { printf '%s' "${ROWS[$1]}" | awk -v k="$2" 'NF {s += $k} END {print s + 0}'; }
ref_bulk=$(col nginx.bulk 1); ref_cps=$(col nginx.cps 1)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b + 0 > 0) printf "%.2f", a / b; else print "-"}'; }
{
  echo "### TCP proxying ($(date -u '+%Y-%m-%d %H:%M') UTC, \`benches/compare.sh --workload tcp --rounds $ROUNDS --duration ${DURATION}s\`)"
  echo
  echo "Medians of $ROUNDS interleaved rounds; loadavg $LOAD_BEFORE before, $LOAD_AFTER after; \"others\" is the median share of the proxy core other processes used during the runs."
  echo
  echo "| proxy | 1 MiB transfers/s (= MiB/s each way) | CPU us/transfer | vs nginx | conns/s | CPU us/conn | vs nginx | peak RSS KiB | errors | others % (bulk/cps) |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for p in $PROXIES; do
    b=$(col "$p.bulk" 1); c=$(col "$p.cps" 1)
    hwm=$([ "$p" = baseline ] && echo "-" || hwm_kb $(pids_of "$p"))
    echo "| $p | $b | $(col "$p.bulk" 2) | $(ratio "$b" "$ref_bulk") | $c | $(col "$p.cps" 2) | $(ratio "$c" "$ref_cps") | $hwm | $(( $(sumcol "$p.bulk" 3) + $(sumcol "$p.cps" 3) )) | $(col "$p.bulk" 4)/$(col "$p.cps" 4) |"
  done
} >"$W/results.md"
cat "$W/results.md"
if [ -z "$RESULTS" ]; then mkdir -p "$ROOT/target/bench-compare"; RESULTS="$ROOT/target/bench-compare/tcp-$(date -u +%Y%m%d-%H%M%S).md"; fi
cp "$W/results.md" "$RESULTS" && echo "results: $RESULTS" >&2
