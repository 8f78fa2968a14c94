use super::*;
use std::sync::Condvar;

/// A destination the test reads back, optionally held shut to play a slow disk.
#[derive(Clone, Default)]
struct Capture {
    bytes: Arc<Mutex<Vec<u8>>>,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8(lock(&self.bytes).clone()).expect("utf-8")
    }
    fn close_gate(&self) {
        *lock(&self.gate.0) = true;
    }
    fn open_gate(&self) {
        *lock(&self.gate.0) = false;
        self.gate.1.notify_all();
    }
}

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut shut = lock(&self.gate.0);
        while *shut {
            shut = self.gate.1.wait(shut).unwrap_or_else(|p| p.into_inner());
        }
        lock(&self.bytes).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn start(c: &Capture, format: Format, batch_bytes: usize, queue: usize) -> Arc<AccessWriter> {
    AccessWriter::start(
        Dest::Writer(Box::new(c.clone())),
        Options {
            format,
            batch_bytes,
            queue_batches: queue,
            sweep_every: Duration::from_millis(50),
        },
    )
    .expect("start")
}

fn sample(l: &mut Line<'_>) {
    l.bare("method", "GET");
    l.bare("host", "api.example.test");
    l.bare("path", "/a\"b\\c\u{1}");
    l.u64("status", 200);
    l.millis("duration_ms", Duration::from_micros(2309));
    l.u64("bytes", 5);
    l.bool("complete", true);
    l.quoted_opt("cluster", Some("api"));
    l.quoted_opt("error", None);
    l.quoted("request_id", "id-1");
    l.addr("client", ([127, 0, 0, 1], 4242).into());
}

#[test]
fn civil_dates() {
    assert_eq!(&civil(0), b"1970-01-01T00:00:00");
    assert_eq!(&civil(951_782_400), b"2000-02-29T00:00:00");
    assert_eq!(&civil(1_798_675_201), b"2026-12-31T00:00:01");
    assert_eq!(&civil(4_102_444_799), b"2099-12-31T23:59:59");
}

#[test]
fn a_json_line_parses_with_its_fields_in_order() {
    let c = Capture::default();
    let w = start(&c, Format::Json, 1 << 20, 4);
    w.line(sample);
    assert!(w.flush(Duration::from_secs(5)));
    let text = c.text();
    assert!(
        text.ends_with('\n') && text.matches('\n').count() == 1,
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_str(text.trim_end()).expect("json");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["target"], "access");
    assert_eq!(v["path"], "/a\"b\\c\u{1}");
    assert_eq!(v["duration_ms"].as_f64(), Some(2.309));
    assert_eq!(v["status"], 200);
    assert_eq!(v["complete"], true);
    assert_eq!(v["client"], "127.0.0.1:4242");
    assert!(v.get("error").is_none());
    let ts = v["timestamp"].as_str().expect("timestamp");
    assert_eq!(ts.len(), "2026-11-30T13:35:00.123456Z".len(), "{ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    let keys: Vec<&str> = [
        "timestamp",
        "level",
        "method",
        "host",
        "path",
        "status",
        "duration_ms",
        "bytes",
        "complete",
        "cluster",
        "request_id",
        "client",
        "target",
    ]
    .to_vec();
    let mut at = 0;
    for k in keys {
        let i = text[at..]
            .find(&format!("\"{k}\":"))
            .unwrap_or_else(|| panic!("{k} out of order in {text}"));
        at += i;
    }
}

