#!/usr/bin/env python3
"""Offline cross-checks for deploy/, used by deploy/check.sh (Python >= 3.11, PyYAML).

  check_deploy.py dashboard-rules DASHBOARD OUT   every PromQL expression of the Grafana
        dashboard (panels, variables, annotations), with Grafana's $variables filled in,
        written as recording rules to OUT so `promtool check rules OUT` parses them.
  check_deploy.py rule-refs RULES [DASHBOARD]      every recording-rule name (level:name:op)
        used in an expression is recorded in RULES.
  check_deploy.py manifests DIR                    what a schema cannot see in DIR/*.yaml:
        the router TOML in each ConfigMap parses and uses only SPEC keys; every ${VAR} in it
        is set in the router container's environment; probes and the prometheus.io/port
        annotation point at the admin address of the config; mounted ConfigMaps exist;
        the ServiceMonitor (a CRD, which kubernetes-validate has no schema for) is well
        formed and selects a Service port that exists.
  check_deploy.py prom-fallback IN OUT             copy of a prometheus.yml with each
        kubernetes_sd_configs swapped for an empty static_configs, for a promtool built
        without Kubernetes service discovery (Debian's); the rest is checked unchanged.
  check_deploy.py extract-toml MANIFEST DIR        write each ConfigMap's *.toml to DIR.
"""
import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

ERRORS: list[str] = []


def err(msg: str) -> None:
    ERRORS.append(msg)
    print(f"  error: {msg}")


# ---------------------------------------------------------------- dashboard
GRAFANA_VARS = {
    "$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
    "${__rate_interval}": "5m", "${__interval}": "1m", "${__range}": "1h",
}


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    out = []

    def walk_panels(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f'panel "{p.get("title")}" {t.get("refId")}', t["expr"]))
            walk_panels(p.get("panels", []))

    walk_panels(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\)\s*", q or "")
        if not m:
            err(f"variable {v.get('name')}: unsupported query {q!r}")
            continue
        out.append((f"variable {v['name']}", m.group(1)))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f'annotation "{a.get("name")}"', a["expr"]))
    return out


def fill_vars(expr: str) -> str:
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    # remaining dashboard variables ($job, ${cluster}) are used as regex matchers
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def cmd_dashboard_rules(dash_path: str, out_path: str) -> None:
    dash = json.loads(Path(dash_path).read_text())
    for key in ("title", "uid", "panels", "templating", "schemaVersion"):
        if key not in dash:
            err(f"{dash_path}: no top-level {key!r}")
    ids = [p["id"] for p in dash.get("panels", [])]
    if len(ids) != len(set(ids)):
        err(f"{dash_path}: duplicate panel ids")
    exprs = dashboard_exprs(dash)
    rules = [{"record": f"dashboard:expr_{i}:check", "expr": fill_vars(e)}
             for i, (_, e) in enumerate(exprs)]
    Path(out_path).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    with open(out_path + ".index", "w") as f:
        for i, (where, _) in enumerate(exprs):
            f.write(f"dashboard:expr_{i}:check\t{where}\n")
    print(f"  {len(exprs)} dashboard expressions written to {out_path}")


# ---------------------------------------------------------------- rule refs
def cmd_rule_refs(rules_path: str, dash_path: str | None = None) -> None:
    doc = yaml.safe_load(Path(rules_path).read_text())
    recorded, exprs = set(), []
    for g in doc["groups"]:
        for r in g["rules"]:
            if "record" in r:
                recorded.add(r["record"])
            exprs.append((r.get("record") or r.get("alert"), r["expr"]))
    if dash_path:
        exprs += dashboard_exprs(json.loads(Path(dash_path).read_text()))
    used = 0
    for where, e in exprs:
        for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*:[A-Za-z0-9_:]+", e):
            used += 1
            if name not in recorded:
                err(f"{where}: uses recording rule {name} that {rules_path} does not record")
    print(f"  {used} uses of {len(recorded)} recording rules checked")


