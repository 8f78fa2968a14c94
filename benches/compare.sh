#!/usr/bin/env bash
# benches/compare.sh: edge-router vs nginx vs HAProxy, side by side, on one machine.
#
# One fixed backend (nginx `return 200 "ok"`), three equivalent keep-alive reverse
# proxies in front of it, every proxy pinned to the same single core with one worker,
# wrk on the other core, runs interleaved A B C A B C ... Per proxy: median req/s,
# p50/p99 latency, CPU microseconds per request (the proxy's own utime+stime from
# /proc divided by requests served), peak RSS, and ratios to nginx.
# Workloads (--workload): plain HTTP/1.1 keep-alive (default); access-log (the same with
# each proxy's buffered access log on); https (HTTP/1.1 keep-alive over TLS); handshake
# (a new TLS connection per request); h2c and h2 (HTTP/2 cleartext / over TLS, h2load).
# TCP mode (--workload tcp): benches/tcp_compare.sh, edge-router's tcp listener vs HAProxy
# `mode tcp` vs nginx `stream` (1 MiB transfers/s, connections/s); its own options.
# Second mode (--idle-conns N): RSS of each proxy idle and with N idle keep-alive
# connections held open.
#
# Everything listens on 127.0.0.1 only. Nothing is installed. See docs/benchmarks.md.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: benches/compare.sh [options]

Throughput mode (default) options; each also readable from the environment:
  --rounds N          ROUNDS      rounds, each runs every proxy once (default 5)
  --duration D        DURATION    wrk duration per run, wrk syntax (default 10s)
  --conns N           CONNS       wrk connections (default 64; wrk uses -t1)
  --warmup D          WARMUP      warm-up per proxy before round 1 (default 3s)
  --edge-router PATH  EDGE_ROUTER edge-router binary (default target/release/edge-router)
  --skip-edge         SKIP_EDGE=1 leave edge-router out (e.g. before it is built)
  --plain             FORWARD_HEADERS=0: nginx/HAProxy do not add the forwarding
                      headers edge-router always adds (default: they do, equal work)
  --proxies "LIST"    PROXIES     subset/order of: nginx haproxy edge-router baseline
                                  edge-router-hyper (edge-router with
                                  listener.http1_engine = "hyper": the A/B of its own
                                  HTTP/1.1 engine, in the same run)
  --results FILE      RESULTS     markdown results file (default
                                  target/bench-compare/compare-<time>.md)
  --workload W        WORKLOAD    plain (default): HTTP/1.1 keep-alive, wrk;
                                  access-log: plain with access logs on (nginx
                                    `access_log ... buffer=64k flush=1s`, HAProxy
                                    `option httplog` to its stdout, edge-router
                                    `access_log_path`), each written to a file;
                                  https: HTTP/1.1 keep-alive over TLS (wrk https://);
                                  handshake: a new TLS connection per request (wrk
                                    with `Connection: close`; wrk does not resume
                                    sessions, so each is a full handshake);
                                  h2c: HTTP/2 prior knowledge, h2load -c H2_CONNS -m
                                    H2_STREAMS; h2: HTTP/2 over TLS (ALPN), h2load
                                  TLS: one self-signed P-256 certificate (openssl).
                                  tcp: layer 4, run by benches/tcp_compare.sh (its
                                    options: benches/tcp_compare.sh --help)
                                  No baseline row except for plain and access-log.
  --quick                         1 round, 3s runs, 1s warm-up (a smoke test)
Idle-connection mode:
  --idle-conns N                  hold N idle keep-alive connections (one HTTP/1.1
                                  request each) to each proxy, report RSS idle and held;
                                  with --workload https the connections are TLS
Other environment: HOLD_WAIT (idle mode: seconds to open the connections; default 120,
  240 over TLS), H2_CONNS (default 16), H2_STREAMS (default 16), PROXY_CORE (default 0), LOAD_CORE (default 1), PORT_BASE (18080),
  KEEP_TMP=1 keeps the private temp dir (configs, logs, raw wrk output).
  Noise guard: before each run wait up to QUIET_WAIT s (default 180) until other
  processes use at most QUIET_PCT % (default 10) of either core; rerun a run up to
  RETRIES times (default 2) when others took more than QUIET_PCT % of the proxy core.

Needs: wrk nginx haproxy taskset (+ python3 for --idle-conns; openssl and curl for the
  TLS workloads; h2load for h2c and h2).
  Debian/Ubuntu: apt-get install wrk nginx haproxy util-linux python3 openssl curl nghttp2-client
Exit: 0 done; 2 missing tool or bad arguments; 1 a proxy failed to start or run.
EOF
}

# ---------------------------------------------------------------- arguments
# The TCP workload has its own script (other proxies' configs, its own load tool).
prev=""
for a in "$@"; do
  if [ "$prev" = --workload ] && [ "$a" = tcp ]; then WORKLOAD=tcp; fi
  prev=$a
done
if [ "${WORKLOAD:-}" = tcp ]; then
  exec "$(dirname "${BASH_SOURCE[0]}")/tcp_compare.sh" "$@"
fi
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
WARMUP=${WARMUP:-3s}
SKIP_EDGE=${SKIP_EDGE:-0}
FORWARD_HEADERS=${FORWARD_HEADERS:-1}
PROXIES=${PROXIES:-nginx haproxy edge-router baseline}
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
PORT_BASE=${PORT_BASE:-18080}
IDLE_CONNS=${IDLE_CONNS:-0}
RESULTS=${RESULTS:-}
KEEP_TMP=${KEEP_TMP:-0}
QUIET_PCT=${QUIET_PCT:-10}
QUIET_WAIT=${QUIET_WAIT:-180}
RETRIES=${RETRIES:-2}
WORKLOAD=${WORKLOAD:-plain}
H2_CONNS=${H2_CONNS:-16}
H2_STREAMS=${H2_STREAMS:-16}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EDGE_ROUTER=${EDGE_ROUTER:-$ROOT/target/release/edge-router}

