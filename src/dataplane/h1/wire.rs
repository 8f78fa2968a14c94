//! HTTP/1.1 on the wire, without I/O: body framing (RFC 9112 section 6), the chunked-body
//! scanner, hop-by-hop header rules and the cached Date header. Everything here works on byte
//! slices so the connection loop in [`super`] can parse in place and copy headers through
//! without building a `HeaderMap`.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// How a message's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (GET without Content-Length, HEAD responses, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// A response body that ends when the upstream closes the connection.
    Close,
}

/// Why a message head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Content-Length and Transfer-Encoding together, or Content-Length values that differ
    /// or are not numbers: the framing is ambiguous (request smuggling).
    Framing,
    /// A Transfer-Encoding whose last coding is not chunked.
    Coding,
}

/// `Content-Length` value(s): each header may be a list ("5, 5"); all must agree.
pub fn content_length(acc: Option<u64>, value: &[u8]) -> Result<u64, Bad> {
    let mut out = acc;
    for part in value.split(|b| *b == b',') {
        let part = trim(part);
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(Bad::Framing);
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        match out {
            Some(prev) if prev != n => return Err(Bad::Framing),
            _ => out = Some(n),
        }
    }
    out.ok_or(Bad::Framing)
}

/// Whether a Transfer-Encoding value ends in `chunked`; a `chunked` anywhere but last (or
/// twice) is an error, as RFC 9112 section 6.1 requires of a recipient.
pub fn ends_chunked(value: &[u8]) -> Result<bool, Bad> {
    let codings: Vec<&[u8]> = value
        .split(|b| *b == b',')
        .map(trim)
        .filter(|c| !c.is_empty())
        .collect();
    let chunked = |c: &&[u8]| c.eq_ignore_ascii_case(b"chunked");
    match codings.iter().position(chunked) {
        None => Ok(false),
        Some(i) if i + 1 == codings.len() => Ok(true),
        Some(_) => Err(Bad::Coding),
    }
}

pub fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &s[start..end]
}

/// Comma-separated tokens of a header value, trimmed, empty ones skipped.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(trim)
        .filter(|t| !t.is_empty())
}

/// What the `Connection` header(s) of a message say.
#[derive(Default)]
pub struct ConnectionOptions<'a> {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    /// Other options: header names the sender marked hop-by-hop.
    pub named: Vec<&'a [u8]>,
}

impl<'a> ConnectionOptions<'a> {
    pub fn add(&mut self, value: &'a [u8]) {
        for t in tokens(value) {
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if t.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else {
                self.named.push(t);
            }
        }
    }