# ---------------------------------------------------------------- manifests
# Keys the SPEC defines (unknown keys are an error in the router too).
SPEC_KEYS = {
    "": {"listener", "admin", "locality", "cluster", "route"},
    "listener": {"address", "tls", "route_header"},
    "listener.tls": {"cert", "key"},
    "admin": {"address"},
    "locality": {"region", "zone"},
    "cluster": {"name", "traffic_dial", "affinity", "tls", "http2", "health_check", "endpoint"},
    "cluster.tls": {"sni", "ca"},
    "cluster.health_check": {"path", "interval", "timeout", "healthy_threshold", "unhealthy_threshold"},
    "cluster.endpoint": {"address", "region", "zone", "weight"},
    "route": {"host", "path_prefix", "cluster", "timeout"},
}
TABLE_ARRAYS = {"cluster", "route", "cluster.endpoint"}
FREE_TABLES = {"cluster.traffic_dial"}  # region -> percent
DURATION = re.compile(r"^\d+(\.\d+)?(ms|s|m|h)$")
HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+|\$\{[A-Z_][A-Z0-9_]*\}):\d{1,5}$")
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def check_keys(where: str, table: dict, path: str) -> None:
    allowed = SPEC_KEYS.get(path)
    if allowed is None:
        return
    for k, v in table.items():
        sub = f"{path}.{k}" if path else k
        if k not in allowed:
            err(f"{where}: unknown key {sub!r} (not in SPEC)")
            continue
        if sub in FREE_TABLES:
            continue
        if sub in TABLE_ARRAYS:
            if not isinstance(v, list):
                err(f"{where}: {sub} must be an array of tables ([[{sub}]])")
                continue
            for i, item in enumerate(v):
                check_keys(f"{where} {sub}[{i}]", item, sub)
        elif isinstance(v, dict):
            check_keys(where, v, sub)


def check_router_toml(where: str, text: str) -> tuple[dict, set[str]]:
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        err(f"{where}: TOML does not parse: {e}")
        return {}, set()
    check_keys(where, cfg, "")
    for sect in ("listener", "admin"):
        addr = cfg.get(sect, {}).get("address")
        if addr is None or not HOSTPORT.match(addr):
            err(f"{where}: [{sect}] address {addr!r} is not host:port")
    clusters = {c.get("name") for c in cfg.get("cluster", [])}
    for c in cfg.get("cluster", []):
        hc = c.get("health_check", {})
        for k in ("interval", "timeout"):
            if k in hc and not DURATION.match(hc[k]):
                err(f"{where}: cluster {c.get('name')!r} health_check.{k} {hc[k]!r} is not a duration")
        if not c.get("endpoint"):
            err(f"{where}: cluster {c.get('name')!r} has no endpoint")
        for i, ep in enumerate(c.get("endpoint", [])):
            if not HOSTPORT.match(ep.get("address", "")):
                err(f"{where}: cluster {c.get('name')!r} endpoint {i + 1}: address {ep.get('address')!r} is not host:port")
    if not cfg.get("route"):
        err(f"{where}: no [[route]]")
    for r in cfg.get("route", []):
        if r.get("cluster") not in clusters:
            err(f"{where}: route to unknown cluster {r.get('cluster')!r}")
        if "timeout" in r and not DURATION.match(r["timeout"]):
            err(f"{where}: route timeout {r['timeout']!r} is not a duration")
    return cfg, set(VAR.findall(text))


def container_env(container: dict) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    # variables an entrypoint script loads from a file written by an initContainer
    script = " ".join(container.get("command", []) + container.get("args", []))
    if ". /" in script or "source " in script:
        names.add("@envfile")
    return names


def envfile_vars(pod: dict) -> set[str]:
    out = set()
    for ic in pod.get("initContainers", []):
        text = " ".join(ic.get("command", []) + ic.get("args", []))
        out |= set(re.findall(r"([A-Z][A-Z0-9_]*)=%s", text))
    return out