die2() { echo "compare.sh: $*" >&2; exit 2; }
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die2 "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) need_arg "$@"; ROUNDS=$2; shift 2 ;;
    --duration) need_arg "$@"; DURATION=$2; shift 2 ;;
    --conns) need_arg "$@"; CONNS=$2; shift 2 ;;
    --warmup) need_arg "$@"; WARMUP=$2; shift 2 ;;
    --edge-router) need_arg "$@"; EDGE_ROUTER=$2; shift 2 ;;
    --skip-edge) SKIP_EDGE=1; shift ;;
    --plain) FORWARD_HEADERS=0; shift ;;
    --proxies) need_arg "$@"; PROXIES=$2; shift 2 ;;
    --results) need_arg "$@"; RESULTS=$2; shift 2 ;;
    --idle-conns) need_arg "$@"; IDLE_CONNS=$2; shift 2 ;;
    --workload) need_arg "$@"; WORKLOAD=$2; shift 2 ;;
    --quick) ROUNDS=1; DURATION=3s; WARMUP=1s; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "compare.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$WORKLOAD" in plain|access-log|https|handshake|h2c|h2) ;; *) die2 "unknown workload '$WORKLOAD' (plain, access-log, https, handshake, h2c, h2)" ;; esac
TLS=0; case "$WORKLOAD" in https|handshake|h2) TLS=1 ;; esac
# Idle mode: how long opening the connections may take (a TLS handshake each: longer).
HOLD_WAIT=${HOLD_WAIT:-$((120 * (1 + TLS)))}
H2=0; case "$WORKLOAD" in h2c|h2) H2=1 ;; esac
for v in HOLD_WAIT H2_CONNS H2_STREAMS ROUNDS CONNS IDLE_CONNS PROXY_CORE LOAD_CORE PORT_BASE QUIET_PCT QUIET_WAIT RETRIES; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die2 "$v must be a non-negative integer, got '${!v}'"
done
[ "$ROUNDS" -ge 1 ] || die2 "ROUNDS must be >= 1"
[ "$CONNS" -ge 1 ] || die2 "CONNS must be >= 1"
[[ $DURATION =~ ^[0-9]+[smh]?$ ]] || die2 "DURATION must look like 10s, got '$DURATION'"
[[ $WARMUP =~ ^[0-9]+[smh]?$ ]] || die2 "WARMUP must look like 3s, got '$WARMUP'"
for p in $PROXIES; do
  case "$p" in nginx|haproxy|edge-router|edge-router-hyper|baseline) ;; *) die2 "unknown proxy '$p' in PROXIES" ;; esac
done
if [ "$SKIP_EDGE" = 1 ]; then
  PROXIES=$(for p in $PROXIES; do case "$p" in edge-router*) ;; *) printf '%s ' "$p" ;; esac; done)
fi
MODE=throughput; [ "$IDLE_CONNS" -gt 0 ] && MODE=idle
if [ "$MODE" = idle ] || { [ "$WORKLOAD" != plain ] && [ "$WORKLOAD" != access-log ]; }; then PROXIES=$(for p in $PROXIES; do [ "$p" = baseline ] || printf '%s ' "$p"; done); fi
[ -n "${PROXIES// /}" ] || die2 "nothing to measure (PROXIES is empty)"

# ---------------------------------------------------------------- prerequisites
missing=() pkgs=()
for t in wrk nginx haproxy taskset; do
  if ! command -v "$t" >/dev/null 2>&1; then
    missing+=("$t")
    case "$t" in taskset) pkgs+=(util-linux) ;; *) pkgs+=("$t") ;; esac
  fi
done
if [ "$MODE" = idle ] && ! command -v python3 >/dev/null 2>&1; then missing+=(python3); pkgs+=(python3); fi
if [ "$TLS" = 1 ]; then
  for t in openssl curl; do command -v "$t" >/dev/null 2>&1 || { missing+=("$t"); pkgs+=("$t"); }; done
fi
if [ "$H2" = 1 ]; then
  command -v h2load >/dev/null 2>&1 || { missing+=(h2load); pkgs+=(nghttp2-client); }
  command -v curl >/dev/null 2>&1 || { missing+=(curl); pkgs+=(curl); }
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "compare.sh: missing: ${missing[*]}" >&2
  echo "  install them first (nothing is installed for you):" >&2
  echo "    apt-get install ${pkgs[*]}      # full set: apt-get install wrk nginx haproxy util-linux python3" >&2
  exit 2
fi
NCPU=$(nproc)
if [ "$PROXY_CORE" -ge "$NCPU" ] || [ "$LOAD_CORE" -ge "$NCPU" ] || [ "$PROXY_CORE" = "$LOAD_CORE" ]; then
  die2 "need two distinct cores PROXY_CORE=$PROXY_CORE LOAD_CORE=$LOAD_CORE (this machine has $NCPU)"
fi
EDGE_ON=0
case " $PROXIES " in *" edge-router "*|*" edge-router-hyper "*) EDGE_ON=1 ;; esac
if [ "$EDGE_ON" = 1 ] && [ ! -x "$EDGE_ROUTER" ]; then
  die2 "edge-router binary not found at $EDGE_ROUTER: build it (cargo build --release), point EDGE_ROUTER at it, or pass --skip-edge / SKIP_EDGE=1"
fi
[ "$EDGE_ON" = 1 ] || echo "note: edge-router is not measured in this run (SKIP_EDGE=1 or not in PROXIES)"

PORT_BACKEND=$PORT_BASE
declare -A PORT=( [nginx]=$((PORT_BASE + 1)) [haproxy]=$((PORT_BASE + 2)) [edge-router]=$((PORT_BASE + 3)) [edge-router-hyper]=$((PORT_BASE + 4)) [baseline]=$PORT_BASE )
PORT_EDGE_ADMIN=$((PORT_BASE + 13))
PORT_EDGE_HYPER_ADMIN=$((PORT_BASE + 14))
CLK_TCK=$(getconf CLK_TCK)
# Is irq/softirq time kept out of the tasks' utime+stime (then not in "CPU us/req")?
IRQ_SEPARATE=0
if [ -r /proc/config.gz ] && zcat /proc/config.gz 2>/dev/null | grep -q '^CONFIG_IRQ_TIME_ACCOUNTING=y'; then IRQ_SEPARATE=1; fi

