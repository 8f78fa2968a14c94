#!/usr/bin/env python3
"""Check the edge-router admin dashboard in a real (headless) browser.

Loads the dashboard with Debian's `chromium` in headless mode, lets its script run
(--virtual-time-budget), and inspects the rendered DOM. Python 3 standard library only.

Usage:
  dashboard_check.py dump URL
      print the rendered DOM
  dashboard_check.py expect URL [--zone Z]... [--region R]... [--cluster C]
                     [--endpoints N] [--zone-endpoints N] [--min-healthy N] [--wait S]
      assert that every zone Z (and region R) is shown with a data-healthy count, that
      every endpoint element has a valid data-health, and (optionally) that there are
      exactly N endpoint elements in all (--endpoints) or in each zone Z (--zone-endpoints),
      and that each zone Z has at least N healthy endpoints (--min-healthy)
  dashboard_check.py expect-down URL --zone Z [--cluster C] [--wait S]
      assert that zone Z shows data-healthy="0" (in every cluster, or only in C) and that
      its endpoints are shown as unhealthy or ejected
  dashboard_check.py eval URL EXPR [--size 1400,900] [--settle S]
      load the page in real time at that window size, let it run S seconds (default 3),
      evaluate the JavaScript expression EXPR in it and print its value as JSON (layout
      and chart checks: computed styles, element sizes, data attributes)
  dashboard_check.py screenshot URL OUT.png [--size 1400,900] [--settle S]
      save a screenshot of the dashboard; with --settle S the page runs S seconds of
      real time first (virtual time makes req/s rates meaningless; use it for docs)

--wait S re-loads the page about once a second for up to S seconds until the
expectation holds (default: 0 for expect, 20 for expect-down). Exit status: 0 when
the expectation holds, 1 when it does not, 2 on bad usage or when chromium cannot run.

Environment: CHROMIUM (browser binary, default `chromium`), DASHBOARD_BUDGET_MS
(virtual time budget, default 5000).

Only the given URL is loaded; every other host name is made unresolvable for the
browser (--host-resolver-rules), so the check never reaches past the admin listener.
"""

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from html.parser import HTMLParser

HEALTH_VALUES = ("healthy", "unhealthy", "ejected")


class Fail(Exception):
    """An expectation that does not hold (exit 1)."""


class Usage(Exception):
    """Bad usage or a browser that cannot run (exit 2)."""


def chromium_binary():
    name = os.environ.get("CHROMIUM", "chromium")
    path = shutil.which(name)
    if not path:
        raise Usage(f"browser {name!r} not found: install it with `apt-get install -y chromium` "
                    "(or set CHROMIUM to its path)")
    return path


def base_flags(user_data_dir, url):
    host = urllib.parse.urlsplit(url).hostname or "localhost"
    excludes = ["localhost", "127.0.0.1", "[::1]"]
    if host not in excludes and f"[{host}]" not in excludes:
        excludes.append(f"[{host}]" if ":" in host else host)
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--no-first-run", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--disable-default-apps", "--no-default-browser-check",
        "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
        "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider",
        # Nothing but the host under test (and loopback) resolves for the browser.
        "--host-resolver-rules=MAP * ~NOTFOUND, " + ", ".join("EXCLUDE " + h for h in excludes),
        f"--user-data-dir={user_data_dir}",
    ]


def run_chromium(extra, url, timeout=90):
    binary = chromium_binary()
    budget = os.environ.get("DASHBOARD_BUDGET_MS", "5000")
    tmp = tempfile.mkdtemp(prefix="dashboard-check-")
    try:
        cmd = [binary] + base_flags(tmp, url) + [f"--virtual-time-budget={budget}"] + extra + [url]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Usage(f"chromium did not finish within {timeout} s loading {url}")
        return proc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stderr_tail(proc, n=4):
    """The last few lines chromium wrote to stderr, without the usual D-Bus noise."""
    lines = [l for l in proc.stderr.decode("utf-8", "replace").splitlines()
             if l.strip() and "dbus" not in l.lower() and "DBus" not in l]
    return " | ".join(lines[-n:]) or "(no message)"


