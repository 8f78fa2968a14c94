//! The text of `edge-router status`: tables, bars and sparklines, with or without colour.

use std::fmt::Write as _;

use super::{Cluster, ClusterHistory, Event, History, Locality, Rates, Routes, ZoneHistory};
use super::{Endpoint, EVENTS_SHOWN, LIST_ENDPOINTS_UP_TO};

const BAR: usize = 20;

/// A sparkline covers the last minute (at one sample a second) in this many characters,
/// each the largest of two samples, so a one-second spike still shows.
pub const SPARK_CHARS: usize = 30;
pub const SPARK_SAMPLES: usize = 60;
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The last `samples` values in `chars` block characters, scaled from 0 to `max` (the
/// largest value shown when `max` is None); a blank where no value is known.
pub fn sparkline(values: &[Option<f64>], samples: usize, chars: usize, max: Option<f64>) -> String {
    let per = samples.div_ceil(chars.max(1)).max(1);
    let shown = &values[values.len().saturating_sub(samples)..];
    // Buckets end at the newest sample, so the right edge is always "now".
    let mut buckets: Vec<Option<f64>> = shown
        .rchunks(per)
        .map(|c| c.iter().flatten().copied().reduce(f64::max))
        .collect();
    buckets.reverse();
    let top = max.unwrap_or_else(|| buckets.iter().flatten().fold(0.0_f64, |a, v| a.max(*v)));
    let mut out = String::with_capacity(chars * 3);
    for _ in buckets.len()..chars {
        out.push(' ');
    }
    for v in buckets {
        match v {
            None => out.push(' '),
            Some(v) if top <= 0.0 || v <= 0.0 => out.push(SPARKS[0]),
            Some(v) => {
                let i = ((v / top).clamp(0.0, 1.0) * (SPARKS.len() - 1) as f64).round() as usize;
                out.push(SPARKS[i.max(1)]);
            }
        }
    }
    out
}

fn last(values: &[Option<f64>]) -> Option<f64> {
    values.last().copied().flatten()
}

/// ANSI styling, or none.
#[derive(Clone, Copy)]
pub struct Style {
    pub color: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
    pub(super) fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
    fn green(&self, s: &str) -> String {
        self.paint("32", s)
    }
    fn yellow(&self, s: &str) -> String {
        self.paint("33", s)
    }
    pub(super) fn red(&self, s: &str) -> String {
        self.paint("31", s)
    }
    fn blue(&self, s: &str) -> String {
        self.paint("34", s)
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 1000.0 => format!("{:.2} s", v / 1000.0),
        Some(v) if v < 10.0 => format!("{v:.1} ms"),
        Some(v) => format!("{v:.0} ms"),
    }
}

fn fmt_rate(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn fmt_age(ms: i64) -> String {
    let s = ms.max(0) as f64 / 1000.0;
    if s < 60.0 {
        format!("{s:.1} s ago")
    } else if s < 7200.0 {
        format!("{:.0} min ago", s / 60.0)
    } else {
        format!("{:.1} h ago", s / 3600.0)
    }
}

/// Pads `s` (which may hold ANSI codes) to `w` visible characters.
fn pad(s: &str, visible: usize, w: usize) -> String {
    let mut out = s.to_string();
    for _ in visible..w {
        out.push(' ');
    }
    out
}

fn bar(share: f64) -> (String, String) {
    let share = share.clamp(0.0, 1.0);
    let mut n = (share * BAR as f64).round() as usize;
    if share > 0.0 && n == 0 {
        n = 1;
    }
    ("█".repeat(n), "░".repeat(BAR - n))
}

/// The whole picture as text. `events` may be empty (an older router without /events).
pub fn render(
    admin: &str,
    routes: &Routes,
    events: &[Event],
    history: Option<&History>,
    rates: &Rates,
    style: Style,
    now_ms: i64,
) -> String {
    let mut o = String::new();
    let (mut healthy, mut total, mut rps, mut have_rate) = (0, 0, 0.0, false);
    for c in &routes.clusters {
        for e in &c.endpoints {
            total += 1;
            if e.healthy && !e.ejected {
                healthy += 1;
            }
            if let Some(r) = rates.of(&c.name, e) {
                rps += r;
                have_rate = true;
            }
        }
    }
    let loc = routes
        .locality
        .as_ref()
        .map(|l| format!("{} / {}", l.region, l.zone))
        .unwrap_or_else(|| "–".into());
    let _ = writeln!(
        o,
        "{}  {}",
        style.bold("edge-router"),
        style.dim(&format!("admin {admin}"))
    );
    let _ = writeln!(
        o,
        "generation {}  ·  table age {}  ·  locality {}  ·  {}/{} endpoints healthy  ·  {} req/s",
        routes.generation,
        routes
            .table_age_s
            .map(|s| format!("{s:.1} s"))
            .unwrap_or_else(|| "–".into()),
        loc,
        healthy,
        total,
        if have_rate {
            fmt_rate(Some(rps))
        } else {
            "–".into()
        }
    );
    if routes.clusters.is_empty() {
        let _ = writeln!(o, "\nThe routing table has no clusters.");
    }
    for c in &routes.clusters {
        render_cluster(&mut o, c, routes.locality.as_ref(), rates, style);
        if let Some(h) = history.and_then(|h| h.clusters.iter().find(|h| h.name == c.name)) {
            render_history(&mut o, c, h, style);
        }
    }
    let _ = writeln!(o, "\n{}", style.bold("Events (newest first)"));
    if events.is_empty() {
        let _ = writeln!(o, "  {}", style.dim("no events yet"));
    }
    for e in events.iter().rev().take(EVENTS_SHOWN) {
        let text = format!("{:<9}", e.kind);
        let kind = match e.severity.as_deref() {
            Some("error") => style.red(&text),
            Some("warning") => style.yellow(&text),
            Some("ok") => style.green(&text),
            _ => style.dim(&text),
        };
        let _ = writeln!(
            o,
            "  {:>12}  {kind} {}",
            fmt_age(now_ms - e.ts_ms as i64),
            e.message
        );
    }
    o
}

fn render_cluster(
    o: &mut String,
    c: &Cluster,
    local: Option<&Locality>,
    rates: &Rates,
    style: Style,
) {
    let healthy = c
        .endpoints
        .iter()
        .filter(|e| e.healthy && !e.ejected)
        .count();
    let mut rps = 0.0;
    let mut have_rate = false;
    for e in &c.endpoints {
        if let Some(r) = rates.of(&c.name, e) {
            rps += r;
            have_rate = true;
        }
    }
    let serving = c.zones.iter().find(|z| z.healthy > 0);
    let _ = write!(
        o,
        "\n{} {}  ·  {} zones  ·  {}/{} endpoints healthy  ·  {} req/s  ·  ",
        style.bold("cluster"),
        style.bold(&c.name),
        c.zones.len(),
        healthy,
        c.endpoints.len(),
        if have_rate {
            fmt_rate(Some(rps))
        } else {
            "–".into()
        },
    );
    let _ = match serving {
        Some(z) => writeln!(o, "serving from {}", style.bold(&z.zone)),
        None if c.endpoints.is_empty() => writeln!(o, "no endpoints"),
        None => writeln!(o, "{}", style.red("no healthy endpoint: failing open")),
    };
    let _ = writeln!(
        o,
        "{}",
        style.dim(&format!(
            "  {:>4}  {:<22} {:<16} {:>9}  {:>7}  {:<31} {:>7}",
            "RANK", "ZONE", "REGION", "LATENCY", "HEALTHY", "TRAFFIC SHARE", "REQ/S"
        ))
    );
    let list_all = c.endpoints.len() <= LIST_ENDPOINTS_UP_TO;
    let mut hidden = 0;
    for (i, z) in c.zones.iter().enumerate() {
        let eps: Vec<&Endpoint> = c
            .endpoints
            .iter()
            .filter(|e| e.zone == z.zone && e.region == z.region)
            .collect();
        let mut zone_rps = 0.0;
        let mut zone_have = false;
        for e in &eps {
            if let Some(r) = rates.of(&c.name, e) {
                zone_rps += r;
                zone_have = true;
            }
        }
        let mut name = z.zone.clone();
        let mut name_w = name.chars().count();
        if local.is_some_and(|l| l.zone == z.zone && l.region == z.region) {
            name.push_str(&format!(" {}", style.blue("local")));
            name_w += 6;
        }
        if let Some(d) = z.dial.filter(|d| *d < 100) {
            let t = format!(" dial {d}%");
            name_w += t.chars().count();
            name.push_str(&style.yellow(&t));
        }
        let hx = format!("{}/{}", z.healthy, z.endpoints);
        let hx = if z.endpoints == 0 {
            style.dim(&format!("{hx:>7}"))
        } else if z.healthy == 0 {
            style.red(&format!("{hx:>7}"))
        } else if z.healthy < z.endpoints {
            style.yellow(&format!("{hx:>7}"))
        } else {
            style.green(&format!("{hx:>7}"))
        };
        let share = z.share.unwrap_or(0.0);
        let (full, empty) = bar(share);
        let why = c
            .slices
            .iter()
            .find(|s| s.zone == z.zone && s.share > 0.0)
            .map(|s| s.reason.as_str())
            .unwrap_or("");
        let share_txt = format!("{:>4.0}% {:<9}", share * 100.0, why);
        let rank = z.rank.unwrap_or(i);
        let _ = writeln!(
            o,
            "  {:>4}  {} {:<16} {:>9}  {}  {}{} {} {:>7}",
            rank,
            pad(&name, name_w, 22),
            z.region,
            fmt_ms(z.latency_ms),
            hx,
            style.blue(&full),
            style.dim(&empty),
            if share > 0.0 {
                share_txt
            } else {
                style.dim(&share_txt)
            },
            if zone_have {
                fmt_rate(Some(zone_rps))
            } else {
                "–".into()
            }
        );
        for e in eps {
            let health = if e.ejected {
                style.yellow("ejected  ")
            } else if e.healthy {
                style.green("healthy  ")
            } else {
                style.red("unhealthy")
            };
            if !list_all && e.healthy && !e.ejected {
                hidden += 1;
                continue;
            }
            let dot = if e.ejected {
                style.yellow("●")
            } else if e.healthy {
                style.green("●")
            } else {
                style.red("●")
            };
            let _ = writeln!(
                o,
                "          {dot} {:<24} {health} {:>9}  {:>3} in flight  {:>7} req/s{}",
                e.address,
                fmt_ms(e.latency_ms),
                e.in_flight,
                fmt_rate(rates.of(&c.name, e)),
                e.weight
                    .filter(|w| *w != 100)
                    .map(|w| format!("  weight {w}"))
                    .unwrap_or_default(),
            );
        }
    }
    if hidden > 0 {
        let _ = writeln!(
            o,
            "  {}",
            style.dim(&format!(
                "({hidden} healthy endpoints not listed: more than {LIST_ENDPOINTS_UP_TO} in this cluster)"
            ))
        );
    }
    if c.panic {
        let _ = writeln!(
            o,
            "  {}",
            style.red("panic mode: too few healthy endpoints, routing to all")
        );
    }
}

/// Each zone's last minute: latency, the share it took, and its errors, retries and
/// ejections per second, nearest zone first.
fn render_history(o: &mut String, c: &Cluster, h: &ClusterHistory, style: Style) {
    if h.zones.is_empty() {
        return;
    }
    let w = SPARK_CHARS;
    let _ = writeln!(
        o,
        "{}",
        style.dim(&format!(
            "  {:<22}  {:<w$} {:>8}  {:<w$} {:>4}  {:<w$} {}",
            "LAST MINUTE", "LATENCY", "", "SHARE SERVED", "", "ERRORS/S", "RETRIES/S, EJECTIONS/S"
        ))
    );
    // The table's order (nearest first), then zones that left it.
    let mut zones: Vec<&ZoneHistory> = c
        .zones
        .iter()
        .filter_map(|z| {
            h.zones
                .iter()
                .find(|hz| hz.zone == z.zone && hz.region == z.region)
        })
        .collect();
    for hz in &h.zones {
        if !zones.iter().any(|z| std::ptr::eq(*z, hz)) {
            zones.push(hz);
        }
    }
    // One latency scale for all zones of the cluster, so their lines compare.
    let top = zones
        .iter()
        .flat_map(|z| {
            let from = z.latency_ms.len().saturating_sub(SPARK_SAMPLES);
            z.latency_ms[from..].iter().flatten()
        })
        .fold(0.0_f64, |a, v| a.max(*v));
    for (i, z) in zones.iter().enumerate() {
        // Before any traffic the table's share is what there is to show.
        let share = if z.served_share.iter().any(Option::is_some) {
            &z.served_share
        } else {
            &z.share
        };
        // A zone's error line also carries the cluster's retries (counted per cluster) on
        // the first row, and its own ejections.
        let errors: Vec<Option<f64>> = z
            .errors_per_s
            .iter()
            .zip(&z.ejections_per_s)
            .map(|(e, j)| match (e, j) {
                (None, None) => None,
                (e, j) => Some(e.unwrap_or(0.0) + j.unwrap_or(0.0)),
            })
            .collect();
        let err_now = last(&z.errors_per_s).unwrap_or(0.0);
        let tail = if i == 0 {
            format!(
                "{} retries/s, {} ejections/s",
                fmt_rate(last(&h.retries_per_s)),
                fmt_rate(last(&z.ejections_per_s))
            )
        } else {
            format!("{} ejections/s", fmt_rate(last(&z.ejections_per_s)))
        };
        let err_spark = sparkline(&errors, SPARK_SAMPLES, w, None);
        let _ = writeln!(
            o,
            "  {:<22}  {} {:>8}  {} {:>4}  {} {:>5} {}",
            z.zone,
            style.blue(&sparkline(&z.latency_ms, SPARK_SAMPLES, w, Some(top))),
            fmt_ms(last(&z.latency_ms)),
            style.blue(&sparkline(share, SPARK_SAMPLES, w, Some(1.0))),
            last(share).map_or("–".into(), |v| format!("{:.0}%", v * 100.0)),
            if err_now > 0.0 {
                style.red(&err_spark)
            } else {
                style.dim(&err_spark)
            },
            fmt_rate(Some(err_now)),
            style.dim(&tail),
        );
    }
}
