#!/usr/bin/env bash
# Profile edge-router's request path under load: one backend nginx (`return 200`) and wrk on
# core 1, edge-router (one worker) on core 0, exactly as benches/compare.sh sets them up.
#   benches/profile.sh perf      # perf record -e cpu-clock -g for DURATION, then perf report
#   benches/profile.sh cpu       # no profiler: CPU us/request from /proc over DURATION
#   benches/profile.sh instr     # callgrind: edge-router's user-space instructions per request
#                                # (repeatable on a shared machine; runs ~50x slower, so keep
#                                # DURATION short); the profile is left in OUT/callgrind.out.*
# Env: EDGE_ROUTER (target/release/edge-router), DURATION (10s), CONNS (64), OUT (target/profile), PORT_BASE (18180), WORKERS (1),
#   WORKLOAD: http1 (default, wrk) or h2 (HTTP/2 over TLS with a self-signed certificate,
#   h2load -c H2_CONNS (16) -m H2_STREAMS (16), as compare.sh's h2 workload).
set -euo pipefail
MODE=${1:-cpu}
EDGE_ROUTER=${EDGE_ROUTER:-target/release/edge-router}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
WORKERS=${WORKERS:-1}
OUT=${OUT:-target/profile}
PB=${PORT_BASE:-18180}
BACK=$PB; EDGE=$((PB + 3)); ADMIN=$((PB + 13))
WORKLOAD=${WORKLOAD:-http1}
H2_CONNS=${H2_CONNS:-16}
H2_STREAMS=${H2_STREAMS:-16}
case $WORKLOAD in http1|h2) ;; *) echo "WORKLOAD: http1 or h2" >&2; exit 2;; esac
for t in wrk nginx taskset; do command -v $t >/dev/null || { echo "needs $t (apt-get install wrk nginx util-linux)" >&2; exit 2; }; done
mkdir -p "$OUT"
W=$(mktemp -d /tmp/er-profile.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT INT TERM
mkdir -p "$W/b"
. "$(dirname "$0")/setup.sh"
write_backend_conf "$W/b" "$BACK"
write_edge_toml "$W/edge.toml" "$EDGE" "$ADMIN" "$BACK"
SCHEME=http
if [ "$WORKLOAD" = h2 ]; then
  for t in h2load openssl; do command -v $t >/dev/null || { echo "needs $t (apt-get install nghttp2-client openssl)" >&2; exit 2; }; done
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -keyout "$W/key.pem" -out "$W/cert.pem" >/dev/null 2>&1
  sed -i "s|^access_log = false|access_log = false\n[listener.tls]\ncert = \"$W/cert.pem\"\nkey = \"$W/key.pem\"|" "$W/edge.toml"
  SCHEME=https
fi
URL="$SCHEME://127.0.0.1:$EDGE/"
# The load: wrk for HTTP/1.1, h2load for h2; its second argument is the duration.
load() {
  case $WORKLOAD in
    http1) taskset -c 1 wrk -t1 -c"$CONNS" -d"$1" ${2:-} "$URL" ;;
    h2) taskset -c 1 h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D "${1%s}" "$URL" ;;
  esac
}
taskset -c 1 nginx -c "$W/b/nginx.conf" -p "$W/b" 2>/dev/null & PIDS+=($!)
case $MODE in perf|cpu|instr) ;; *) echo "usage: benches/profile.sh cpu|perf|instr" >&2; exit 2;; esac
RUNNER=()
[ "$MODE" = instr ] && RUNNER=(valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out")
rm -f "$OUT"/callgrind.out*
taskset -c 0 "${RUNNER[@]}" "$EDGE_ROUTER" run -c "$W/edge.toml" --workers "$WORKERS" >"$W/edge.log" 2>&1 &
EPID=$!; PIDS+=($EPID)
for _ in $(seq 1 900); do
  curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/readyz" && curl -skf -o /dev/null "$URL" && break
  sleep 0.1
done
curl -skf -o /dev/null "$URL" || { echo "edge-router did not come up"; cat "$W/edge.log"; exit 1; }
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
served() { # load output -> requests served
  case $WORKLOAD in
    http1) awk '/requests in/ {print $1}' ;;
    h2) awk '/^requests:/ {print $8}' ;;
  esac
}
case $MODE in
  perf)
    load 2s >/dev/null
    perf record -e cpu-clock -F 2000 -g -p "$EPID" -o "$OUT/perf.data" -- sleep "${DURATION%s}" 2>/dev/null &
    PP=$!
    load "$DURATION" | grep -E "Requests/sec|Latency|finished in"
    wait $PP || true
    perf report -i "$OUT/perf.data" --no-children --stdio --percent-limit 0.7 -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -60 | tee "$OUT/perf-top.txt"
    ;;
  cpu)
    load 2s >/dev/null
    c0=$(cpu $EPID)
    r=$(load "$DURATION" --latency)
    c1=$(cpu $EPID)
    n=$(echo "$r" | served)
    echo "$r" | grep -E "Requests/sec| 50%| 99%|finished in|^requests:"
    echo "CPU us/req: $(awk -v a=$c0 -v b=$c1 -v n=$n -v hz=$(getconf CLK_TCK) 'BEGIN{printf "%.2f", (b-a)/hz*1e6/n}')  RSS kB: $(awk '/VmHWM/{print $2}' /proc/$EPID/status)"
    ;;
  instr)
    command -v callgrind_control >/dev/null || { echo "needs valgrind" >&2; exit 2; }
    load 2s >/dev/null
    callgrind_control -z "$EPID" >/dev/null
    r=$(load "$DURATION")
    callgrind_control -d "$EPID" >/dev/null
    n=$(echo "$r" | served)
    echo "$r" | grep -E "Requests/sec|finished in|^requests:"
    ir=$(awk '/^summary:/ {print $2}' "$OUT"/callgrind.out.1)
    echo "instructions per request (user space, all threads): $(awk -v i="$ir" -v n="$n" 'BEGIN{printf "%.0f", i/n}')"
    ;;
esac
