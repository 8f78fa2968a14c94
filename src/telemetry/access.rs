//! The access log: one line per request, formatted and written off the tracing path.
//!
//! A request formats its line (JSON or key=value text, the fields and order of a `tracing`
//! event's JSON and text formats) straight into its thread's buffer. A full buffer goes to one
//! writer thread through a bounded channel; the writer also sweeps every thread's buffer at
//! least once a second, so a quiet thread's lines still show up, and on [`flush`]. When the
//! writer falls behind and the channel is full, the batch is dropped and its lines counted
//! (`edge_router_access_log_dropped_total`): a request never waits for the disk.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TrySendError};

use super::logging::Format;

mod format;
pub use format::push_ip;
use format::{civil, json_string, text_string};

/// A thread hands its buffer to the writer once it holds this much.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Batches waiting for the writer; beyond this they are dropped (4 MiB of lines).
pub const QUEUE_BATCHES: usize = 64;
/// The longest a line waits in a thread's buffer.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Where lines go.
pub enum Dest {
    Stdout,
    /// Appended to; created when missing.
    File(PathBuf),
    /// Anything else (tests).
    Writer(Box<dyn Write + Send>),
}

impl Dest {
    /// `path` when set, else stdout.
    pub fn from_path(path: Option<&Path>) -> Dest {
        match path {
            Some(p) => Dest::File(p.to_path_buf()),
            None => Dest::Stdout,
        }
    }
}

/// Tuning of one access log; [`Options::default`] is what the binary uses.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub format: Format,
    pub batch_bytes: usize,
    pub queue_batches: usize,
    pub sweep_every: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            format: Format::Text,
            batch_bytes: BATCH_BYTES,
            queue_batches: QUEUE_BATCHES,
            sweep_every: SWEEP_EVERY,
        }
    }
}

/// One access log: its writer thread and every thread's buffer.
pub struct AccessWriter {
    json: bool,
    batch_bytes: usize,
    batches: Sender<Batch>,
    control: Sender<Control>,
    /// Every thread's buffer, for the writer's sweep.
    locals: Mutex<Vec<Arc<Mutex<Local>>>>,
    dropped: AtomicU64,
    written: AtomicU64,
}

struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

enum Control {
    /// Sweep, write and flush everything, then answer.
    Flush(Sender<()>),
    /// Flush, then write to this from now on (logrotate moved the file away, or the config
    /// names another one); answers with the error when it cannot be opened.
    Reopen(Dest, Sender<Result<(), String>>),
}

/// One thread's buffer; also caches the formatted second of the timestamp.
struct Local {
    bytes: Vec<u8>,
    lines: u64,
    second: u64,
    stamp: [u8; 19],
}

impl Local {
    fn new(capacity: usize) -> Local {
        Local {
            bytes: Vec::with_capacity(capacity),
            lines: 0,
            second: u64::MAX,
            stamp: [0; 19],
        }
    }

    fn take(&mut self, capacity: usize) -> Batch {
        let bytes = std::mem::replace(&mut self.bytes, Vec::with_capacity(capacity));
        Batch {
            bytes,
            lines: std::mem::take(&mut self.lines),
        }
    }

    /// RFC 3339 in UTC with microseconds, as the tracing subscriber writes it.
    fn timestamp(&mut self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs();
        if secs != self.second {
            self.second = secs;
            self.stamp = civil(secs);
        }
        self.bytes.extend_from_slice(&self.stamp);
        let micros = now.subsec_micros();
        let mut frac = *b".000000Z";
        let mut m = micros;
        for i in (1..7).rev() {
            frac[i] = b'0' + (m % 10) as u8;
            m /= 10;
        }
        self.bytes.extend_from_slice(&frac);
    }
}

/// A thread's buffer in each access log it wrote to (one in the binary).
type ThreadBuffers = Vec<(Weak<AccessWriter>, Arc<Mutex<Local>>)>;