class Cdp:
    """A minimal DevTools protocol client over --remote-debugging-pipe (fds 3 and 4)."""

    def __init__(self, extra, timeout=60):
        binary = chromium_binary()
        self.tmp = tempfile.mkdtemp(prefix="dashboard-check-")
        self.timeout = timeout
        cmd_r, self._cmd_w = os.pipe()      # we write commands, chromium reads fd 3
        self._res_r, res_w = os.pipe()      # chromium writes fd 4, we read
        def child_fds():
            # Move both ends out of the way first, so dup2 cannot clobber one with the other.
            hi_r, hi_w = os.dup(cmd_r), os.dup(res_w)
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)
        cmd = [binary] + base_flags(self.tmp, "http://localhost/") + ["--remote-debugging-pipe"] + extra + ["about:blank"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, pass_fds=(3, 4), preexec_fn=child_fds)
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._id = 0

    def call(self, method, params=None, session=None):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise Usage(f"chromium: {method}: {reply['error'].get('message')}")
                    return reply.get("result", {})
            if time.monotonic() > deadline:
                raise Usage(f"chromium did not answer {method} within {self.timeout} s")
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise Usage(f"chromium exited while waiting for {method}")
            self._buf += chunk

    def close(self):
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._res_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def screenshot_real_time(url, out, size, settle):
    """Load url, let it run for `settle` seconds of real time, then capture the viewport."""
    w, h = (int(v) for v in size.split(","))
    cdp = Cdp([f"--window-size={w},{h}"])
    try:
        targets = cdp.call("Target.getTargets")["targetInfos"]
        page = next(t["targetId"] for t in targets if t.get("type") == "page")
        session = cdp.call("Target.attachToTarget", {"targetId": page, "flatten": True})["sessionId"]
        cdp.call("Emulation.setDeviceMetricsOverride",
                 {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False}, session)
        nav = cdp.call("Page.navigate", {"url": url}, session)
        if nav.get("errorText"):
            raise Usage(f"chromium could not load {url}: {nav['errorText']}")
        time.sleep(settle)
        data = cdp.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
    finally:
        cdp.close()
    with open(out, "wb") as f:
        f.write(base64.b64decode(data))


def eval_real_time(url, expr, size, settle):
    """Load url at size W,H, let it run `settle` real seconds, then evaluate expr in the page;
    its value (JSON-serialisable) is returned."""
    w, h = (int(v) for v in size.split(","))
    cdp = Cdp([f"--window-size={w},{h}"])
    try:
        targets = cdp.call("Target.getTargets")["targetInfos"]
        page = next(t["targetId"] for t in targets if t.get("type") == "page")
        session = cdp.call("Target.attachToTarget", {"targetId": page, "flatten": True})["sessionId"]
        cdp.call("Emulation.setDeviceMetricsOverride",
                 {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False}, session)
        nav = cdp.call("Page.navigate", {"url": url}, session)
        if nav.get("errorText"):
            raise Usage(f"chromium could not load {url}: {nav['errorText']}")
        time.sleep(settle)
        res = cdp.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)
    finally:
        cdp.close()
    if res.get("exceptionDetails"):
        raise Fail(f"the expression threw: {res['exceptionDetails'].get('text')} "
                   f"{res['exceptionDetails'].get('exception', {}).get('description', '')}")
    return res.get("result", {}).get("value")


def dump_dom(url):
    proc = run_chromium(["--dump-dom"], url)
    out = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0 or "<html" not in out.lower():
        raise Usage(f"chromium could not render {url} (exit {proc.returncode}): {stderr_tail(proc)}")
    return out