    /// Whether `name` is listed in Connection (and so is hop-by-hop). `te` stays end-to-end
    /// when it says `trailers` (gRPC needs it); see [`is_hop_by_hop`].
    pub fn names(&self, name: &[u8]) -> bool {
        !name.eq_ignore_ascii_case(b"te") && self.named.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1). `te` is
/// kept when it is exactly `trailers`. Framing headers are not in this list: the caller
/// writes its own.
pub fn is_hop_by_hop(name: &[u8], value: &[u8]) -> bool {
    const NAMES: [&[u8]; 8] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    if name.eq_ignore_ascii_case(b"te") {
        return value != b"trailers";
    }
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Appends `name: value\r\n`.
pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub fn put_u64(out: &mut Vec<u8>, n: u64) {
    let mut b = itoa::Buffer::new();
    out.extend_from_slice(b.format(n).as_bytes());
}

/// Finds where a chunked body ends while its bytes are copied through unchanged: the chunk
/// sizes, extensions and trailers are checked and counted, never rewritten. Lines (size line
/// with its extensions, each trailer) are limited so a peer cannot stream an endless line.
#[derive(Debug, Default)]
pub struct ChunkScanner {
    state: Chunk,
    size: u64,
    digits: u8,
    line: usize,
    /// Chunk data bytes seen so far (the body without its framing).
    pub data: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    #[default]
    SizeStart,
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
}

/// A control byte that may not appear in a field line (HTAB may).
fn is_ctl(c: u8) -> bool {
    (c < 0x20 && c != b'\t') || c == 0x7f
}

/// The longest chunk-size line or trailer line accepted.
const MAX_CHUNK_LINE: usize = 8 * 1024;

impl ChunkScanner {
    /// Scans the next bytes of the body. `Ok(Some(n))`: the body ends after the first `n`
    /// bytes of `buf`. `Ok(None)`: all of `buf` is body and more follows.
    #[allow(clippy::result_unit_err)]
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, ()> {
        let mut at = 0;
        while at < buf.len() {
            let step = self.next_data(&buf[at..])?;
            at += step.framing + step.data;
            if step.end {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    /// Scans up to the next run of chunk data: for a decoder, which passes the data on
    /// and drops the framing around it.
    #[allow(clippy::result_unit_err)]
    pub fn next_data(&mut self, buf: &[u8]) -> Result<ChunkStep, ()> {
        let mut i = 0;
        while i < buf.len() {
            if self.state == Chunk::Data {
                let take = self.size.min((buf.len() - i) as u64);
                self.size -= take;
                self.data += take;
                if self.size == 0 {
                    self.state = Chunk::DataCr;
                }
                return Ok(ChunkStep {
                    framing: i,
                    data: take as usize,
                    end: false,
                });
            }
            let b = buf[i];
            i += 1;
            self.state = match (self.state, b) {
                (Chunk::SizeStart, _) => {
                    self.size = u64::from(hex(b)?);
                    self.digits = 1;
                    self.line = 1;
                    Chunk::Size
                }
                (Chunk::Size, b'\r') => Chunk::SizeLf,
                (Chunk::Size, b';' | b' ' | b'\t') => Chunk::Ext,
                (Chunk::Size, _) => {
                    self.digits += 1;
                    if self.digits > 15 {
                        return Err(());
                    }
                    self.size = self.size * 16 + u64::from(hex(b)?);
                    Chunk::Size
                }
                (Chunk::Ext, b'\r') => Chunk::SizeLf,
                (Chunk::Ext, b'\n') => return Err(()),
                (Chunk::Ext, _) => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(());
                    }
                    Chunk::Ext
                }
                (Chunk::SizeLf, b'\n') if self.size == 0 => Chunk::TrailerStart,
                (Chunk::SizeLf, b'\n') => Chunk::Data,
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::SizeStart,
                (Chunk::TrailerStart, b'\r') => Chunk::FinalLf,
                (Chunk::TrailerStart, b'\n') => return Err(()),
                // A trailer line starting with whitespace is obs-fold (RFC 9112 5.2), and a
                // control byte has no place in a field (RFC 9110 5.5): refused, as hyper
                // does, rather than relayed to a peer that may read them differently.
                (Chunk::TrailerStart | Chunk::Trailer, c) if c != b'\r' && is_ctl(c) => {
                    return Err(())
                }
                (Chunk::TrailerStart, b' ' | b'\t') => return Err(()),
                (Chunk::TrailerStart, _) => {
                    self.line = 1;
                    Chunk::Trailer
                }
                (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
                (Chunk::Trailer, b'\n') => return Err(()),
                (Chunk::Trailer, _) => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(());
                    }
                    Chunk::Trailer
                }
                (Chunk::TrailerLf, b'\n') => Chunk::TrailerStart,
                (Chunk::FinalLf, b'\n') => {
                    self.state = Chunk::Done;
                    return Ok(ChunkStep {
                        framing: i,
                        data: 0,
                        end: true,
                    });
                }
                _ => return Err(()),
            };
        }
        Ok(ChunkStep {
            framing: i,
            data: 0,
            end: false,
        })
    }
}

/// What [`ChunkScanner::next_data`] found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkStep {
    /// Framing bytes first (sizes, extensions, line ends, trailers).
    pub framing: usize,
    /// Then this many bytes of chunk data (none when the framing ran to the buffer's end).
    pub data: usize,
    /// The body ended with the framing.
    pub end: bool,
}

fn hex(b: u8) -> Result<u8, ()> {
    match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err(()),
    }
}

