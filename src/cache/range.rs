//! Byte ranges and the preconditions that govern them, for answers served from a stored entry
//! (RFC 9110 §13 and §14). Pure decisions on header values; the cache path reads the bytes.
//!
//! One range is served (`206` with `Content-Range`); several ranges, a malformed `Range` or
//! another unit get the whole representation (`200`), which the RFC allows and which no client
//! misreads. A range that starts past the end is unsatisfiable (`416`, `Content-Range: bytes
//! */N`). `If-Range` must name the stored representation's strong `ETag`, the only validator
//! compared: a date never matches, and a weak tag never matches either. `If-Match` compares
//! strongly too; a mismatch is `412`.

use http::HeaderValue;

/// What a `Range` request comes to for a representation of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// Serve the whole representation (`200`): no `Range`, or one not to be honoured.
    Whole,
    /// Serve bytes `start..=end` (`206`).
    Part { start: u64, end: u64 },
    /// No byte of the range exists (`416`).
    Unsatisfiable,
}

/// Decides what to answer to `range` (with its `if_range`) for a representation whose strong
/// entity tag is `etag` and whose length is `len`.
pub fn answer(
    range: Option<&HeaderValue>,
    if_range: Option<&HeaderValue>,
    etag: &HeaderValue,
    len: u64,
) -> RangeAnswer {
    let Some(range) = range.and_then(|r| r.to_str().ok()) else { return RangeAnswer::Whole };
    if let Some(validator) = if_range {
        if !strong_match(validator.as_bytes(), etag.as_bytes()) {
            return RangeAnswer::Whole;
        }
    }
    let Some(spec) = one_range(range) else { return RangeAnswer::Whole };
    match spec {
        Spec::From { first, last } => {
            if first >= len {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Part { start: first, end: last.map_or(len - 1, |l| l.min(len - 1)) }
            }
        }
        Spec::Suffix(0) => RangeAnswer::Unsatisfiable,
        // The last n bytes of nothing: the whole (empty) representation.
        Spec::Suffix(_) if len == 0 => RangeAnswer::Whole,
        Spec::Suffix(n) => RangeAnswer::Part { start: len.saturating_sub(n), end: len - 1 },
    }
}

/// `Content-Range` of a part, or of an unsatisfiable range (`None`).
pub fn content_range(part: Option<(u64, u64)>, len: u64) -> HeaderValue {
    let text = match part {
        Some((start, end)) => format!("bytes {start}-{end}/{len}"),
        None => format!("bytes */{len}"),
    };
    HeaderValue::from_str(&text).expect("digits and ASCII")
}

/// Whether `If-Match` fails for the stored representation tagged `etag`: present, not `*`, and
/// no listed tag matching strongly.
pub fn if_match_fails(if_match: Option<&HeaderValue>, etag: &HeaderValue) -> bool {
    let Some(value) = if_match else { return false };
    let Ok(list) = value.to_str() else { return true };
    !list.split(',').map(str::trim).any(|t| t == "*" || strong_match(t.as_bytes(), etag.as_bytes()))
}

/// Strong comparison (RFC 9110 §8.8.3.2): both tags strong and identical.
fn strong_match(tag: &[u8], etag: &[u8]) -> bool {
    let tag = tag.trim_ascii();
    !tag.starts_with(b"W/") && !etag.starts_with(b"W/") && tag == etag
}

