//! Content codings: which ones a rule offers (its `[rules.compression]` settings), and the
//! choice among a stored entry's representations by the request's `Accept-Encoding` (RFC 9110
//! §12.5.3): q-values, `identity`, `*`, `x-gzip`. Pure functions of the header value; the
//! store is never keyed on it.
//!
//! Choices this module makes where the RFC leaves room:
//! - No `Accept-Encoding` at all gets identity (RFC 9110 allows any coding, but a client that
//!   says nothing — `curl` without `--compressed`, a script — rarely decodes one).
//! - `identity` that is not listed is acceptable, but preferred least: `br;q=0.5` gets `br`.
//! - Equal q-values go to the server's order: the rule's `encodings` order (brotli first by
//!   default, as it is the smaller), identity last.
//! - When nothing acceptable is stored (`identity;q=0` and no variant yet), identity is sent
//!   anyway (RFC 9110 §12.1 lets a server disregard the header rather than answer `406`): a
//!   download never fails for want of a variant that is being built.

use http::HeaderValue;

/// A content coding lotecache can store a variant in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coding {
    Br,
    Gzip,
}

impl Coding {
    /// Every coding.
    pub const ALL: [Coding; 2] = [Coding::Br, Coding::Gzip];

    /// The token in `Accept-Encoding` / `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    pub fn from_token(token: &str) -> Option<Coding> {
        Coding::ALL.into_iter().find(|c| c.token().eq_ignore_ascii_case(token))
    }

    /// A bit of its own, for sets of codings kept in an integer.
    pub fn bit(self) -> u8 {
        match self {
            Coding::Br => 1,
            Coding::Gzip => 2,
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.token())
    }
}

/// A rule's compression settings (`[rules.compression]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionConfig {
    /// The codings kept, with their levels (brotli quality 0–11, gzip level 1–9), in the
    /// server's order of preference for equal q-values. Empty: no variants on this rule.
    pub codings: Vec<(Coding, u32)>,
    /// A variant not at least this many percent smaller than the body is not kept.
    pub min_saving_percent: u8,
}

/// brotli quality and gzip level by default: most of the saving of the highest levels at a
/// fraction of their CPU (a 16 MB document compresses in well under a second).
pub const DEFAULT_BROTLI_QUALITY: u32 = 5;
pub const DEFAULT_GZIP_LEVEL: u32 = 6;
pub const DEFAULT_MIN_SAVING_PERCENT: u8 = 10;

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            codings: vec![(Coding::Br, DEFAULT_BROTLI_QUALITY), (Coding::Gzip, DEFAULT_GZIP_LEVEL)],
            min_saving_percent: DEFAULT_MIN_SAVING_PERCENT,
        }
    }
}

impl CompressionConfig {
    /// No variants on this rule.
    pub fn off() -> Self {
        CompressionConfig { codings: Vec::new(), min_saving_percent: DEFAULT_MIN_SAVING_PERCENT }
    }

    pub fn is_off(&self) -> bool {
        self.codings.is_empty()
    }

    /// The codings served on this rule, in preference order.
    pub fn offered(&self) -> impl Iterator<Item = Coding> + '_ {
        self.codings.iter().map(|(c, _)| *c)
    }

    /// The offered codings as a set of [`Coding::bit`]s.
    pub fn bits(&self) -> u8 {
        self.offered().fold(0, |b, c| b | c.bit())
    }
}

/// q-values in thousandths (RFC 9110 §12.4.2: at most three decimals).
type Q = u16;

/// The preferences a request's `Accept-Encoding` states (all its lines, read once).
#[derive(Debug, Default)]
pub struct AcceptEncoding {
    br: Option<Q>,
    gzip: Option<Q>,
    identity: Option<Q>,
    any: Option<Q>,
}

impl AcceptEncoding {
    /// The request's preferences; None without the header (identity is sent). An element with
    /// an unreadable weight is ignored, and so is a line that is not text; the first mention
    /// of a coding counts. Linear in the header's length, without allocating.
    pub fn of(headers: &http::HeaderMap) -> Option<AcceptEncoding> {
        let mut lines = headers.get_all(http::header::ACCEPT_ENCODING).iter().peekable();
        lines.peek()?;
        let mut p = AcceptEncoding::default();
        for line in lines.filter_map(|l| l.to_str().ok()) {
            p.read(line);
        }
        Some(p)
    }