/// Tracks where a body ends as its bytes pass through.
#[derive(Debug)]
pub enum BodyEnd {
    Length(u64),
    Chunked(ChunkScanner),
    Close,
}

impl BodyEnd {
    pub fn new(f: Framing) -> BodyEnd {
        match f {
            Framing::None => BodyEnd::Length(0),
            Framing::Length(n) => BodyEnd::Length(n),
            Framing::Chunked => BodyEnd::Chunked(ChunkScanner::default()),
            Framing::Close => BodyEnd::Close,
        }
    }

    /// Body bytes so far without framing: what the client's body holds.
    pub fn payload(&self, raw: u64) -> u64 {
        match self {
            BodyEnd::Chunked(s) => s.data,
            _ => raw,
        }
    }

    /// How many bytes of `buf` belong to the body, and whether the body ends there.
    #[allow(clippy::result_unit_err)]
    pub fn take(&mut self, buf: &[u8]) -> Result<(usize, bool), ()> {
        match self {
            BodyEnd::Length(left) => {
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                Ok((n as usize, *left == 0))
            }
            BodyEnd::Chunked(s) => Ok(match s.scan(buf)? {
                Some(n) => (n, true),
                None => (buf.len(), false),
            }),
            BodyEnd::Close => Ok((buf.len(), false)),
        }
    }

    pub fn is_done(&self) -> bool {
        match self {
            BodyEnd::Length(left) => *left == 0,
            BodyEnd::Chunked(s) => s.state == Chunk::Done,
            BodyEnd::Close => false,
        }
    }
}

thread_local! {
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
}

