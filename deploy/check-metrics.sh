#!/usr/bin/env bash
# Usage: deploy/check-metrics.sh SCRAPE_FILE
#
# Checks that every metric family that deploy/prometheus/rules.yml and
# deploy/prometheus/grafana-dashboard.json name exists in SCRAPE_FILE, a Prometheus text
# exposition taken from a running router:
#   curl -s http://127.0.0.1:9901/metrics > scrape.txt && deploy/check-metrics.sh scrape.txt
#
# Names referenced: every edge_router_* and process_* identifier in the two files
# (expressions, legends, descriptions alike); names with a ':' are recording rules and are
# skipped. _bucket/_sum/_count are stripped to the histogram's family. A family is present
# when the scrape has a "# TYPE <family>" line or a sample of it.
# Note: a labelled family (a *Vec) appears in a scrape only once one of its label sets has
# been used, unless the router initialises its label sets; scrape after some traffic.
# Families that exist only with some config (edge_router_dns_resolutions_total: only with
# DNS-named endpoints) are reported when absent, and do not fail the check.
# Exit: 0 all present, 1 some missing (listed), 2 usage error.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
scrape=${1:-}
if [ -z "$scrape" ] || [ ! -r "$scrape" ]; then
  echo "usage: $0 SCRAPE_FILE   (Prometheus text format, e.g. curl -s 127.0.0.1:9901/metrics)" >&2
  exit 2
fi
sources=("$here/prometheus/rules.yml" "$here/prometheus/grafana-dashboard.json")

# Families present in the scrape: names from "# TYPE name type" and from sample lines.
present=$( {
  awk '$1 == "#" && $2 == "TYPE" { print $3 }' "$scrape"
  grep -Ev '^[[:space:]]*(#|$)' "$scrape" | sed -E 's/^([A-Za-z_:][A-Za-z0-9_:]*).*/\1/'
} | sort -u)
if [ -z "$present" ]; then
  echo "check-metrics: FAIL $scrape holds no metric at all" >&2
  exit 1
fi

# Families referenced by the rules and the dashboard.
referenced=$(grep -ohE '[A-Za-z_:][A-Za-z0-9_:]*' "${sources[@]}" \
  | grep -E '^(edge_router|process)_[A-Za-z0-9]' | grep -v ':' \
  | sed -E 's/_(bucket|sum|count)$//' | sort -u)

# family -> the config that makes it appear.
declare -A optional=(
  [edge_router_dns_resolutions_total]="only with DNS-named endpoints"
)

missing=()
n=0
absent_optional=0
while IFS= read -r fam; do
  [ -n "$fam" ] || continue
  n=$((n + 1))
  if ! grep -qxF "$fam" <<<"$present" \
     && ! grep -qxF "${fam}_bucket" <<<"$present" \
     && ! grep -qxF "${fam}_count" <<<"$present"; then
    if [ -n "${optional[$fam]:-}" ]; then
      echo "check-metrics: note: $fam is not in $scrape (${optional[$fam]})"
      absent_optional=$((absent_optional + 1))
    else
      missing+=("$fam")
    fi
  fi
done <<<"$referenced"

if [ "${#missing[@]}" -gt 0 ]; then
  echo "check-metrics: FAIL ${#missing[@]} of $n metric families used by rules.yml/grafana-dashboard.json are absent from $scrape:"
  printf '  %s\n' "${missing[@]}"
  exit 1
fi
echo "check-metrics: ok $((n - absent_optional)) of the $n metric families used by rules.yml and grafana-dashboard.json are in $scrape, the rest need config it does not have"
