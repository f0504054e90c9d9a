//! The time of an access log line: RFC 3339, UTC, milliseconds (`2026-11-22T09:12:27.976Z`).
//!
//! The date and time of day change once a second, so each thread keeps them for the current
//! second and writes only the milliseconds for each line. Formatting the whole string with
//! `format!` per line (the old way) was a fresh `String` and about 20 `fmt` calls per request.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

/// `YYYY-MM-DDTHH:MM:SS.`: what stays the same for a second.
const PREFIX: usize = 20;

thread_local! {
    /// The second (since the epoch) the prefix was made for, and the prefix.
    static SECOND: Cell<(u64, [u8; PREFIX])> = const { Cell::new((u64::MAX, [0; PREFIX])) };
}

/// Appends the time `t` (24 bytes) to `out`.
pub fn append(t: SystemTime, out: &mut Vec<u8>) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let prefix = SECOND
        .try_with(|c| {
            let (cached, prefix) = c.get();
            if cached == secs {
                return prefix;
            }
            let prefix = second_prefix(secs);
            c.set((secs, prefix));
            prefix
        })
        // The thread's locals are gone (a line from a destructor at thread exit).
        .unwrap_or_else(|_| second_prefix(secs));
    out.extend_from_slice(&prefix);
    let ms = d.subsec_millis();
    out.extend_from_slice(&[
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
    ]);
}

/// RFC 3339 UTC time with milliseconds, e.g. `2026-11-22T09:12:27.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let mut out = Vec::with_capacity(PREFIX + 4);
    append(t, &mut out);
    // Only ASCII digits and separators were written.
    String::from_utf8(out).unwrap_or_default()
}

/// The date and time of day of second `secs` since the epoch, and the `.` before milliseconds.
/// Years past 9999 (a clock set absurdly far ahead) are written as 9999.
fn second_prefix(secs: u64) -> [u8; PREFIX] {
    let secs = secs as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = (yoe + era * 400 + i64::from(month <= 2)).clamp(0, 9999);
    let mut p = *b"0000-00-00T00:00:00.";
    let mut digits = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            p[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    digits(0, 4, year);
    digits(5, 2, month);
    digits(8, 2, day);
    digits(11, 2, rem / 3600);
    digits(14, 2, rem % 3600 / 60);
    digits(17, 2, rem % 60);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_338_747_976);
        assert_eq!(rfc3339(t), "2026-11-22T09:12:27.976Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
        let last = UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
        assert_eq!(rfc3339(last), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn the_cached_second_follows_the_clock() {
        // Same second, then the next one, then back (a clock stepped backwards).
        let base = UNIX_EPOCH + Duration::from_millis(1_795_338_747_001);
        assert_eq!(rfc3339(base), "2026-11-22T09:12:27.001Z");
        assert_eq!(
            rfc3339(base + Duration::from_millis(998)),
            "2026-11-22T09:12:27.999Z"
        );
        assert_eq!(
            rfc3339(base + Duration::from_millis(999)),
            "2026-11-22T09:12:28.000Z"
        );
        assert_eq!(rfc3339(base), "2026-11-22T09:12:27.001Z");
    }

    #[test]
    fn every_day_of_four_centuries_matches_a_plain_calendar() {
        // The cached path against a day-by-day count from 1970 (leap years by the rules).
        let (mut y, mut m, mut d) = (1970, 1, 1);
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        for day in 0..146_097 {
            let t = UNIX_EPOCH + Duration::from_secs(day * 86_400 + 3_723);
            assert_eq!(rfc3339(t), format!("{y:04}-{m:02}-{d:02}T01:02:03.000Z"));
            let len = match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > len {
                (d, m) = (1, m + 1);
                if m > 12 {
                    (m, y) = (1, y + 1);
                }
            }
        }
    }
}