/// Appends `date: <IMF-fixdate>\r\n`, formatted once a second per thread.
pub fn put_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() == 29 {
                d.1.copy_from_slice(s.as_bytes());
                d.0 = secs;
            }
        }
        put_header(out, b"date", &d.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(parts: &[&[u8]]) -> Result<Option<usize>, ()> {
        let mut s = ChunkScanner::default();
        let mut total = 0;
        for p in parts {
            if let Some(n) = s.scan(p)? {
                return Ok(Some(total + n));
            }
            total += p.len();
        }
        Ok(None)
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers_in_any_split() {
        let body: &[u8] =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        assert_eq!(scan_all(&[body]), Ok(Some(end)));
        for cut in 1..body.len() {
            assert_eq!(
                scan_all(&[&body[..cut], &body[cut..]]),
                Ok(Some(end)),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn decoding_passes_the_chunk_data_alone_in_any_split() {
        let body: &[u8] =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\n";
        for cut in 0..=body.len() {
            let mut s = ChunkScanner::default();
            let mut data = Vec::new();
            let mut ended = false;
            for part in [&body[..cut], &body[cut..]] {
                let mut at = 0;
                while at < part.len() && !ended {
                    let step = s.next_data(&part[at..]).expect("valid");
                    at += step.framing;
                    data.extend_from_slice(&part[at..at + step.data]);
                    at += step.data;
                    ended = step.end;
                }
            }
            assert!(ended, "cut {cut}");
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz", "cut {cut}");
        }
    }

    #[test]
    fn trailers_with_obs_fold_or_control_bytes_are_refused() {
        let ok: &[u8] = b"0\r\nx-sum: a\tb\r\n\r\n";
        assert_eq!(scan_all(&[ok]), Ok(Some(ok.len())));
        for bad in [
            b"0\r\nx-sum: a\0b\r\n\r\n".as_slice(),
            b"0\r\nx-sum: a\r\n folded\r\n\r\n",
            b"0\r\nx-sum: a\r\n\tfolded\r\n\r\n",
            b"0\r\nx-sum: a\x7fb\r\n\r\n",
            b"0\r\n\x01x: a\r\n\r\n",
        ] {
            assert_eq!(
                scan_all(&[bad]),
                Err(()),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn bad_chunk_framing_is_refused() {
        assert_eq!(scan_all(&[b"zz\r\n"]), Err(()));
        assert_eq!(scan_all(&[b"5\r\nhelloX\r\n"]), Err(()));
        assert_eq!(scan_all(&[b"5\nhello"]), Err(()));
        assert_eq!(scan_all(&[b"ffffffffffffffff\r\n"]), Err(()));
        assert_eq!(scan_all(&[b"0\r\nbad\n\r\n"]), Err(()));
    }

    #[test]
    fn content_length_values_must_agree_and_be_digits() {
        assert_eq!(content_length(None, b"42"), Ok(42));
        assert_eq!(content_length(None, b"5, 5"), Ok(5));
        assert_eq!(content_length(Some(5), b"5"), Ok(5));
        assert_eq!(content_length(Some(5), b"6"), Err(Bad::Framing));
        assert_eq!(content_length(None, b"5, 6"), Err(Bad::Framing));
        assert_eq!(content_length(None, b"-1"), Err(Bad::Framing));
        assert_eq!(content_length(None, b"+1"), Err(Bad::Framing));
        assert_eq!(content_length(None, b""), Err(Bad::Framing));
        assert_eq!(
            content_length(None, b"99999999999999999999"),
            Err(Bad::Framing)
        );
    }

    #[test]
    fn transfer_encoding_must_end_in_chunked_once() {
        assert_eq!(ends_chunked(b"chunked"), Ok(true));
        assert_eq!(ends_chunked(b"gzip, Chunked"), Ok(true));
        assert_eq!(ends_chunked(b"gzip"), Ok(false));
        assert_eq!(ends_chunked(b"chunked, gzip"), Err(Bad::Coding));
    }

    #[test]
    fn connection_options_name_hop_by_hop_headers() {
        let mut c = ConnectionOptions::default();
        c.add(b"close, X-Secret");
        c.add(b"te");
        assert!(c.close && !c.keep_alive && !c.upgrade);
        assert!(c.names(b"x-secret"));
        assert!(!c.names(b"te"));
        assert!(is_hop_by_hop(b"Keep-Alive", b"x"));
        assert!(is_hop_by_hop(b"TE", b"gzip"));
        assert!(!is_hop_by_hop(b"te", b"trailers"));
        assert!(!is_hop_by_hop(b"content-length", b"1"));
    }

    #[test]
    fn body_end_counts_lengths_and_passes_close_delimited_bodies() {
        let mut b = BodyEnd::new(Framing::Length(5));
        assert_eq!(b.take(b"abc"), Ok((3, false)));
        assert_eq!(b.take(b"defg"), Ok((2, true)));
        assert!(b.is_done());
        let mut c = BodyEnd::new(Framing::Close);
        assert_eq!(c.take(b"abc"), Ok((3, false)));
        assert!(!c.is_done());
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    /// A small deterministic generator: the same inputs every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Chunked bodies made of valid and broken pieces: the scanner never panics, and its
    /// answer does not depend on how the bytes are split across reads.
    #[test]
    fn the_chunk_scanner_answers_the_same_for_any_split_and_never_panics() {
        const PIECES: [&[u8]; 14] = [
            b"5\r\nhello\r\n",
            b"0\r\n\r\n",
            b"A;x=y\r\n0123456789\r\n",
            b"0\r\nT: 1\r\n\r\n",
            b"\r\n",
            b"\n",
            b"ZZ",
            b"1\r\nx\r\n",
            b";",
            b"fffffffffffffffff\r\n",
            b"0\r\n",
            b"3\r\nab",
            b"\r",
            b"x",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut body = Vec::new();
            for _ in 0..rng.below(8) + 1 {
                body.extend_from_slice(PIECES[rng.below(PIECES.len())]);
            }
            let whole = ChunkScanner::default().scan(&body);
            let cut = rng.below(body.len() + 1);
            let mut s = ChunkScanner::default();
            let split = match s.scan(&body[..cut]) {
                Ok(Some(n)) => Ok(Some(n)),
                Ok(None) => s.scan(&body[cut..]).map(|r| r.map(|n| n + cut)),
                Err(()) => Err(()),
            };
            assert_eq!(
                whole,
                split,
                "{:?} cut at {cut}",
                String::from_utf8_lossy(&body)
            );
        }
    }
}