/// One byte-range spec.
#[derive(Debug, PartialEq, Eq)]
enum Spec {
    /// `first-` or `first-last`.
    From { first: u64, last: Option<u64> },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// The single range of a `bytes=` header, or None for several, none, another unit or a malformed
/// one (whitespace around the parts is tolerated, as RFC 9110's list syntax allows).
fn one_range(header: &str) -> Option<Spec> {
    let (unit, set) = header.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let spec = specs.next()?;
    if specs.next().is_some() {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, true) => None,
        (true, false) => Some(Spec::Suffix(number(last)?)),
        (false, true) => Some(Spec::From { first: number(first)?, last: None }),
        (false, false) => {
            let (first, last) = (number(first)?, number(last)?);
            (first <= last).then_some(Spec::From { first, last: Some(last) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ETAG: &str = "\"sha256-abc\"";

    fn ask(range: &str, len: u64) -> RangeAnswer {
        answer(Some(&HeaderValue::from_str(range).unwrap()), None, &HeaderValue::from_static(ETAG), len)
    }

    #[test]
    fn single_ranges_are_resolved_against_the_length() {
        use RangeAnswer::*;
        for (range, want) in [
            ("bytes=0-99", Part { start: 0, end: 99 }),
            ("bytes=100-199", Part { start: 100, end: 199 }),
            ("bytes=900-", Part { start: 900, end: 999 }),
            ("bytes=-100", Part { start: 900, end: 999 }),
            ("bytes=-5000", Part { start: 0, end: 999 }),
            ("bytes=990-5000", Part { start: 990, end: 999 }),
            ("bytes=999-999", Part { start: 999, end: 999 }),
            ("Bytes = 5 - 9", Part { start: 5, end: 9 }),
            ("bytes=1000-", Unsatisfiable),
            ("bytes=1000-2000", Unsatisfiable),
            ("bytes=-0", Unsatisfiable),
            ("bytes=0-1,5-6", Whole),
            ("bytes=9-5", Whole),
            ("bytes=abc", Whole),
            ("bytes=-", Whole),
            ("bytes=+1-2", Whole),
            ("items=0-5", Whole),
            ("bytes=0-99999999999999999999999", Whole),
        ] {
            assert_eq!(ask(range, 1000), want, "{range}");
        }
        assert_eq!(ask("bytes=0-", 0), Unsatisfiable);
        assert_eq!(ask("bytes=-1", 0), Whole);
    }

    #[test]
    fn if_range_honours_only_the_strong_tag_of_this_representation() {
        let etag = HeaderValue::from_static(ETAG);
        let range = HeaderValue::from_static("bytes=0-9");
        for (if_range, honoured) in [
            (ETAG, true),
            ("\"sha256-other\"", false),
            ("W/\"sha256-abc\"", false),
            ("Thu, 03 Dec 2026 09:30:00 GMT", false),
        ] {
            let got = answer(Some(&range), Some(&HeaderValue::from_static(if_range)), &etag, 100);
            assert_eq!(got == (RangeAnswer::Part { start: 0, end: 9 }), honoured, "{if_range}");
        }
    }

    #[test]
    fn if_match_fails_unless_it_names_this_representation_strongly_or_any() {
        let etag = HeaderValue::from_static(ETAG);
        let fails = |v: &'static str| if_match_fails(Some(&HeaderValue::from_static(v)), &etag);
        assert!(!if_match_fails(None, &etag));
        assert!(!fails("*"));
        assert!(!fails(ETAG));
        assert!(!fails("\"x\", \"sha256-abc\""));
        assert!(fails("\"x\""));
        assert!(fails("W/\"sha256-abc\""));
    }

    #[test]
    fn content_range_values() {
        assert_eq!(content_range(Some((0, 99)), 1000), "bytes 0-99/1000");
        assert_eq!(content_range(None, 1000), "bytes */1000");
    }

    proptest! {
        /// Whatever the header, a part lies inside the representation.
        #[test]
        fn a_part_always_lies_inside_the_representation(header in "[ -~]{0,40}", len in 0u64..5000) {
            if let Ok(v) = HeaderValue::from_str(&header) {
                if let RangeAnswer::Part { start, end } = answer(Some(&v), None, &HeaderValue::from_static(ETAG), len) {
                    prop_assert!(start <= end && end < len);
                }
            }
        }

        /// `bytes=a-b` with a ≤ b gives exactly the bytes a..=b that exist.
        #[test]
        fn a_closed_range_gives_exactly_its_existing_bytes(a in 0u64..3000, n in 0u64..3000, len in 1u64..3000) {
            let b = a + n;
            let got = ask(&format!("bytes={a}-{b}"), len);
            if a >= len {
                prop_assert_eq!(got, RangeAnswer::Unsatisfiable);
            } else {
                prop_assert_eq!(got, RangeAnswer::Part { start: a, end: b.min(len - 1) });
            }
        }
    }
}
