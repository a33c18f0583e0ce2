//! Sizes and CPU amounts as operators write them: `512Mi`, `2GiB`, `1G`, `500m`, `0.5`.

/// Bytes from a number with an optional unit: `k`/`K`, `M`, `G`, `T` (powers of 1000, also
/// with `B`), `Ki`, `Mi`, `Gi`, `Ti` (powers of 1024, also with `B`), or none (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 512Mi, 2GiB or 1000000"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let factor: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024f64.powi(2),
        "gi" => 1024f64.powi(3),
        "ti" => 1024f64.powi(4),
        _ => {
            return Err(format!(
                "`{s}` has an unknown unit; use k, M, G, T, Ki, Mi, Gi or Ti"
            ));
        }
    };
    let v = num * factor;
    if !(v.is_finite() && v >= 1.0 && v < u64::MAX as f64) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(v.round() as u64)
}

/// Thousandths of a core from `500m`, `0.5` or `2` (cores).
pub fn parse_cpu(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let millis = match t.strip_suffix('m') {
        Some(m) => m.trim().parse::<f64>(),
        None => t.parse::<f64>().map(|c| c * 1000.0),
    }
    .map_err(|_| format!("`{s}` is not a CPU amount such as 500m, 0.5 or 2"))?;
    if !(millis.is_finite() && (1.0..=1_000_000.0).contains(&millis)) {
        return Err(format!("`{s}` is out of range (1m to 1000 cores)"));
    }
    Ok(millis.round() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_cpus_parse_as_written() {
        assert_eq!(parse_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("8gib").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(
            parse_bytes("lots").is_err()
                && parse_bytes("1Qi").is_err()
                && parse_bytes("0").is_err()
        );
        assert_eq!(parse_cpu("500m").unwrap(), 500);
        assert_eq!(parse_cpu("0.25").unwrap(), 250);
        assert_eq!(parse_cpu("2").unwrap(), 2000);
        assert!(parse_cpu("fast").is_err() && parse_cpu("0").is_err());
    }
}