# ---------------------------------------------------------------- private temp dir and cleanup
W=$(mktemp -d "${TMPDIR:-/tmp}/edge-compare.XXXXXX") || { echo "compare.sh: mktemp failed" >&2; exit 1; }
STARTED=()          # pids of every long-running process this script started
declare -A PIDOF=() # name -> pid of the process we started (nginx: its master)
cleanup() {
  local rc=$? pid i
  trap - EXIT INT TERM
  for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${STARTED[@]}"; do
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ "$KEEP_TMP" = 1 ]; then echo "kept temp dir: $W" >&2; else rm -rf "$W"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() { # message [logfile]: print, show the log tail, exit 1
  echo "compare.sh: $1" >&2
  if [ -n "${2:-}" ] && [ -s "$2" ]; then echo "--- last lines of $2:" >&2; tail -n 15 "$2" >&2; fi
  exit 1
}

# ---------------------------------------------------------------- /proc helpers
http_status() { # port path -> HTTP status code on stdout (empty if none)
  ( exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 0
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3
    IFS= read -r -t 2 line <&3 || exit 0
    set -- ${line%$'\r'}; echo "${2:-}" ) 2>/dev/null
}
port_busy() { ( exec 3<>"/dev/tcp/127.0.0.1/$1" ) 2>/dev/null; }
pids_of() { # name -> every pid that belongs to that proxy (nginx: master + workers)
  local pid=${PIDOF[$1]} f line rest
  echo "$pid"
  case "$1" in nginx|baseline|backend)
    for f in /proc/[0-9]*/stat; do
      IFS= read -r line 2>/dev/null <"$f" || continue
      rest=${line##*) }; set -- $rest
      [ "$2" = "$pid" ] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done ;;
  esac
}
cpu_ticks() { # pids... -> sum of utime+stime (clock ticks)
  local t=0 pid line rest
  for pid in "$@"; do
    IFS= read -r line 2>/dev/null <"/proc/$pid/stat" || continue
    rest=${line##*) }; set -- $rest
    # after "pid (comm) ": $1 state ... $12 utime $13 stime
    t=$((t + ${12} + ${13}))
  done
  echo "$t"
}
status_kb() { # field pids... -> sum of that /proc/PID/status field in kB
  local field=$1 t=0 pid v; shift
  for pid in "$@"; do
    v=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$pid/status" 2>/dev/null)
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
pss_kb() { # pids... -> sum of Pss (shared pages split between sharers) in kB
  local t=0 pid v
  for pid in "$@"; do
    v=$(awk '$1 == "Pss:" {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null)
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
core_ticks() { # core -> "busy total task irq" jiffies from /proc/stat
  # fields: user nice system idle iowait irq softirq steal (guest time is already in user)
  awk -v c="cpu$1" '$1 == c { print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9, $2+$3+$4, $7+$8 }' /proc/stat
}
affinity_summary() { # pid -> "N threads, cpus: LIST"
  local pid=$1 lists
  lists=$(for t in /proc/"$pid"/task/*; do awk '/^Cpus_allowed_list/ {print $2}' "$t/status" 2>/dev/null; done | sort -u | paste -sd' ')
  echo "$(ls /proc/"$pid"/task | wc -l) threads on cpu(s) $lists"
}

# ---------------------------------------------------------------- configs
NOFILE_HARD=$(ulimit -Hn)
[ "$NOFILE_HARD" = unlimited ] && NOFILE_HARD=1048576
ulimit -n "$NOFILE_HARD" 2>/dev/null || true
if [ "$MODE" = idle ]; then
  MAXCONN=$((IDLE_CONNS + 1024))
  [ $((IDLE_CONNS + 200)) -le "$(ulimit -n)" ] || die2 "--idle-conns $IDLE_CONNS needs an open-file limit above $((IDLE_CONNS + 200)); ulimit -Hn is $NOFILE_HARD"
else
  MAXCONN=4096
fi
NGINX_USER="" LIMIT_NOTE=""
[ "$(id -u)" = 0 ] && NGINX_USER="user $(id -un) $(id -gn);"

nginx_common() { # dir: the lines every nginx here shares
  cat <<EOF
$NGINX_USER
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_rlimit_nofile $((MAXCONN + 256));
events { worker_connections $MAXCONN; }
EOF
}
nginx_http_common() {
  cat <<EOF
  access_log off;
  default_type text/plain;
  client_body_temp_path $1/client_body; proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi; uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;
  keepalive_requests 1000000000;
  keepalive_timeout 300s;
EOF
}

mkdir -p "$W/backend" "$W/nginx" "$W/haproxy" "$W/edge-router" "$W/edge-router-hyper" "$W/runs"

# ---------------------------------------------------------------- workload: TLS, HTTP/2, access logs
SCHEME=http
NGINX_LISTEN="listen 127.0.0.1:${PORT[nginx]} backlog=4096;"
HAPROXY_BIND="bind 127.0.0.1:${PORT[haproxy]}"
NGINX_LOG="" HAPROXY_LOG_GLOBAL="" HAPROXY_LOG="" EDGE_LISTENER="access_log = false"
if [ "$TLS" = 1 ]; then
  mkdir -p "$W/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -keyout "$W/tls/key.pem" -out "$W/tls/cert.pem" >"$W/tls/openssl.log" 2>&1 || fail "openssl could not make a certificate" "$W/tls/openssl.log"
  cat "$W/tls/cert.pem" "$W/tls/key.pem" >"$W/tls/both.pem"
  SCHEME=https
  alpn=http/1.1; nginx_h2=""
  [ "$WORKLOAD" = h2 ] && { alpn=h2,http/1.1; nginx_h2=" http2"; }
  NGINX_LISTEN="listen 127.0.0.1:${PORT[nginx]} ssl$nginx_h2 backlog=4096;
    ssl_certificate $W/tls/cert.pem; ssl_certificate_key $W/tls/key.pem;"
  HAPROXY_BIND="bind 127.0.0.1:${PORT[haproxy]} ssl crt $W/tls/both.pem alpn $alpn"
  EDGE_LISTENER="access_log = false

[listener.tls]
cert = \"$W/tls/cert.pem\"
key = \"$W/tls/key.pem\""
elif [ "$WORKLOAD" = h2c ]; then
  NGINX_LISTEN="listen 127.0.0.1:${PORT[nginx]} http2 backlog=4096;"
  HAPROXY_BIND="bind 127.0.0.1:${PORT[haproxy]} proto h2"
elif [ "$WORKLOAD" = access-log ]; then
  # Each proxy's usual buffered (or cheapest) access log, to a file on the same disk.
  NGINX_LOG="access_log $W/nginx/access.log combined buffer=64k flush=1s;"
  HAPROXY_LOG_GLOBAL="log stdout format raw local0"
  HAPROXY_LOG="log global
  option httplog"
  EDGE_LISTENER="access_log = true
access_log_path = \"$W/edge-router/access.log\""
fi
{ nginx_common "$W/backend"; cat <<EOF
http {
$(nginx_http_common "$W/backend")
  server {
    listen 127.0.0.1:$PORT_BACKEND backlog=4096;
    location = /healthz { return 200 "ok"; }
    location / { return 200 "ok"; }
  }
}
EOF
} >"$W/backend/nginx.conf"

if [ "$FORWARD_HEADERS" = 1 ]; then
  NGINX_FWD='proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Request-Id $request_id;
      add_header X-Request-Id $request_id always;'
  HAPROXY_FWD='option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  unique-id-format %[uuid()]
  unique-id-header X-Request-Id
  http-after-response set-header X-Request-Id %[unique-id]'
else
  NGINX_FWD='' HAPROXY_FWD=''
fi
{ nginx_common "$W/nginx"; cat <<EOF
http {
$(nginx_http_common "$W/nginx")
  upstream backend {
    server 127.0.0.1:$PORT_BACKEND;
    keepalive 64;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
  }
  server {
    $NGINX_LISTEN
    location / {
      $NGINX_LOG
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      $NGINX_FWD
    }
  }
}
EOF
} >"$W/nginx/nginx.conf"

# HAProxy wants 2 fds per allowed connection (client + server side) and by default refuses
# to start when it cannot raise the fd limit that far; idle connections need only one.
HAPROXY_LIMITS=""
if [ $((2 * MAXCONN + 100)) -gt "$(ulimit -n)" ]; then
  HAPROXY_LIMITS="no strict-limits"
  LIMIT_NOTE="HAProxy ran with 'no strict-limits': fd limit $(ulimit -n) < 2 x maxconn $MAXCONN (it warns and runs; idle connections need one fd each)"
fi
cat >"$W/haproxy/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn $MAXCONN
  $HAPROXY_LIMITS
  $HAPROXY_LOG_GLOBAL
defaults
  mode http
  $HAPROXY_LOG
  option http-keep-alive
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
  http-reuse always
frontend fe
  $HAPROXY_BIND
  $HAPROXY_FWD
  default_backend be
backend be
  option httpchk GET /healthz
  server s1 127.0.0.1:$PORT_BACKEND check inter 1s
EOF

cat >"$W/edge-router/edge.toml" <<EOF
[listener]
address = "127.0.0.1:${PORT[edge-router]}"
# Idle keep-alive connections close after 300 s, as nginx's keepalive_timeout and HAProxy's
# timeout http-keep-alive above.
idle_timeout = "300s"
$EDGE_LISTENER

[admin]
address = "127.0.0.1:$PORT_EDGE_ADMIN"

[locality]
region = "local"
zone = "local-a"

[[cluster]]
name = "backend"

[cluster.health_check]
path = "/healthz"
interval = "1s"
timeout = "500ms"
healthy_threshold = 1
unhealthy_threshold = 2

[[cluster.endpoint]]
address = "127.0.0.1:$PORT_BACKEND"
region = "local"
zone = "local-a"

[[route]]
path_prefix = "/"
cluster = "backend"
EOF
# The same router with every connection through hyper (the engine before src/h1).
sed -e "s/^address = \"127.0.0.1:${PORT[edge-router]}\"/address = \"127.0.0.1:${PORT[edge-router-hyper]}\"\nhttp1_engine = \"hyper\"/" \
    -e "s/^address = \"127.0.0.1:$PORT_EDGE_ADMIN\"/address = \"127.0.0.1:$PORT_EDGE_HYPER_ADMIN\"/" \
    "$W/edge-router/edge.toml" >"$W/edge-router-hyper/edge.toml"

# ---------------------------------------------------------------- start / wait
start() { # name core logfile cmd... : start pinned, in the background, remember the pid
  local name=$1 core=$2 log=$3; shift 3
  taskset -c "$core" "$@" >"$log" 2>&1 &
  PIDOF[$name]=$!
  STARTED+=("$!")
}
probe_status() { # port path -> HTTP status of a request the workload's way
  case "$WORKLOAD" in
    https|handshake) curl -sk -o /dev/null -m 2 -w '%{http_code}' "https://127.0.0.1:$1$2" 2>/dev/null ;;
    h2) curl -sk --http2 -o /dev/null -m 2 -w '%{http_code}' "https://127.0.0.1:$1$2" 2>/dev/null ;;
    h2c) curl -s --http2-prior-knowledge -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$1$2" 2>/dev/null ;;
    *) http_status "$1" "$2" ;;
  esac
}
wait_ready() { # name port path deadline_s logfile: poll until 200, no fixed sleeps
  local name=$1 port=$2 path=$3 deadline=$((SECONDS + $4)) log=$5 code
  while :; do
    kill -0 "${PIDOF[$name]}" 2>/dev/null || fail "$name exited during start-up" "$log"
    if [ "$name" = backend ]; then code=$(http_status "$port" "$path"); else code=$(probe_status "$port" "$path"); fi
    [ "$code" = 200 ] && return 0
    [ $SECONDS -ge $deadline ] && fail "$name did not answer 200 on 127.0.0.1:$port$path within $4s (last: '${code:-no answer}')" "$log"
    sleep 0.05
  done
}

ports_needed="$PORT_BACKEND"
for p in $PROXIES; do [ "$p" = baseline ] || ports_needed+=" ${PORT[$p]}"; done
[ "$EDGE_ON" = 1 ] && ports_needed+=" $PORT_EDGE_ADMIN"
for port in $ports_needed; do
  port_busy "$port" && die2 "127.0.0.1:$port is already in use (set PORT_BASE to move all ports)"
done

nginx -t -q -p "$W/backend/" -e "$W/backend/error.log" -c "$W/backend/nginx.conf" 2>"$W/backend/t.log" || fail "backend nginx config rejected" "$W/backend/t.log"
start backend "$LOAD_CORE" "$W/backend/stdout.log" nginx -p "$W/backend/" -e "$W/backend/error.log" -c "$W/backend/nginx.conf"
PIDOF[baseline]=${PIDOF[backend]}
wait_ready backend "$PORT_BACKEND" /healthz 10 "$W/backend/error.log"

start_proxy() {
  case "$1" in
    nginx)
      nginx -t -q -p "$W/nginx/" -e "$W/nginx/error.log" -c "$W/nginx/nginx.conf" 2>"$W/nginx/t.log" || fail "nginx config rejected" "$W/nginx/t.log"
      start nginx "$PROXY_CORE" "$W/nginx/stdout.log" nginx -p "$W/nginx/" -e "$W/nginx/error.log" -c "$W/nginx/nginx.conf"
      wait_ready nginx "${PORT[nginx]}" / 10 "$W/nginx/error.log" ;;
    haproxy)
      haproxy -c -q -f "$W/haproxy/haproxy.cfg" >"$W/haproxy/t.log" 2>&1 || fail "haproxy config rejected" "$W/haproxy/t.log"
      start haproxy "$PROXY_CORE" "$W/haproxy/stdout.log" haproxy -db -f "$W/haproxy/haproxy.cfg"
      wait_ready haproxy "${PORT[haproxy]}" / 10 "$W/haproxy/stdout.log" ;;
    edge-router|edge-router-hyper)
      local admin=$PORT_EDGE_ADMIN
      [ "$1" = edge-router-hyper ] && admin=$PORT_EDGE_HYPER_ADMIN
      start "$1" "$PROXY_CORE" "$W/$1/stdout.log" "$EDGE_ROUTER" run -c "$W/$1/edge.toml" --workers 1
      wait_ready "$1" "${PORT[$1]}" / 20 "$W/$1/stdout.log"
      local deadline=$((SECONDS + 10))
      until [ "$(http_status "$admin" /readyz)" = 200 ]; do
        [ $SECONDS -ge $deadline ] && { echo "warning: edge-router /readyz is not 200 after 10s; measuring anyway" >&2; break; }
        sleep 0.05
      done ;;
  esac
}

wait_quiet() { # wait until the two cores are (nearly) idle; our proxies are idle now
  local deadline=$((SECONDS + QUIET_WAIT)) said=0 a0 a1 b0 b1 c0 c1 d0 d1 pa pb
  while :; do
    read -r a0 a1 _ < <(core_ticks "$PROXY_CORE"); read -r b0 b1 _ < <(core_ticks "$LOAD_CORE")
    sleep 0.5
    read -r c0 c1 _ < <(core_ticks "$PROXY_CORE"); read -r d0 d1 _ < <(core_ticks "$LOAD_CORE")
    pa=$(( (c1 - a1) > 0 ? 100 * (c0 - a0) / (c1 - a1) : 0 )); pb=$(( (d1 - b1) > 0 ? 100 * (d0 - b0) / (d1 - b1) : 0 ))
    [ "$pa" -le "$QUIET_PCT" ] && [ "$pb" -le "$QUIET_PCT" ] && return 0
    if [ $SECONDS -ge $deadline ]; then
      echo "warning: machine still busy (core$PROXY_CORE ${pa}%, core$LOAD_CORE ${pb}%) after ${QUIET_WAIT}s; measuring anyway" >&2
      return 1
    fi
    [ $said = 1 ] || { echo "waiting for quiet cores (core$PROXY_CORE ${pa}%, core$LOAD_CORE ${pb}% busy from other processes)..." >&2; said=1; }
  done
}

forget() { # pid: it has been reaped; drop it so cleanup never signals a reused pid
  local keep=() x
  for x in "${STARTED[@]}"; do [ "$x" = "$1" ] || keep+=("$x"); done
  STARTED=("${keep[@]}")
}
run_wrk() { # port duration outfile; in the background so a signal stops us at once
  local wp rc
  taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"$2" --timeout 5s --latency "http://127.0.0.1:$1/" >"$3" 2>&1 &
  wp=$!; STARTED+=("$wp")
  wait "$wp"; rc=$?
  forget "$wp"
  return $rc
}
run_load() { # port duration outfile: the workload's load generator on the load core
  local wp rc url="$SCHEME://127.0.0.1:$1/"
  case "$WORKLOAD" in
    h2c|h2) taskset -c "$LOAD_CORE" h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D "$(dur_s "$2")" "$url" >"$3" 2>&1 & ;;
    handshake) taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"$2" --timeout 5s --latency -H "Connection: close" "$url" >"$3" 2>&1 & ;;
    *) taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"$2" --timeout 5s --latency "$url" >"$3" 2>&1 & ;;
  esac
  wp=$!; STARTED+=("$wp")
  wait "$wp"; rc=$?
  forget "$wp"
  return $rc
}
dur_s() { # wrk duration (10s, 2m, 1h, 10) -> seconds
  local v=${1%[smh]}
  case "$1" in *m) echo $((v * 60)) ;; *h) echo $((v * 3600)) ;; *) echo "$v" ;; esac
}
parse_load() { # outfile -> "requests seconds req/s p50_us p99_us errors" ("" when no result)
  # h2load has no percentiles: its mean and max request times stand in the p50/p99 columns.
  local reqs secs rps a b errors
  if [ "$H2" = 1 ]; then
    read -r reqs errors < <(awk '/^requests:/ {print $8, $10 + $12 + $14}' "$1")
    read -r secs rps < <(awk '/^finished in/ {s = $3; sub(/s,$/, "", s); print s, $4}' "$1")
    read -r a b < <(awk '/^time for request:/ {print $6, $5}' "$1")
  else
    reqs=$(awk '/ requests in / {print $1}' "$1")
    secs=$(awk '/ requests in / {sub(/s,$/, "", $4); print $4}' "$1")
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$1")
    a=$(awk '$1 == "50%" {print $2}' "$1"); b=$(awk '$1 == "99%" {print $2}' "$1")
    errors=$(awk '/Non-2xx or 3xx responses:/ {n = $NF} /Socket errors:/ {gsub(/,/, ""); s = $4 + $6 + $8 + $10} END {print n + s}' "$1")
  fi
  [ -n "$reqs" ] && [ -n "$secs" ] || return 0
  echo "$reqs $secs $rps $(to_us "$a") $(to_us "$b") ${errors:-0}"
}
to_us() { # "1.23ms" -> microseconds
  awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    m = (u == "us") ? 1 : (u == "ms") ? 1000 : (u == "s") ? 1000000 : (u == "m") ? 60000000 : -1
    if (m < 0) print "nan"; else printf "%.1f", n * m }'
}

SINCE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
MODEL=$(awk -F: '/^model name/ {sub(/^ +/, "", $2); print $2; exit}' /proc/cpuinfo)
VERSIONS="$(nginx -v 2>&1 | sed 's/.*version: //'), $(haproxy -v 2>/dev/null | awk 'NR==1 {print "HAProxy " $3}'), $(wrk -v 2>&1 | awk 'NR==1 {print "wrk " $2}')"
[ "$EDGE_ON" = 1 ] && VERSIONS+=", $(timeout 5 "$EDGE_ROUTER" --version 2>/dev/null | head -1)"
mkdir -p "$ROOT/target/bench-compare"
[ -n "$RESULTS" ] || RESULTS="$ROOT/target/bench-compare/$MODE-$(date +%Y%m%d-%H%M%S).md"
mkdir -p "$(dirname "$RESULTS")"

echo "machine: $NCPU cores, $MODEL, kernel $(uname -r); load avg at start $LOAD_BEFORE"
echo "versions: $VERSIONS"
echo "pinning: proxies on core $PROXY_CORE (one worker each); wrk AND the backend nginx share core $LOAD_CORE"
for pid in $(pids_of backend); do echo "backend pid $pid: $(affinity_summary "$pid")"; done

declare -A IDLE_RSS=()
for p in $PROXIES; do
  [ "$p" = baseline ] && continue
  start_proxy "$p"
  # RSS at start, before any traffic
  IDLE_RSS[$p]=$(status_kb VmRSS $(pids_of "$p"))
  for pid in $(pids_of "$p"); do echo "$p pid $pid: $(affinity_summary "$pid")"; done
done

# ================================================================ idle-connection mode
if [ "$MODE" = idle ]; then
  cat >"$W/hold.py" <<'PYEOF'
# Open N keep-alive connections to 127.0.0.1:PORT, one HTTP/1.1 request each, keep them.
# With a 4th argument "https", over TLS (no ALPN offered: HTTP/1.1). Writes
# "opened=N failed=F" to STATUS once all are open, recounts live ones on SIGUSR1, exits on
# SIGTERM.
import resource, select, signal, socket, sys, time
port, n, status = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ctx = None
if len(sys.argv) > 4 and sys.argv[4] == "https":
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
socks, failed = [], 0
def read_response(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(4096)
        if not d: raise OSError("closed before response")
        buf += d
    head, body = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"): raise OSError(head.split(b"\r\n")[0].decode())
    clen = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length": clen = int(v)
    while len(body) < clen:
        d = s.recv(4096)
        if not d: raise OSError("closed in body")
        body += d
first_err = None
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
        if ctx: s = ctx.wrap_socket(s, server_hostname="localhost")
        s.sendall(req); read_response(s)
        socks.append(s)
    except OSError as e:
        failed += 1; first_err = first_err or repr(e); s.close()
def alive():
    # A connection the proxy closed shows as hung up (its FIN: POLLRDHUP), TLS or not.
    p = select.poll()
    gone = select.POLLHUP | select.POLLERR | select.POLLRDHUP
    for s in socks:
        p.register(s.fileno(), select.POLLIN | select.POLLRDHUP)
    closed = {fd for fd, ev in p.poll(0) if ev & gone}
    return sum(1 for s in socks if s.fileno() not in closed)
def write(line):
    with open(status + ".tmp", "w") as f: f.write(line + "\n")
    import os; os.replace(status + ".tmp", status)
write(f"opened={len(socks)} failed={failed} first_error={first_err}")
signal.signal(signal.SIGUSR1, lambda *a: write(f"opened={len(socks)} failed={failed} still_open={alive()}"))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True: signal.pause()
PYEOF
  {
    echo "# edge-router compare: $IDLE_CONNS idle keep-alive connections ($SCHEME)"
    echo
    echo "- date: $SINCE; machine: $NCPU cores, $MODEL, kernel $(uname -r); load avg at start: $LOAD_BEFORE"
    echo "- versions: $VERSIONS"
    echo "- each proxy pinned to core $PROXY_CORE, one worker; the connection holder (python3) on core $LOAD_CORE"
    [ -z "$LIMIT_NOTE" ] || echo "- $LIMIT_NOTE"
    echo "- idle RSS: after a 1s warm-up with wrk -c$CONNS, no connection open; held: $IDLE_CONNS connections open, each after one HTTP/1.1 request ($SCHEME, no ALPN)"
    echo
    echo "| proxy | RSS at start MB | idle RSS MB (after warm-up) | RSS with $IDLE_CONNS conns MB | KB per conn | idle PSS MB | PSS with conns MB | conns still open | open failures |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  } >"$RESULTS"
  for p in $PROXIES; do
    run_wrk "${PORT[$p]}" 1s "$W/runs/$p-warmup.txt"
    sleep 1  # let the warm-up connections close on both sides before reading RSS
    pids=$(pids_of "$p")
    idle=$(status_kb VmRSS $pids); idle_pss=$(pss_kb $pids)
    rm -f "$W/hold-$p.status"
    taskset -c "$LOAD_CORE" python3 "$W/hold.py" "${PORT[$p]}" "$IDLE_CONNS" "$W/hold-$p.status" "$SCHEME" 2>"$W/hold-$p.err" &
    hp=$!; STARTED+=("$hp")
    deadline=$((SECONDS + HOLD_WAIT))
    until [ -s "$W/hold-$p.status" ]; do
      kill -0 "$hp" 2>/dev/null || fail "connection holder died for $p" "$W/hold-$p.err"
      [ $SECONDS -ge $deadline ] && fail "could not open $IDLE_CONNS connections to $p within ${HOLD_WAIT}s (HOLD_WAIT)"
      sleep 0.1
    done
    first=$(cat "$W/hold-$p.status")
    sleep 2  # settle: let lazily allocated per-connection state show up in RSS
    kill -0 "${PIDOF[$p]}" 2>/dev/null || fail "$p died while holding connections" "$W/$p/stdout.log"
    held=$(status_kb VmRSS $pids); held_pss=$(pss_kb $pids)
    rm -f "$W/hold-$p.status"; kill -USR1 "$hp"
    until [ -s "$W/hold-$p.status" ]; do sleep 0.05; done
    second=$(cat "$W/hold-$p.status")
    kill -TERM "$hp" 2>/dev/null; wait "$hp" 2>/dev/null; forget "$hp"
    opened=$(sed -n 's/.*opened=\([0-9]*\).*/\1/p' <<<"$first")
    failed=$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$first")
    still=$(sed -n 's/.*still_open=\([0-9]*\).*/\1/p' <<<"$second")
    per=$(awk -v a="$held" -v b="$idle" -v n="$opened" 'BEGIN { if (n > 0) printf "%.2f", (a - b) / n; else print "n/a" }')
    printf '%s: start %.1f MB, idle %.1f MB, held %.1f MB (%s KB/conn), opened %s, still open %s, failed %s\n' \
      "$p" "$(awk -v k="${IDLE_RSS[$p]}" 'BEGIN{print k/1024}')" "$(awk -v k="$idle" 'BEGIN{print k/1024}')" \
      "$(awk -v k="$held" 'BEGIN{print k/1024}')" "$per" "$opened" "$still" "$failed"
    [ "$failed" = 0 ] || echo "  first failure: $first" >&2
    awk -v p="$p" -v s="${IDLE_RSS[$p]}" -v i="$idle" -v h="$held" -v per="$per" -v st="$still" -v o="$opened" -v f="$failed" \
      -v ip="$idle_pss" -v hp="$held_pss" \
      'BEGIN { printf "| %s | %.1f | %.1f | %.1f | %s | %.1f | %.1f | %s of %s | %s |\n", p, s/1024, i/1024, h/1024, per, ip/1024, hp/1024, st, o, f }' >>"$RESULTS"
    sleep 1  # the proxy closes $IDLE_CONNS sockets; let that finish before the next one
  done
  echo >>"$RESULTS"
  echo "RSS is VmRSS summed over the proxy's processes (nginx: master + worker; pages they share are counted twice)." >>"$RESULTS"
  echo "PSS (/proc/PID/smaps_rollup) splits shared pages between the processes sharing them, including the backend nginx and other programs using the same libraries." >>"$RESULTS"
  echo
  cat "$RESULTS"
  echo
  echo "results written to $RESULTS"
  exit 0
fi

# ================================================================ throughput mode
for p in $PROXIES; do
  echo "warm-up $p ($WARMUP)"
  run_load "${PORT[$p]}" "$WARMUP" "$W/runs/$p-warmup.txt" || fail "load generator failed against $p" "$W/runs/$p-warmup.txt"
  [ -n "$(parse_load "$W/runs/$p-warmup.txt")" ] || fail "load generator produced no result against $p" "$W/runs/$p-warmup.txt"
done

CSV="${RESULTS%.md}.csv"
echo "round,proxy,rps,p50_us,p99_us,requests,errors,cpu_s,cpu_us_per_req,proxy_core_busy_pct,other_on_proxy_core_pct,load_core_busy_pct,peak_rss_kb,proxy_core_irq_us_per_req,attempt" >"$CSV"
for ((r = 1; r <= ROUNDS; r++)); do
  for p in $PROXIES; do
   for ((attempt = 1; attempt <= RETRIES + 1; attempt++)); do
    out="$W/runs/$p-$r-$attempt.txt"
    wait_quiet
    pids=$(pids_of "$p")
    c0=$(cpu_ticks $pids); read -r pb0 pt0 _ pi0 < <(core_ticks "$PROXY_CORE"); read -r lb0 lt0 _ < <(core_ticks "$LOAD_CORE")
    run_load "${PORT[$p]}" "$DURATION" "$out" || fail "load generator failed against $p" "$out"
    c1=$(cpu_ticks $pids); read -r pb1 pt1 _ pi1 < <(core_ticks "$PROXY_CORE"); read -r lb1 lt1 _ < <(core_ticks "$LOAD_CORE")
    for pid in $pids; do kill -0 "$pid" 2>/dev/null || fail "$p (pid $pid) died during round $r" "$W/$p/stdout.log"; done
    hwm=$(status_kb VmHWM $pids)
    reqs="" secs="" rps="" p50="" p99="" errors=0
    read -r reqs secs rps p50 p99 errors < <(parse_load "$out")
    [ -n "$reqs" ] && [ "$reqs" -gt 0 ] || fail "no requests served by $p" "$out"
    line=$(awk -v r="$r" -v p="$p" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v n="$reqs" -v e="$errors" \
      -v ct=$((c1 - c0)) -v hz="$CLK_TCK" -v secs="$secs" -v pb=$((pb1 - pb0)) -v pt=$((pt1 - pt0)) \
      -v lb=$((lb1 - lb0)) -v lt=$((lt1 - lt0)) -v hwm="$hwm" -v pi=$((pi1 - pi0)) -v irqsep="$IRQ_SEPARATE" 'BEGIN {
        cpu = ct / hz
        # others on the proxy core: its busy time minus the proxy own time; with
        # CONFIG_IRQ_TIME_ACCOUNTING softirq time is not charged to the task, so take it out too
        other = (pt > 0) ? 100 * (pb - (irqsep ? pi : 0) - ct) / pt : 0; if (p == "baseline") other = (pt > 0) ? 100 * pb / pt : 0
        if (other < 0) other = 0
        printf "%d,%s,%.0f,%s,%s,%d,%d,%.2f,%.2f,%.1f,%.1f,%.1f,%d,%.2f", r, p, rps, p50, p99, n, e, cpu,
          cpu * 1e6 / n, 100 * cpu / secs, other, (lt > 0) ? 100 * lb / lt : 0, hwm, (pi / hz) * 1e6 / n }')
    IFS=, read -r _ _ f_rps f_p50 f_p99 _ f_err _ f_cpu f_busy f_other f_load _ f_irq <<<"$line"
    printf 'round %d/%d %-11s %7s req/s  p50 %6s us  p99 %8s us  %6s us CPU/req (+%s irq)  core%s: proxy %5s%%, others %4s%%  core%s busy %5s%%  errors %s\n' \
      "$r" "$ROUNDS" "$p" "$f_rps" "$f_p50" "$f_p99" "$f_cpu" "$f_irq" "$PROXY_CORE" "$f_busy" "$f_other" "$LOAD_CORE" "$f_load" "$f_err"
    if [ "$attempt" -le "$RETRIES" ] && awk -v o="$f_other" -v q="$QUIET_PCT" 'BEGIN { exit !(o > q) }'; then
      echo "  other processes took ${f_other}% of core $PROXY_CORE: discarding this run and repeating it" >&2
      continue
    fi
    echo "$line,$attempt" >>"$CSV"
    break
   done
  done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- summary table
summary=$(awk -F, -v order="$PROXIES" -v idle="$(for p in $PROXIES; do printf '%s=%s ' "$p" "${IDLE_RSS[$p]:-0}"; done)" '
  function median(list,   a, n, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  function ratio(x, y) { return (y > 0 && x != "") ? sprintf("%.2fx", x / y) : "n/a" }
  NR > 1 { rps[$2] = rps[$2] " " $3; p50[$2] = p50[$2] " " $4; p99[$2] = p99[$2] " " $5
           cpu[$2] = cpu[$2] " " $9; busy[$2] = busy[$2] " " $10; err[$2] += $7; irq[$2] = irq[$2] " " $14
           if ($13 > hwm[$2]) hwm[$2] = $13; if ($11 > oth[$2]) oth[$2] = $11; n[$2]++ }
  END {
    split(idle, kv, " "); for (i in kv) { split(kv[i], q, "="); irss[q[1]] = q[2] }
    np = split(order, names, " ")
    for (i = 1; i <= np; i++) { p = names[i]; R[p] = median(rps[p]); P50[p] = median(p50[p]); P99[p] = median(p99[p]); C[p] = median(cpu[p]); B[p] = median(busy[p]); I[p] = median(irq[p]) }
    print "| proxy | req/s | p50 us | p99 us | CPU us/req | core busy | RSS at start MB | peak RSS MB | errors | req/s vs nginx | CPU/req vs nginx | CPU/req vs HAProxy | p99 vs nginx |"
    print "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for (i = 1; i <= np; i++) {
      p = names[i]; label = (p == "baseline") ? "baseline (wrk -> backend, no proxy)" : p
      printf "| %s | %.0f | %.0f | %.0f | %.2f | %.0f%% | %s | %.1f | %d | %s | %s | %s | %s |\n", label, R[p], P50[p], P99[p], C[p], B[p],
        (p == "baseline") ? "n/a" : sprintf("%.1f", irss[p] / 1024), hwm[p] / 1024, err[p],
        ratio(R[p], R["nginx"]), ratio(C[p], C["nginx"]), ratio(C[p], C["haproxy"]), ratio(P99[p], P99["nginx"])
    }
    worst = 0; for (p in oth) if (oth[p] > worst) worst = oth[p]
    printf "\nWORST_OTHER %.1f\n", worst
  }' "$CSV")
worst_other=$(sed -n 's/^WORST_OTHER //p' <<<"$summary")
table=$(sed '/^WORST_OTHER /d' <<<"$summary")

{
  echo "# edge-router compare: $WORKLOAD, one core per proxy"
  echo
  echo "- date: $SINCE; machine: $NCPU cores, $MODEL, kernel $(uname -r)"
  echo "- load average before/after: $LOAD_BEFORE / $LOAD_AFTER; most CPU taken on core $PROXY_CORE by other processes during a run: ${worst_other}%"
  echo "- versions: $VERSIONS"
  case "$WORKLOAD" in
    h2c|h2) echo "- each proxy pinned to core $PROXY_CORE with one worker; h2load -t1 -c$H2_CONNS -m$H2_STREAMS -D $(dur_s "$DURATION") ($SCHEME) and the backend nginx share core $LOAD_CORE; p50/p99 columns: h2load's mean/max request time" ;;
    *) echo "- each proxy pinned to core $PROXY_CORE with one worker; wrk -t1 -c$CONNS -d$DURATION --latency ($SCHEME$([ "$WORKLOAD" = handshake ] && echo ', Connection: close: a new TLS connection per request')) and the backend nginx share core $LOAD_CORE" ;;
  esac
  [ "$WORKLOAD" = access-log ] && echo "- access logs to files: nginx combined buffer=64k flush=1s; HAProxy option httplog to its stdout (a file); edge-router listener.access_log_path (text)"
  echo "- upstream leg: plain HTTP/1.1 keep-alive to the backend for every proxy"
  echo "- $ROUNDS rounds interleaved ($PROXIES), warm-up $WARMUP per proxy; medians over rounds; forwarding headers on nginx/HAProxy: $([ "$FORWARD_HEADERS" = 1 ] && echo yes || echo no)"
  echo "- CPU us/req: the proxy's utime+stime (/proc/PID/stat, nginx master+worker) over the run / requests served;"
  echo "  kernel: $([ "$IRQ_SEPARATE" = 1 ] && echo "IRQ time accounting on: softirq work is NOT in CPU us/req (see proxy_core_irq_us_per_req in the CSV)" || echo "tick-based accounting: softirq work done while the proxy runs is in its stime, so in CPU us/req")"
  echo "  core busy: the proxy's CPU time / run time (100% = the proxy core is the bottleneck); baseline row: the backend's CPU"
  echo "- peak RSS: VmHWM summed over the proxy's processes; RSS at start: VmRSS before any traffic"
  echo
  echo "$table"
  echo
  echo "Per run: $(basename "$CSV") (same directory)."
} >"$RESULTS"
echo
echo "$table"
echo
if awk -v w="$worst_other" 'BEGIN { exit !(w > 5) }'; then
  echo "warning: other processes took up to ${worst_other}% of core $PROXY_CORE during a run; rerun on a quiet machine" >&2
fi
echo "results written to $RESULTS (per run: $CSV)"