#[test]
fn a_text_line_is_one_line_of_key_values() {
    let c = Capture::default();
    let w = start(&c, Format::Text, 1 << 20, 4);
    w.line(sample);
    w.line(|l| l.quoted("error", "line\nbreak"));
    assert!(w.flush(Duration::from_secs(5)));
    let text = c.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let (ts, rest) = lines[0].split_at(27);
    assert!(ts.ends_with('Z'), "{ts}");
    assert_eq!(
        rest,
        "  INFO access: method=GET host=api.example.test path=/a\"b\\c\u{1} status=200 \
         duration_ms=2.309 bytes=5 complete=true cluster=\"api\" request_id=\"id-1\" \
         client=127.0.0.1:4242"
    );
    assert!(lines[1].ends_with(r#"error="line\nbreak""#), "{}", lines[1]);
}

#[test]
fn milliseconds_keep_microsecond_precision() {
    let mut out = Vec::new();
    let mut l = Line {
        out: &mut out,
        json: false,
    };
    for us in [0, 5, 2309, 2_000_000, 123_456_789] {
        l.millis("d", Duration::from_micros(us));
    }
    assert_eq!(
        String::from_utf8(out).expect("utf-8"),
        " d=0.000 d=0.005 d=2.309 d=2000.000 d=123456.789"
    );
}

#[test]
fn quiet_threads_are_swept_without_a_flush() {
    let c = Capture::default();
    let w = start(&c, Format::Json, 1 << 20, 4);
    w.line(sample);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.text().is_empty() {
        assert!(Instant::now() < deadline, "the line was never swept");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn lines_of_an_exited_thread_are_written() {
    let c = Capture::default();
    let w = start(&c, Format::Json, 1 << 20, 4);
    let w2 = w.clone();
    std::thread::spawn(move || {
        for _ in 0..3 {
            w2.line(sample);
        }
    })
    .join()
    .expect("thread");
    assert!(w.flush(Duration::from_secs(5)));
    assert_eq!(c.text().lines().count(), 3);
    assert_eq!(w.written(), 3);
}

#[test]
fn a_flood_against_a_stuck_writer_drops_and_counts_instead_of_blocking() {
    let c = Capture::default();
    // Every line its own batch, one batch of room.
    let w = start(&c, Format::Json, 1, 1);
    c.close_gate();
    const N: u64 = 10_000;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let w2 = w.clone();
    std::thread::spawn(move || {
        for _ in 0..N {
            w2.line(sample);
        }
        let _ = done_tx.send(());
    });
    let finished = done_rx.recv_timeout(Duration::from_secs(30));
    c.open_gate();
    assert!(finished.is_ok(), "writing lines blocked behind the writer");
    assert!(w.dropped() > 0, "nothing counted as dropped");
    assert!(w.flush(Duration::from_secs(10)));
    assert_eq!(w.written() + w.dropped(), N);
    assert_eq!(c.text().lines().count() as u64, w.written());
}

#[test]
fn reopen_after_a_rename_writes_to_the_new_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let w = AccessWriter::start(
        Dest::File(path.clone()),
        Options {
            format: Format::Json,
            ..Options::default()
        },
    )
    .expect("start");
    w.line(sample);
    w.line(sample);
    assert!(w.flush(Duration::from_secs(5)));
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).expect("rename");
    // Written after the rename, before the reopen: still goes to the renamed file.
    w.line(sample);
    w.reopen(Dest::File(path.clone()), Duration::from_secs(5))
        .expect("reopen");
    w.line(sample);
    assert!(w.flush(Duration::from_secs(5)));
    let old = std::fs::read_to_string(&rotated).expect("old");
    let new = std::fs::read_to_string(&path).expect("new");
    assert_eq!(old.lines().count(), 3, "{old}");
    assert_eq!(new.lines().count(), 1, "{new}");
    for l in old.lines().chain(new.lines()) {
        serde_json::from_str::<serde_json::Value>(l).expect("complete JSON line");
    }
}

#[test]
fn reopen_on_a_bad_path_keeps_the_old_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let w = AccessWriter::start(Dest::File(path.clone()), Options::default()).expect("start");
    let bad = dir.path().join("missing").join("x.log");
    assert!(w.reopen(Dest::File(bad), Duration::from_secs(5)).is_err());
    w.line(sample);
    assert!(w.flush(Duration::from_secs(5)));
    assert_eq!(
        std::fs::read_to_string(&path).expect("log").lines().count(),
        1
    );
}

/// The same fields through a `tracing` JSON subscriber: the reference the lines must match.
fn through_tracing(format: Format) -> String {
    let c = Capture::default();
    let c2 = c.clone();
    let sub = super::super::logging::subscriber(
        format,
        tracing_subscriber::EnvFilter::new("info"),
        move || c2.clone(),
    );
    tracing::subscriber::with_default(sub, || {
        tracing::info!(
            target: "access",
            method = %"GET",
            host = %"api.example.test",
            path = %"/v1/x",
            status = 200u16,
            duration_ms = 2.309,
            bytes = 5u64,
            complete = true,
            cluster = Some("api"),
            error = None::<&str>,
            request_id = "id-1",
            client = %SocketAddr::from(([127, 0, 0, 1], 4242)),
        );
    });
    c.text()
}

fn ours(format: Format) -> String {
    let c = Capture::default();
    let w = start(&c, format, 1 << 20, 4);
    w.line(|l| {
        l.bare("method", "GET");
        l.bare("host", "api.example.test");
        l.bare("path", "/v1/x");
        l.u64("status", 200);
        l.millis("duration_ms", Duration::from_micros(2309));
        l.u64("bytes", 5);
        l.bool("complete", true);
        l.quoted_opt("cluster", Some("api"));
        l.quoted_opt("error", None);
        l.quoted("request_id", "id-1");
        l.addr("client", ([127, 0, 0, 1], 4242).into());
    });
    assert!(w.flush(Duration::from_secs(5)));
    c.text()
}

#[test]
fn lines_read_as_the_tracing_subscriber_wrote_them() {
    // Text: identical after the timestamp.
    let (old, new) = (through_tracing(Format::Text), ours(Format::Text));
    assert_eq!(old[27..], new[27..], "\n{old}\n{new}");
    // JSON: the same text, timestamp aside.
    let strip = |s: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).expect("json");
        let ts = v["timestamp"].as_str().expect("timestamp").to_string();
        s.replacen(&ts, "", 1)
    };
    let (old, new) = (through_tracing(Format::Json), ours(Format::Json));
    assert_eq!(strip(&old), strip(&new), "\n{old}\n{new}");
}

/// The eight-byte scan finds a byte that needs an escape wherever it sits (in a word, in the
/// tail, first, last), and the result is what the byte-at-a-time escape wrote.
#[test]
fn escapes_found_at_every_position() {
    // The byte-at-a-time text escape, as a reference.
    fn text_reference(s: &str) -> Vec<u8> {
        let mut out = vec![b'"'];
        for c in s.chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                c if c.is_control() => {
                    let _ = write!(out, "{}", c.escape_default());
                }
                c => {
                    let mut b = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                }
            }
        }
        out.push(b'"');
        out
    }
    let specials = [
        "\"", "\\", "\n", "\u{1}", "\u{1f}", "\u{7f}", "é", "\u{85}", "\u{2028}",
    ];
    for len in 0..20 {
        for at in 0..=len {
            for sp in specials {
                let s: String = (0..len)
                    .map(|i| if i == at { sp } else { "a" })
                    .collect::<String>()
                    + if at == len { sp } else { "" };
                let mut json = Vec::new();
                json_string(&mut json, &s);
                let back: String = serde_json::from_slice(&json)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&json)));
                assert_eq!(back, s);
                let mut text = Vec::new();
                text_string(&mut text, &s);
                assert_eq!(text, text_reference(&s), "{s:?}");
            }
        }
    }
}