def port_number(container: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def cmd_manifests(directory: str) -> None:
    docs = []
    for f in sorted(Path(directory).glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                docs.append((f.name, d))
    configmaps = {}
    for fname, d in docs:
        if d["kind"] == "ConfigMap":
            ns = d["metadata"].get("namespace", "default")
            configmaps[(ns, d["metadata"]["name"])] = (fname, d)
    services = [(f, d) for f, d in docs if d["kind"] == "Service"]
    workloads = [(f, d) for f, d in docs if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]
    checked_tomls = 0
    for fname, w in workloads:
        ns = w["metadata"].get("namespace", "default")
        where = f"{fname} {w['kind']}/{w['metadata']['name']}"
        tmpl = w["spec"]["template"]
        pod = tmpl["spec"]
        sel = w["spec"]["selector"]["matchLabels"]
        if any(tmpl["metadata"].get("labels", {}).get(k) != v for k, v in sel.items()):
            err(f"{where}: selector {sel} does not match the pod template labels")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        routers = [c for c in pod["containers"] if c["name"] == "edge-router"]
        if not routers:
            err(f"{where}: no container named edge-router")
            continue
        c = routers[0]
        errors_before = len(ERRORS)
        cfg_text = None
        for m in c.get("volumeMounts", []):
            v = vols.get(m["name"])
            if v is None:
                err(f"{where}: mount {m['name']!r} has no volume")
                continue
            if "configMap" in v:
                key = (ns, v["configMap"]["name"])
                if key not in configmaps:
                    err(f"{where}: ConfigMap {key[1]!r} (namespace {ns}) is not defined in {directory}")
                    continue
                data = configmaps[key][1].get("data", {})
                if m["mountPath"] == "/etc/edge-router":
                    cfg_text = data.get("edge-router.toml")
        if cfg_text is None:
            err(f"{where}: no ConfigMap with edge-router.toml mounted at /etc/edge-router")
            continue
        argv = c.get("command", []) + c.get("args", [])
        if "/etc/edge-router/edge-router.toml" not in " ".join(argv):
            err(f"{where}: the router is not started with --config /etc/edge-router/edge-router.toml")
        cfg, used_vars = check_router_toml(f"{where} config", cfg_text)
        checked_tomls += 1
        env = container_env(c)
        if "@envfile" in env:
            env |= envfile_vars(pod)
        for var in sorted(used_vars - env):
            err(f"{where}: config uses ${{{var}}} but the edge-router container does not set {var}")
        admin = cfg.get("admin", {}).get("address", "")
        admin_port = int(admin.rsplit(":", 1)[1]) if ":" in admin else None
        if admin.startswith("127.") or admin.startswith("[::1]") or admin.startswith("localhost"):
            err(f"{where}: admin address {admin} is loopback: kubelet probes to the pod IP cannot reach it")
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            p = c.get(probe, {}).get("httpGet")
            if not p:
                err(f"{where}: no {probe} httpGet")
                continue
            if p.get("path") != path:
                err(f"{where}: {probe} path {p.get('path')} (want {path})")
            if port_number(c, p.get("port")) != admin_port:
                err(f"{where}: {probe} port {p.get('port')} is not the admin port {admin_port}")
        ann = tmpl["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(admin_port):
            err(f"{where}: prometheus.io/scrape/port annotations do not point at admin port {admin_port}")
        listener = cfg.get("listener", {}).get("address", "")
        lport = int(listener.rsplit(":", 1)[1]) if ":" in listener else None
        if lport not in [p["containerPort"] for p in c.get("ports", [])]:
            err(f"{where}: listener port {lport} is not a containerPort")
        if pod.get("hostNetwork") and pod.get("dnsPolicy") != "ClusterFirstWithHostNet":
            err(f"{where}: hostNetwork without dnsPolicy ClusterFirstWithHostNet")
        if len(ERRORS) == errors_before:
            print(f"  {where}: config ok (vars {sorted(used_vars)} all set), probes and scrape port match admin {admin}")
    # Services select pods that exist, target ports that exist.
    for fname, s in services:
        sel = s["spec"].get("selector", {})
        ns = s["metadata"].get("namespace", "default")
        match = [w for _, w in workloads if w["metadata"].get("namespace", "default") == ns
                 and all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        if not match:
            err(f"{fname} Service/{s['metadata']['name']}: selector {sel} matches no workload")
            continue
        names = {p.get("name") for w in match for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in names:
                err(f"{fname} Service/{s['metadata']['name']}: targetPort {p['targetPort']} is no container port name")
    # ServiceMonitor (CRD): structure by hand, and that it selects a Service port.
    for fname, d in docs:
        if d["kind"] != "ServiceMonitor":
            continue
        where = f"{fname} ServiceMonitor/{d['metadata'].get('name')}"
        if d.get("apiVersion") != "monitoring.coreos.com/v1":
            err(f"{where}: apiVersion {d.get('apiVersion')} (want monitoring.coreos.com/v1)")
        spec = d.get("spec", {})
        unknown = set(spec) - {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                               "podTargetLabels", "sampleLimit", "attachMetadata"}
        if unknown:
            err(f"{where}: unknown spec keys {sorted(unknown)}")
        sel = spec.get("selector", {}).get("matchLabels", {})
        if not sel:
            err(f"{where}: no spec.selector.matchLabels")
        ns = d["metadata"].get("namespace", "default")
        svcs = [s for _, s in services if s["metadata"].get("namespace", "default") == ns
                and all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
        if not svcs:
            err(f"{where}: selector {sel} matches no Service in {directory}")
        for ep in spec.get("endpoints", []):
            unknown = set(ep) - {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                                 "honorLabels", "relabelings", "metricRelabelings", "params", "tlsConfig"}
            if unknown:
                err(f"{where}: unknown endpoint keys {sorted(unknown)}")
            for k in ("interval", "scrapeTimeout"):
                if k in ep and not DURATION.match(ep[k]):
                    err(f"{where}: endpoint {k} {ep[k]!r} is not a duration")
            if not any(ep.get("port") == p.get("name") for s in svcs for p in s["spec"]["ports"]):
                err(f"{where}: endpoint port {ep.get('port')!r} is no port name of the selected Service(s)")
        if svcs:
            print(f"  {where}: selects Service {[s['metadata']['name'] for s in svcs]} port {[e.get('port') for e in spec.get('endpoints', [])]}")
    if checked_tomls == 0:
        err(f"{directory}: no router config found to check")


def cmd_prom_fallback(src: str, dst: str) -> None:
    doc = yaml.safe_load(Path(src).read_text())
    swapped = 0
    for sc in doc.get("scrape_configs", []):
        if "kubernetes_sd_configs" in sc:
            for sd in sc["kubernetes_sd_configs"]:
                if sd.get("role") not in ("node", "pod", "service", "endpoints", "endpointslice", "ingress"):
                    err(f"{src}: job {sc['job_name']}: kubernetes_sd_configs role {sd.get('role')!r} is not valid")
            del sc["kubernetes_sd_configs"]
            sc.setdefault("static_configs", []).append({"targets": []})
            swapped += 1
    # rule_files are relative to the config file: keep them resolvable from dst
    base = Path(src).resolve().parent
    doc["rule_files"] = [str(base / r) for r in doc.get("rule_files", [])]
    Path(dst).write_text(yaml.safe_dump(doc, sort_keys=False))
    print(f"  swapped kubernetes_sd_configs in {swapped} job(s) for static_configs in {dst}")


def cmd_extract_toml(manifest: str, out_dir: str) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    found = [(d["metadata"]["name"], k, v) for d in yaml.safe_load_all(Path(manifest).read_text())
             if d and d["kind"] == "ConfigMap" for k, v in d.get("data", {}).items() if k.endswith(".toml")]
    for name, k, v in found:
        stem = Path(manifest).stem
        p = Path(out_dir) / (f"{stem}.toml" if len(found) == 1 else f"{stem}-{name}-{k}")
        p.write_text(v)
        print(p)


def main(argv: list[str]) -> int:
    cmds = {"dashboard-rules": (cmd_dashboard_rules, 2), "rule-refs": (cmd_rule_refs, None),
            "manifests": (cmd_manifests, 1), "prom-fallback": (cmd_prom_fallback, 2),
            "extract-toml": (cmd_extract_toml, 2)}
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 2
    fn, n = cmds[argv[1]]
    args = argv[2:]
    if n is not None and len(args) != n:
        print(__doc__, file=sys.stderr)
        return 2
    fn(*args)
    return 1 if ERRORS else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
