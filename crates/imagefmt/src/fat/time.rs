//! FAT timestamps: local-free DOS date and time, counted from 1980.

/// A DOS date and time pair as stored in directory entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DosTime {
    pub(crate) date: u16,
    pub(crate) time: u16,
}

/// 1980-01-01T00:00:00Z, the earliest time FAT can store.
const FAT_EPOCH: i64 = 315_532_800;
/// 2107-12-31T23:59:58Z, the latest.
const FAT_END: i64 = 4_354_819_198;

impl DosTime {
    /// Converts Unix seconds (read as UTC) to DOS time, clamped to FAT's
    /// range and rounded down to its two-second resolution.
    pub(crate) fn from_unix(secs: i64) -> DosTime {
        let secs = secs.clamp(FAT_EPOCH, FAT_END);
        let days = secs.div_euclid(86_400);
        let of_day = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        let date = ((year - 1980) as u16) << 9 | (month as u16) << 5 | day as u16;
        let (h, m, s) = (of_day / 3600, of_day / 60 % 60, of_day % 60);
        let time = (h as u16) << 11 | (m as u16) << 5 | (s / 2) as u16;
        DosTime { date, time }
    }
}

/// Howard Hinnant's days-to-civil: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    fn show(secs: i64) -> String {
        let t = DosTime::from_unix(secs);
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            1980 + (t.date >> 9),
            t.date >> 5 & 0xF,
            t.date & 0x1F,
            t.time >> 11,
            t.time >> 5 & 0x3F,
            (t.time & 0x1F) * 2
        )
    }

    #[test]
    fn conversions() {
        let cases = [0, FAT_EPOCH, 951_782_400 /* 2000-02-29 */, 1_700_000_001, 1_709_164_799, i64::MAX, i64::MIN];
        let out: Vec<String> = cases.iter().map(|&s| format!("{s} -> {}", show(s))).collect();
        expect![[r#"
            0 -> 1980-01-01 00:00:00
            315532800 -> 1980-01-01 00:00:00
            951782400 -> 2000-02-29 00:00:00
            1700000001 -> 2023-11-14 22:13:20
            1709164799 -> 2024-02-28 23:59:58
            9223372036854775807 -> 2107-12-31 23:59:58
            -9223372036854775808 -> 1980-01-01 00:00:00"#]]
        .assert_eq(&out.join("\n"));
    }
}