    fn read(&mut self, list: &str) {
        let p = self;
        for element in list.split(',') {
            let mut parts = element.split(';');
            let name = parts.next().unwrap_or_default().trim();
            if name.is_empty() {
                continue;
            }
            let mut q = Some(1000);
            for param in parts {
                let Some((k, v)) = param.split_once('=') else {
                    q = None;
                    break;
                };
                if k.trim().eq_ignore_ascii_case("q") {
                    q = parse_q(v.trim());
                }
            }
            let Some(q) = q else { continue };
            let slot = if name.eq_ignore_ascii_case("br") {
                &mut p.br
            } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                &mut p.gzip
            } else if name.eq_ignore_ascii_case("identity") {
                &mut p.identity
            } else if name == "*" {
                &mut p.any
            } else {
                continue;
            };
            slot.get_or_insert(q);
        }
    }

    /// The representation to send: `Some(coding)` for a stored variant among `available`
    /// (server preference order), `None` for identity.
    pub fn choose(&self, available: impl IntoIterator<Item = Coding>) -> Option<Coding> {
        let mut best: Option<(Coding, Q)> = None;
        for c in available {
            let q = self.q(c);
            if q > 0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((c, q));
            }
        }
        best.filter(|&(_, q)| q >= self.identity()).map(|(c, _)| c)
    }

    /// Whether the request takes `coding` (q > 0).
    pub fn accepts(&self, coding: Coding) -> bool {
        self.q(coding) > 0
    }

    /// The q of `coding` (0: not acceptable).
    fn q(&self, coding: Coding) -> Q {
        let explicit = match coding {
            Coding::Br => self.br,
            Coding::Gzip => self.gzip,
        };
        explicit.or(self.any).unwrap_or(0)
    }

    /// The q of identity; unlisted identity ranks below every listed coding (1 thousandth).
    fn identity(&self) -> Q {
        self.identity.or(self.any).unwrap_or(1)
    }
}

/// `q=0.5` → 500; None if it is not a qvalue.
fn parse_q(v: &str) -> Option<Q> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // "5" → 500, "25" → 250, "125" → 125.
    let frac_q = frac.bytes().chain(std::iter::repeat(b'0')).take(3).fold(0, |q, d| q * 10 + (d - b'0') as Q);
    match int {
        "0" => Some(frac_q),
        "1" if frac_q == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefs(lines: &[&str]) -> Option<AcceptEncoding> {
        let mut h = http::HeaderMap::new();
        for l in lines {
            h.append(http::header::ACCEPT_ENCODING, HeaderValue::from_str(l).unwrap());
        }
        AcceptEncoding::of(&h)
    }

    fn pick(accept: Option<&str>, available: &[Coding]) -> Option<Coding> {
        prefs(&accept.into_iter().collect::<Vec<_>>())?.choose(available.iter().copied())
    }

    const BOTH: &[Coding] = &[Coding::Br, Coding::Gzip];

    #[test]
    fn the_negotiation_table() {
        use Coding::*;
        let table: &[(Option<&str>, &[Coding], Option<Coding>)] = &[
            (None, BOTH, None),
            (Some(""), BOTH, None),
            (Some("gzip, deflate, br, zstd"), BOTH, Some(Br)),
            (Some("gzip, deflate, br, zstd"), &[Gzip], Some(Gzip)),
            (Some("gzip, deflate, br, zstd"), &[], None),
            (Some("gzip;q=1.0, br;q=0.8"), BOTH, Some(Gzip)),
            (Some("br;q=0.5"), BOTH, Some(Br)),
            (Some("br;q=0"), BOTH, None),
            (Some("BR"), BOTH, Some(Br)),
            (Some("x-gzip"), BOTH, Some(Gzip)),
            (Some("*"), BOTH, Some(Br)),
            (Some("*;q=0.5, br;q=0"), BOTH, Some(Gzip)),
            (Some("identity"), BOTH, None),
            (Some("identity;q=1, gzip;q=0.5"), BOTH, None),
            (Some("gzip, identity"), BOTH, Some(Gzip)),
            (Some("identity;q=0"), BOTH, None),
            (Some("identity;q=0, gzip"), BOTH, Some(Gzip)),
            (Some("*;q=0"), BOTH, None),
            (Some("compress, deflate, zstd"), BOTH, None),
            (Some("br;q=2"), BOTH, None),
            (Some("br;q=0.1234"), BOTH, None),
            (Some("br;q=abc, gzip"), BOTH, Some(Gzip)),
            (Some("br ; q=0.9 , gzip ; q=0.95"), BOTH, Some(Gzip)),
            (Some("br;q=1.000"), BOTH, Some(Br)),
            (Some("br;q=0.000"), BOTH, None),
        ];
        for (accept, available, want) in table {
            assert_eq!(pick(*accept, available), *want, "Accept-Encoding {accept:?}, stored {available:?}");
        }
    }

    #[test]
    fn the_default_keeps_brotli_then_gzip() {
        let c = CompressionConfig::default();
        assert_eq!(c.offered().collect::<Vec<_>>(), vec![Coding::Br, Coding::Gzip]);
        assert!(!c.is_off());
        assert!(CompressionConfig::off().is_off());
    }

    #[test]
    fn accepts_reads_wildcards_and_zero_weights() {
        assert!(prefs(&["gzip, br"]).unwrap().accepts(Coding::Br));
        assert!(prefs(&["*"]).unwrap().accepts(Coding::Gzip));
        assert!(!prefs(&["*, gzip;q=0"]).unwrap().accepts(Coding::Gzip));
        assert!(prefs(&[]).is_none());
        assert!(!prefs(&["identity"]).unwrap().accepts(Coding::Br));
    }

    #[test]
    fn several_lines_are_one_list_and_the_first_mention_counts() {
        let p = prefs(&["br;q=0.1", "gzip", "br"]).unwrap();
        assert_eq!(p.choose(Coding::ALL), Some(Coding::Gzip));
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("0.25"), Some(250));
        assert_eq!(parse_q("0.125"), Some(125));
        assert_eq!(parse_q("1."), Some(1000));
        assert_eq!(parse_q("1.001"), None);
    }
}