thread_local! {
    static LOCALS: RefCell<ThreadBuffers> =
        const { RefCell::new(Vec::new()) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while formatting leaves at worst a partial line; keep logging.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AccessWriter {
    /// Starts the writer thread on `dest`.
    pub fn start(dest: Dest, options: Options) -> Result<Arc<AccessWriter>, String> {
        let out = Output::open(dest)?;
        let (batches, batch_rx) = bounded(options.queue_batches.max(1));
        let (control, control_rx) = unbounded();
        let w = Arc::new(AccessWriter {
            json: options.format == Format::Json,
            batch_bytes: options.batch_bytes.max(1),
            batches,
            control,
            locals: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&w);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(weak, out, batch_rx, control_rx, options.sweep_every))
            .map_err(|e| format!("cannot start the access-log thread: {e}"))?;
        Ok(w)
    }

    /// Lines dropped because the writer fell behind or the destination failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lines handed to the destination.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Appends one line: `fields` writes them through [`Line`]. Never blocks on the writer.
    pub fn line(self: &Arc<Self>, fields: impl FnOnce(&mut Line<'_>)) {
        // The thread's buffer is used in place under the thread-local's borrow: no
        // reference count touched per line.
        let written = LOCALS.try_with(|l| {
            let me = Arc::as_ptr(self);
            let found = |l: &ThreadBuffers| l.iter().position(|(w, _)| Weak::as_ptr(w) == me);
            let known = found(&l.borrow());
            let at = match known {
                Some(at) => at,
                None => {
                    let mut l = l.borrow_mut();
                    l.retain(|(w, _)| w.strong_count() > 0);
                    let local = Arc::new(Mutex::new(Local::new(self.batch_bytes)));
                    lock(&self.locals).push(local.clone());
                    l.push((Arc::downgrade(self), local));
                    l.len() - 1
                }
            };
            self.write_line(&l.borrow()[at].1, fields);
        });
        if written.is_err() {
            // The thread is exiting: its buffer is gone.
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn write_line(&self, local: &Mutex<Local>, fields: impl FnOnce(&mut Line<'_>)) {
        let mut g = lock(local);
        let json = self.json;
        if json {
            g.bytes.extend_from_slice(b"{\"timestamp\":\"");
            g.timestamp();
            g.bytes.extend_from_slice(b"\",\"level\":\"INFO\"");
        } else {
            g.timestamp();
            g.bytes.extend_from_slice(b"  INFO access:");
        }
        let mut line = Line {
            out: &mut g.bytes,
            json,
        };
        fields(&mut line);
        if json {
            g.bytes.extend_from_slice(b",\"target\":\"access\"}\n");
        } else {
            g.bytes.push(b'\n');
        }
        g.lines += 1;
        if g.bytes.len() >= self.batch_bytes {
            let batch = g.take(self.batch_bytes);
            drop(g);
            self.hand_over(batch);
        }
    }

    fn hand_over(&self, batch: Batch) {
        match self.batches.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(b)) | Err(TrySendError::Disconnected(b)) => {
                self.dropped.fetch_add(b.lines, Ordering::Relaxed);
            }
        }
    }

    /// Writes every buffered line and flushes the destination; waits up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = bounded(1);
        self.control.send(Control::Flush(tx)).is_ok() && rx.recv_timeout(timeout).is_ok()
    }

    /// Writes what is buffered, then switches to `dest` (the same path again after
    /// logrotate moved the file). On an error the old destination stays.
    pub fn reopen(&self, dest: Dest, timeout: Duration) -> Result<(), String> {
        let (tx, rx) = bounded(1);
        self.control
            .send(Control::Reopen(dest, tx))
            .map_err(|_| "the access-log thread has stopped".to_string())?;
        rx.recv_timeout(timeout)
            .map_err(|_| "the access-log thread did not answer".to_string())?
    }
}

/// The fields of one line, written in place: JSON members or ` key=value` pairs.
pub struct Line<'a> {
    out: &'a mut Vec<u8>,
    json: bool,
}

impl Line<'_> {
    fn key(&mut self, key: &str) {
        if self.json {
            self.out.extend_from_slice(b",\"");
            self.out.extend_from_slice(key.as_bytes());
            self.out.extend_from_slice(b"\":");
        } else {
            self.out.push(b' ');
            self.out.extend_from_slice(key.as_bytes());
            self.out.push(b'=');
        }
    }

    /// A value written bare in text (`method=GET`), a string in JSON.
    pub fn bare(&mut self, key: &str, value: &str) {
        self.key(key);
        if self.json {
            json_string(self.out, value);
        } else {
            self.out.extend_from_slice(value.as_bytes());
        }
    }

    /// A value quoted in both formats (`cluster="api"`).
    pub fn quoted(&mut self, key: &str, value: &str) {
        self.key(key);
        if self.json {
            json_string(self.out, value);
        } else {
            text_string(self.out, value);
        }
    }

    /// [`Line::quoted`], left out when `None`.
    pub fn quoted_opt(&mut self, key: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.quoted(key, v);
        }
    }

    pub fn u64(&mut self, key: &str, value: u64) {
        self.key(key);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    /// Milliseconds with microsecond precision: `2.309`, never `2.3089679999999997`.
    pub fn millis(&mut self, key: &str, d: Duration) {
        self.key(key);
        let micros = d.as_micros().min(u64::MAX as u128) as u64;
        let mut b = itoa::Buffer::new();
        self.out
            .extend_from_slice(b.format(micros / 1000).as_bytes());
        let frac = micros % 1000;
        self.out.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }

    /// An address, bare in text, a string in JSON.
    pub fn addr(&mut self, key: &str, a: SocketAddr) {
        self.key(key);
        if self.json {
            self.out.push(b'"');
        }
        match a {
            SocketAddr::V4(v4) => {
                push_ip(self.out, IpAddr::V4(*v4.ip()));
                self.out.push(b':');
                self.out
                    .extend_from_slice(itoa::Buffer::new().format(v4.port()).as_bytes());
            }
            // Formats into the buffer: no allocation.
            SocketAddr::V6(_) => {
                let _ = write!(self.out, "{a}");
            }
        }
        if self.json {
            self.out.push(b'"');
        }
    }
}

/// The destination, open.
enum Output {
    Stdout,
    File(File),
    Writer(Box<dyn Write + Send>),
}

impl Output {
    fn open(dest: Dest) -> Result<Output, String> {
        Ok(match dest {
            Dest::Stdout => Output::Stdout,
            Dest::File(p) => Output::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|e| format!("cannot open {}: {e}", p.display()))?,
            ),
            Dest::Writer(w) => Output::Writer(w),
        })
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            // One locked write per batch: lines never interleave with other logs.
            Output::Stdout => std::io::stdout().lock().write_all(b),
            Output::File(f) => f.write_all(b),
            Output::Writer(w) => w.write_all(b),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::Stdout => std::io::stdout().lock().flush(),
            Output::File(f) => f.flush(),
            Output::Writer(w) => w.flush(),
        }
    }
}

