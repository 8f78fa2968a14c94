#!/usr/bin/env bash
# benches/threads.sh: A/B of two edge-router command lines, same binary, same load:
# by default A = `--workers 2` (one multi-thread tokio runtime) and B = `--workers 2
# --thread-per-core` (one current-thread runtime and one SO_REUSEPORT listener per thread).
# Nothing is pinned: edge-router, the backend nginx (`return 200`, as in benches/profile.sh)
# and wrk -t2 share every core, as they would on a small box. Runs are interleaved A B A B ...,
# each with a fresh edge-router process and a warm-up. Per run: req/s, p50/p99, edge-router
# CPU us/request (utime+stime from /proc/PID/stat over the measured run / requests), its
# share of all cores, and how much CPU other processes took ("others", % of all cores). Then the medians and
# the median of the per-round ratios B/A.
# Env: EDGE_ROUTER (target/release/edge-router), ROUNDS (4), DURATION (10s), WARMUP (2s),
#      THREADS (wrk -t, 2), CONNS (wrk -c, 128), A_ARGS, B_ARGS, PORT_BASE (18280),
#      OUT (target/bench-threads: raw wrk output and the table).
# Loopback only. See docs/benchmarks.md, "Thread-per-core".
set -euo pipefail
EDGE_ROUTER=${EDGE_ROUTER:-target/release/edge-router}
ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-128}
A_ARGS=${A_ARGS:---workers 2}
B_ARGS=${B_ARGS:---workers 2 --thread-per-core}
PB=${PORT_BASE:-18280}
OUT=${OUT:-target/bench-threads}
BACK=$PB; EDGE=$((PB + 3)); ADMIN=$((PB + 13))
for t in wrk nginx curl; do command -v $t >/dev/null || { echo "needs $t (apt-get install wrk nginx curl)" >&2; exit 2; }; done
[ -x "$EDGE_ROUTER" ] || { echo "no $EDGE_ROUTER (cargo build --release)" >&2; exit 2; }
mkdir -p "$OUT"
W=$(mktemp -d /tmp/er-threads.XXXXXX)
NGINX=""; EPID=""
cleanup() {
  [ -n "$EPID" ] && kill "$EPID" 2>/dev/null || true
  [ -n "$NGINX" ] && kill "$NGINX" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT INT TERM
mkdir -p "$W/b"
. "$(dirname "$0")/setup.sh"
write_backend_conf "$W/b" "$BACK"
write_edge_toml "$W/edge.toml" "$EDGE" "$ADMIN" "$BACK"
nginx -c "$W/b/nginx.conf" -p "$W/b" 2>/dev/null & NGINX=$!

cpu() { awk '{print $14+$15}' /proc/$1/stat; }
# All CPU time of the machine that was not idle or iowait, in clock ticks.
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
# CPU time of process $1 and its children (our nginx: master and worker), in clock ticks.
cpu_of() { local s=0 p; for p in "$1" $(pgrep -P "$1" || true); do s=$((s + $(cpu "$p" 2>/dev/null || echo 0))); done; echo $s; }
HZ=$(getconf CLK_TCK); NCPU=$(nproc)

start_edge() {
  # shellcheck disable=SC2086
  "$EDGE_ROUTER" run -c "$W/edge.toml" $1 >"$W/edge.log" 2>&1 & EPID=$!
  for _ in $(seq 1 300); do
    curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/readyz" && curl -sf -o /dev/null "http://127.0.0.1:$EDGE/" && return 0
    sleep 0.1
  done
  echo "edge-router ($1) did not come up"; cat "$W/edge.log"; exit 1
}
stop_edge() { kill -TERM "$EPID"; wait "$EPID" || true; EPID=""; }

# One run: prints "req/s p50us p99us edge_cpu_us_per_req edge% others%" where edge% and
# others% are shares of all cores over the measured run; others = every non-idle tick minus
# edge-router, nginx and wrk (wrk's CPU: the cutime of the subshell that waited for it).
one() {
  local name=$1 args=$2 round=$3
  start_edge "$args"
  wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" "http://127.0.0.1:$EDGE/" >/dev/null
  local c0 b0 g0 t0 c1 b1 g1 t1 r n w
  c0=$(cpu "$EPID"); b0=$(busy); g0=$(cpu_of "$NGINX"); t0=$(date +%s.%N)
  r=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$EDGE/" >"$W/wrk.txt"; awk '{print $16+$17}' /proc/$BASHPID/stat)
  c1=$(cpu "$EPID"); b1=$(busy); g1=$(cpu_of "$NGINX"); t1=$(date +%s.%N)
  w=$r; r=$(cat "$W/wrk.txt")
  stop_edge
  echo "$r" >"$OUT/$round-$name.txt"
  n=$(echo "$r" | awk '/requests in/ {print $1}')
  echo "$r" | awk -v n="$n" -v e="$((c1 - c0))" -v b="$((b1 - b0))" -v g="$((g1 - g0))" -v w="$w" -v hz="$HZ" -v ncpu="$NCPU" -v t0="$t0" -v t1="$t1" '
    function us(x) { if (x ~ /us$/) return x+0; if (x ~ /ms$/) return x*1000; if (x ~ /s$/) return x*1e6; return x }
    /Requests\/sec/ {rps=$2}
    / 50%/ {p50=us($2)} / 99%/ {p99=us($2)}
    END { cap=(t1-t0)*hz*ncpu; o=b-e-g-w; if (o<0) o=0
          printf "%.0f %.0f %.0f %.2f %.0f %.1f\n", rps, p50, p99, e/hz*1e6/n, e/cap*100, o/cap*100 }'
}

RES="$OUT/threads-$(date +%Y%m%d-%H%M%S).md"
{
  echo "A = \`$A_ARGS\`, B = \`$B_ARGS\`; wrk -t$THREADS -c$CONNS -d$DURATION (warm-up $WARMUP), $NCPU cores, nothing pinned"
  echo
  echo "| round | variant | req/s | p50 us | p99 us | edge CPU us/req | edge-router CPU | others CPU |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
} | tee "$RES"
RATIOS_RPS=(); RATIOS_CPU=(); ARPS=(); BRPS=(); ACPU=(); BCPU=()
for round in $(seq 1 "$ROUNDS"); do
  read -r ar ap50 ap99 ac ashare aoth < <(one A "$A_ARGS" "$round")
  echo "| $round | A | $ar | $ap50 | $ap99 | $ac | $ashare% | $aoth% |" | tee -a "$RES"
  read -r br bp50 bp99 bc bshare both < <(one B "$B_ARGS" "$round")
  echo "| $round | B | $br | $bp50 | $bp99 | $bc | $bshare% | $both% |" | tee -a "$RES"
  ARPS+=("$ar"); BRPS+=("$br"); ACPU+=("$ac"); BCPU+=("$bc")
  RATIOS_RPS+=("$(awk -v a="$ar" -v b="$br" 'BEGIN{printf "%.3f", b/a}')")
  RATIOS_CPU+=("$(awk -v a="$ac" -v b="$bc" 'BEGIN{printf "%.3f", b/a}')")
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else printf "%.10g\n", (v[NR/2]+v[NR/2+1])/2}'; }
spread() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {printf "%.1f%%", (v[NR]-v[1])/v[1]*100}'; }
{
  echo
  echo "| | A median | B median | median of per-round B/A | A spread (max-min)/min | B spread |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
  echo "| req/s | $(median "${ARPS[@]}") | $(median "${BRPS[@]}") | $(median "${RATIOS_RPS[@]}") | $(spread "${ARPS[@]}") | $(spread "${BRPS[@]}") |"
  echo "| CPU us/req | $(median "${ACPU[@]}") | $(median "${BCPU[@]}") | $(median "${RATIOS_CPU[@]}") | $(spread "${ACPU[@]}") | $(spread "${BCPU[@]}") |"
  echo
  echo "per-round B/A req/s: ${RATIOS_RPS[*]}; CPU/req: ${RATIOS_CPU[*]}"
} | tee -a "$RES"
echo "results: $RES"