class DashboardParser(HTMLParser):
    """Collects zone and endpoint elements by their data attributes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.zones = []       # dicts of attributes of elements with data-zone and data-healthy
        self.endpoints = []   # dicts of attributes of elements with data-endpoint
        self.conn = None      # data-status of #conn
        self.title_ok = False

    def handle_starttag(self, tag, attrs):
        a = {k: (v if v is not None else "") for k, v in attrs}
        if "data-endpoint" in a:
            self.endpoints.append(a)
        elif "data-zone" in a and "data-healthy" in a:
            self.zones.append(a)
        if a.get("id") == "conn":
            self.conn = a.get("data-status")


def parse(html):
    p = DashboardParser()
    p.feed(html)
    p.close()
    return p


def describe(p):
    zs = ", ".join(f"{z.get('data-cluster', '?')}/{z.get('data-zone')}"
                   f"(healthy={z.get('data-healthy')}/{z.get('data-endpoints', '?')})" for z in p.zones[:20])
    more = f" (+{len(p.zones) - 20} more)" if len(p.zones) > 20 else ""
    return (f"page shows {len(p.zones)} zone(s): {zs or 'none'}{more}; {len(p.endpoints)} endpoint(s); "
            f"connection status {p.conn!r}")


def check_common(p):
    if p.conn != "live":
        raise Fail(f"dashboard is not connected to the admin API (status {p.conn!r}); " + describe(p))
    for z in p.zones:
        if not z.get("data-healthy", "").isdigit():
            raise Fail(f"zone {z.get('data-zone')!r} has no numeric data-healthy ({z.get('data-healthy')!r})")
    for e in p.endpoints:
        if e.get("data-health") not in HEALTH_VALUES:
            raise Fail(f"endpoint {e.get('data-endpoint')!r} has data-health={e.get('data-health')!r}, "
                       f"expected one of {', '.join(HEALTH_VALUES)}")


def zones_named(p, zone, cluster):
    return [z for z in p.zones if z.get("data-zone") == zone and (cluster is None or z.get("data-cluster") == cluster)]


def endpoints_in(p, zone, cluster):
    return [e for e in p.endpoints if e.get("data-zone") == zone and (cluster is None or e.get("data-cluster") == cluster)]


def check_expect(p, args):
    check_common(p)
    if not p.zones:
        raise Fail("no zone elements ([data-zone][data-healthy]) on the page; " + describe(p))
    if args.cluster and not any(z.get("data-cluster") == args.cluster for z in p.zones):
        raise Fail(f"cluster {args.cluster!r} not shown; " + describe(p))
    for r in args.region or []:
        if not any(z.get("data-region") == r for z in p.zones):
            raise Fail(f"region {r!r} not shown; " + describe(p))
    for zone in args.zone or []:
        found = zones_named(p, zone, args.cluster)
        if not found:
            raise Fail(f"zone {zone!r} not shown; " + describe(p))
        eps = endpoints_in(p, zone, args.cluster)
        if args.zone_endpoints is not None and len(eps) != args.zone_endpoints * len(found):
            raise Fail(f"zone {zone!r} shows {len(eps)} endpoint(s), expected {args.zone_endpoints}"
                       + (f" in each of {len(found)} clusters" if len(found) > 1 else ""))
        if args.min_healthy is not None:
            for z in found:
                if int(z["data-healthy"]) < args.min_healthy:
                    raise Fail(f"zone {zone!r} (cluster {z.get('data-cluster')!r}) shows data-healthy="
                               f"{z['data-healthy']}, expected at least {args.min_healthy}")
    if args.endpoints is not None:
        if args.cluster:
            n = sum(1 for e in p.endpoints if e.get("data-cluster") == args.cluster)
        else:
            n = len(p.endpoints)
        if n != args.endpoints:
            raise Fail(f"page shows {n} endpoint element(s), expected {args.endpoints}; " + describe(p))
    healthy = sum(1 for e in p.endpoints if e.get("data-health") == "healthy")
    return (f"ok: {len(p.zones)} zone(s), {len(p.endpoints)} endpoint(s) ({healthy} healthy)"
            + (f"; zone(s) {', '.join(args.zone)} present" if args.zone else ""))


def check_down(p, args):
    check_common(p)
    found = zones_named(p, args.zone, args.cluster)
    if not found:
        raise Fail(f"zone {args.zone!r} not shown; " + describe(p))
    for z in found:
        if z.get("data-healthy") != "0":
            raise Fail(f"zone {args.zone!r} (cluster {z.get('data-cluster')!r}) shows data-healthy="
                       f"{z.get('data-healthy')!r}, expected \"0\"")
    up = [e.get("data-endpoint") for e in endpoints_in(p, args.zone, args.cluster) if e.get("data-health") == "healthy"]
    if up:
        raise Fail(f"zone {args.zone!r} shows data-healthy=\"0\" but endpoint(s) {', '.join(up)} are shown healthy")
    return f"ok: zone {args.zone!r} is shown down (data-healthy=\"0\") in {len(found)} cluster(s)"


def with_wait(url, check, args, wait):
    deadline = time.monotonic() + wait
    while True:
        try:
            return check(parse(dump_dom(url)), args)
        except Fail as e:
            if time.monotonic() >= deadline:
                raise
            last = e
            print(f"not yet: {last}", file=sys.stderr)
            time.sleep(1)


def main(argv):
    ap = argparse.ArgumentParser(prog="dashboard_check.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="print the rendered DOM")
    d.add_argument("url")
    e = sub.add_parser("expect", help="assert zones and endpoints are shown with health attributes")
    e.add_argument("url")
    e.add_argument("--zone", action="append", help="a zone that must be shown (repeatable)")
    e.add_argument("--region", action="append", help="a region that must be shown (repeatable)")
    e.add_argument("--cluster", help="only look at this cluster")
    e.add_argument("--endpoints", type=int, help="exact number of endpoint elements on the page (or in --cluster)")
    e.add_argument("--zone-endpoints", type=int, help="exact number of endpoints shown in each --zone")
    e.add_argument("--min-healthy", type=int, help="each --zone shows at least this many healthy endpoints")
    e.add_argument("--wait", type=float, default=0.0, help="retry for up to this many seconds (default 0)")
    x = sub.add_parser("expect-down", help="assert a zone is shown with data-healthy=\"0\"")
    x.add_argument("url")
    x.add_argument("--zone", required=True)
    x.add_argument("--cluster", help="only look at this cluster")
    x.add_argument("--wait", type=float, default=20.0, help="retry for up to this many seconds (default 20)")
    s = sub.add_parser("screenshot", help="save a PNG screenshot")
    s.add_argument("url")
    s.add_argument("out")
    s.add_argument("--size", default="1400,900", help="window size W,H (default 1400,900)")
    s.add_argument("--settle", type=float, default=0.0,
                   help="instead of virtual time, let the page run this many real seconds before the "
                        "shot (so req/s rates are real; uses --remote-debugging-pipe)")
    v = sub.add_parser("eval", help="evaluate a JavaScript expression in the live page, print its JSON value")
    v.add_argument("url")
    v.add_argument("expr")
    v.add_argument("--size", default="1400,900", help="window size W,H (default 1400,900)")
    v.add_argument("--settle", type=float, default=3.0, help="real seconds the page runs first (default 3)")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "dump":
            sys.stdout.write(dump_dom(args.url))
            if not sys.stdout.isatty():
                sys.stdout.write("\n")
        elif args.cmd == "expect":
            print(with_wait(args.url, check_expect, args, args.wait))
        elif args.cmd == "expect-down":
            print(with_wait(args.url, check_down, args, args.wait))
        elif args.cmd == "eval":
            print(json.dumps(eval_real_time(args.url, args.expr, args.size, args.settle)))
        elif args.cmd == "screenshot":
            out = os.path.abspath(args.out)
            if os.path.exists(out):
                os.remove(out)
            if args.settle > 0:
                screenshot_real_time(args.url, out, args.size, args.settle)
                print(f"ok: screenshot of {args.url} after {args.settle:g} s saved to {out}")
                return 0
            proc = run_chromium([f"--screenshot={out}", f"--window-size={args.size}"], args.url)
            if not os.path.exists(out) or os.path.getsize(out) == 0:
                raise Usage(f"chromium wrote no screenshot to {out} (exit {proc.returncode}): {stderr_tail(proc)}")
            print(f"ok: screenshot of {args.url} saved to {out}")
    except Fail as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    except Usage as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
