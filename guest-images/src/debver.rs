//! Debian version ordering (dpkg's `verrevcmp`), used to pick the newest kernel ABI.

use std::cmp::Ordering;

/// Weight of a non-digit character in dpkg's ordering: `~` sorts before everything, even the
/// end of the string; letters sort before non-letters.
fn order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// Compares two version fragments (upstream or revision) like dpkg.
fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
    let (mut i, mut j) = (0usize, 0usize);
    while i < a.len() || j < b.len() {
        // Non-digit prefix.
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let ac = order(a.get(i).copied().filter(|c| !c.is_ascii_digit()));
            let bc = order(b.get(j).copied().filter(|c| !c.is_ascii_digit()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            if i < a.len() && !a[i].is_ascii_digit() {
                i += 1;
            }
            if j < b.len() && !b[j].is_ascii_digit() {
                j += 1;
            }
        }
        // Digit run: skip leading zeros, then longer is larger, then lexical.
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let da = a[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        let db = b[j..].iter().take_while(|c| c.is_ascii_digit()).count();
        let ord = da.cmp(&db).then_with(|| a[i..i + da].cmp(&b[j..j + db]));
        if ord != Ordering::Equal {
            return ord;
        }
        i += da;
        j += db;
    }
    Ordering::Equal
}

/// Splits `[epoch:]upstream[-revision]`.
fn split(v: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) if e.bytes().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), rest),
        _ => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((up, rev)) => (epoch, up, rev),
        None => (epoch, rest, ""),
    }
}

/// Compares two Debian version strings (epoch, upstream version, revision).
pub fn compare(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

/// Compares kernel ABI strings from package names (`6.1.0-56`, `6.12.117+deb12`). These are
/// compared as whole upstream versions: the `-56` is the ABI number, not a Debian revision.
pub fn compare_abi(a: &str, b: &str) -> Ordering {
    verrevcmp(a.as_bytes(), b.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::*;

    #[test]
    fn dpkg_ordering() {
        assert_eq!(compare("1.0", "1.0"), Equal);
        assert_eq!(compare("1.0~rc1", "1.0"), Less);
        assert_eq!(compare("1.0", "1.0+b1"), Less);
        assert_eq!(compare("1:0.1", "2.0"), Greater);
        assert_eq!(compare("6.1.192-2", "6.1.192-10"), Less);
        assert_eq!(compare("6.12.117-1~deb12u1", "6.12.117-1"), Less);
        assert_eq!(compare("1.0a", "1.0-"), Greater);
        assert_eq!(compare("1.01", "1.1"), Equal);
    }

    #[test]
    fn abi_ordering_is_numeric() {
        assert_eq!(compare_abi("6.1.0-9", "6.1.0-56"), Less);
        assert_eq!(compare_abi("6.1.0-100", "6.1.0-56"), Greater);
        assert_eq!(compare_abi("6.12.9+deb12", "6.12.117+deb12"), Less);
        let mut v = vec!["6.1.0-56", "6.1.0-9", "6.1.0-10", "6.1.0-100"];
        v.sort_by(|a, b| compare_abi(a, b));
        assert_eq!(v, ["6.1.0-9", "6.1.0-10", "6.1.0-56", "6.1.0-100"]);
    }
}
