//! The pieces of a line: strings escaped for JSON or text, addresses and timestamps written
//! without the formatter, which costs more than the rest of the line.

use std::io::Write;
use std::net::IpAddr;

/// Appends `ip` as text, as `Display` writes it. IPv4, the usual case, is written by hand:
/// `Display` goes through the formatter for every octet.
pub fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = itoa::Buffer::new();
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(b.format(o).as_bytes());
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// How many leading bytes of `b` need no escape: no control byte (below 0x20), quote or
/// backslash, and with `ascii` no DEL or non-ASCII byte either. Eight bytes at a time, as
/// most values (hosts, paths, names, ids) need none.
fn plain_prefix(b: &[u8], ascii: bool) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A high bit for each zero byte of `v` (exact as to whether there is any).
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let mut i = 0;
    while let Some(chunk) = b.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let v = u64::from_le_bytes(word);
        let mut hit = (v.wrapping_sub(ONES * 0x20) & !v & HIGH)
            | zero(v ^ (ONES * u64::from(b'"')))
            | zero(v ^ (ONES * u64::from(b'\\')));
        if ascii {
            hit |= (v & HIGH) | zero(v ^ (ONES * 0x7f));
        }
        if hit != 0 {
            break;
        }
        i += 8;
    }
    let special = |c: u8| c < 0x20 || c == b'"' || c == b'\\' || (ascii && c >= 0x7f);
    i + b[i..]
        .iter()
        .position(|&c| special(c))
        .unwrap_or(b.len() - i)
}

/// A JSON string with the escapes RFC 8259 requires.
pub(super) fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let b = s.as_bytes();
    let start = plain_prefix(b, false);
    out.extend_from_slice(&b[..start]);
    let b = &b[start..];
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&b[start..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(c >> 4) as usize]);
            out.push(HEX[(c & 0xf) as usize]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

/// A quoted text value: quotes, backslashes and control characters escaped, so a line is
/// always one line.
pub(super) fn text_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let plain = plain_prefix(s.as_bytes(), true);
    // At a char boundary: every byte before it is ASCII.
    let (head, rest) = s.split_at(plain);
    out.extend_from_slice(head.as_bytes());
    for c in rest.chars() {
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
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time (proleptic Gregorian, UTC).
pub(super) fn civil(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date: H. Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut s = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            s[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, rem / 3600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    s
}