/// The writer thread: batches as they come, a sweep of every buffer each `sweep_every`,
/// control requests. Ends when the log is dropped; lines still buffered then are the
/// caller's to [`flush`] first (the drain does).
fn writer(
    log: Weak<AccessWriter>,
    mut out: Output,
    batches: Receiver<Batch>,
    control: Receiver<Control>,
    sweep_every: Duration,
) {
    let mut last_error: Option<Instant> = None;
    let mut write = |out: &mut Output, b: Batch| {
        if b.bytes.is_empty() {
            return;
        }
        let Some(log) = log.upgrade() else { return };
        match out.write_all(&b.bytes) {
            Ok(()) => {
                log.written.fetch_add(b.lines, Ordering::Relaxed);
            }
            Err(e) => {
                log.dropped.fetch_add(b.lines, Ordering::Relaxed);
                // One warning a minute is enough to say the disk is full.
                if !matches!(last_error, Some(t) if t.elapsed() <= Duration::from_secs(60)) {
                    last_error = Some(Instant::now());
                    tracing::warn!(target: "proxy", "access log: write failed, lines dropped: {e}");
                }
            }
        }
    };
    let sweep = |out: &mut Output, write: &mut dyn FnMut(&mut Output, Batch)| {
        while let Ok(b) = batches.try_recv() {
            write(out, b);
        }
        let Some(log) = log.upgrade() else { return };
        let locals: Vec<_> = {
            let mut l = lock(&log.locals);
            // A buffer only the registry holds belongs to a thread that has exited: this
            // is its last sweep.
            let all = l.clone();
            l.retain(|b| Arc::strong_count(b) > 2);
            all
        };
        let cap = log.batch_bytes;
        for b in locals {
            let batch = {
                let mut g = lock(&b);
                if g.lines == 0 {
                    continue;
                }
                g.take(cap)
            };
            write(out, batch);
        }
        let _ = out.flush();
    };
    let mut next_sweep = Instant::now() + sweep_every;
    loop {
        let wait = next_sweep.saturating_duration_since(Instant::now());
        crossbeam_channel::select! {
            recv(batches) -> b => match b {
                Ok(b) => write(&mut out, b),
                Err(_) => return,
            },
            recv(control) -> c => match c {
                Ok(Control::Flush(ack)) => {
                    sweep(&mut out, &mut write);
                    let _ = ack.send(());
                }
                Ok(Control::Reopen(dest, ack)) => {
                    sweep(&mut out, &mut write);
                    let r = Output::open(dest).map(|o| out = o);
                    let _ = ack.send(r);
                }
                Err(_) => return,
            },
            default(wait) => {}
        }
        if Instant::now() >= next_sweep {
            sweep(&mut out, &mut write);
            next_sweep = Instant::now() + sweep_every;
        }
        if log.strong_count() == 0 {
            return;
        }
    }
}

