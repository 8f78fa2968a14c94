#!/usr/bin/env bash
# Profile edge-router's request path under load: one backend nginx (`return 200`) and wrk on
# core 1, edge-router (one worker) on core 0, exactly as benches/compare.sh sets them up.
#   benches/profile.sh perf      # perf record -e cpu-clock -g for DURATION, then perf report
#   benches/profile.sh cpu       # no profiler: CPU us/request from /proc over DURATION
# Env: EDGE_ROUTER (target/release/edge-router), DURATION (10s), CONNS (64), OUT (target/profile), PORT_BASE (18180), WORKERS (1).
set -euo pipefail
MODE=${1:-cpu}
EDGE_ROUTER=${EDGE_ROUTER:-target/release/edge-router}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
WORKERS=${WORKERS:-1}
OUT=${OUT:-target/profile}
PB=${PORT_BASE:-18180}
BACK=$PB; EDGE=$((PB + 3)); ADMIN=$((PB + 13))
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
taskset -c 1 nginx -c "$W/b/nginx.conf" -p "$W/b" 2>/dev/null & PIDS+=($!)
case $MODE in perf|cpu) ;; *) echo "usage: benches/profile.sh cpu|perf" >&2; exit 2;; esac
taskset -c 0 "$EDGE_ROUTER" run -c "$W/edge.toml" --workers "$WORKERS" >"$W/edge.log" 2>&1 &
EPID=$!; PIDS+=($EPID)
for _ in $(seq 1 300); do
  curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/readyz" && curl -sf -o /dev/null "http://127.0.0.1:$EDGE/" && break
  sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$EDGE/" || { echo "edge-router did not come up"; cat "$W/edge.log"; exit 1; }
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
case $MODE in
  perf)
    taskset -c 1 wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$EDGE/" >/dev/null
    perf record -e cpu-clock -F 2000 -g -p "$EPID" -o "$OUT/perf.data" -- sleep "${DURATION%s}" 2>/dev/null &
    PP=$!
    taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" "http://127.0.0.1:$EDGE/" | grep -E "Requests/sec|Latency"
    wait $PP || true
    perf report -i "$OUT/perf.data" --no-children --stdio --percent-limit 0.7 -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -60 | tee "$OUT/perf-top.txt"
    ;;
  cpu)
    taskset -c 1 wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$EDGE/" >/dev/null
    c0=$(cpu $EPID)
    r=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$EDGE/")
    c1=$(cpu $EPID)
    n=$(echo "$r" | awk '/requests in/ {print $1}')
    echo "$r" | grep -E "Requests/sec| 50%| 99%"
    echo "CPU us/req: $(awk -v a=$c0 -v b=$c1 -v n=$n -v hz=$(getconf CLK_TCK) 'BEGIN{printf "%.2f", (b-a)/hz*1e6/n}')  RSS kB: $(awk '/VmHWM/{print $2}' /proc/$EPID/status)"
    ;;
esac