// The process's access log: started by the binary once logging is set up (see
// [`configure`]); without it access lines go nowhere.

static SETTINGS: OnceLock<Format> = OnceLock::new();
static GLOBAL: OnceLock<Arc<AccessWriter>> = OnceLock::new();

/// Called by [`super::logging::init`]: the access log takes the log format, and is on only
/// when RUST_LOG lets the `access` target through at info.
pub fn configure(format: Format, enabled: bool) {
    if enabled {
        let _ = SETTINGS.set(format);
    }
}

/// Starts the process's access log on `path` (stdout when `None`) when the binary set up
/// logging; a second call reopens on `path`. Errors say why the file cannot be opened.
pub fn start(path: Option<&Path>) -> Result<(), String> {
    let Some(format) = SETTINGS.get() else {
        return Ok(());
    };
    if GLOBAL.get().is_some() {
        return reopen(path);
    }
    let w = AccessWriter::start(
        Dest::from_path(path),
        Options {
            format: *format,
            ..Options::default()
        },
    )?;
    let _ = GLOBAL.set(w);
    Ok(())
}

/// The process's access log, when it has one.
pub fn global() -> Option<&'static Arc<AccessWriter>> {
    GLOBAL.get()
}

/// Reopens the process's access log (logrotate, or a new path after a reload).
pub fn reopen(path: Option<&Path>) -> Result<(), String> {
    match GLOBAL.get() {
        Some(w) => w.reopen(Dest::from_path(path), Duration::from_secs(5)),
        None => Ok(()),
    }
}

/// Writes every buffered line of the process's access log (drain, exit).
pub fn flush() {
    if let Some(w) = GLOBAL.get() {
        w.flush(Duration::from_secs(5));
    }
}

/// Lines the process's access log dropped.
pub fn dropped_total() -> u64 {
    GLOBAL.get().map_or(0, |w| w.dropped())
}

/// `edge_router_access_log_dropped_total`, read from the process's access log at scrape.
pub struct DroppedCollector {
    desc: prometheus::core::Desc,
}

impl DroppedCollector {
    pub const NAME: &'static str = "edge_router_access_log_dropped_total";
    const HELP: &'static str =
        "Access-log lines dropped because the writer fell behind or the destination failed.";

    pub fn new() -> prometheus::Result<DroppedCollector> {
        Ok(DroppedCollector {
            desc: prometheus::core::Desc::new(
                Self::NAME.into(),
                Self::HELP.into(),
                Vec::new(),
                Default::default(),
            )?,
        })
    }
}

impl prometheus::core::Collector for DroppedCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        match prometheus::IntCounter::new(Self::NAME, Self::HELP) {
            Ok(c) => {
                c.inc_by(dropped_total());
                prometheus::core::Collector::collect(&c)
            }
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
