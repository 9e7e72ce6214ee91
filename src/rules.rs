//! Route rules: decide, for each request, whether it is served through the cache (and under
//! which key), passed through untouched, or rejected.
//!
//! Matching runs on the path percent-decoded exactly once. A path that starts with a rule's
//! prefix is that rule's: its id must then match the rule's pattern or the request gets `400`
//! — it is never passed through or stored under another key. The origin request of a cache
//! route is rebuilt from the parsed id, never forwarded raw.

use crate::cache::negotiate::CompressionConfig;
use crate::cache::policy::IgnoreResponse;
use crate::cache::target::{encode_id, AccessPolicy, CacheTarget, FillHeaders};
use crate::cache::validate::Validation;
use crate::error::ProxyError;
use http::{Method, Request};
use percent_encoding::percent_decode_str;
use std::{sync::Arc, time::Duration};

/// How a query string on a cache route is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryPolicy {
    /// Any query string gets `400` (the default: the legacy route takes none).
    Reject,
    /// The raw query string is appended to the cache key and forwarded as is.
    Key,
}

/// A rule as the config file defines it, validated.
#[derive(Debug, Clone)]
pub struct RuleConfig {
    pub name: String,
    /// Path template split at `{lote_id}`.
    pub path_prefix: String,
    pub path_suffix: String,
    /// Anchored id pattern.
    pub id_pattern: IdPattern,
    /// Key template split at `{lote_id}`.
    pub key_prefix: String,
    pub key_suffix: String,
    pub query: QueryPolicy,
    pub ttl: Option<Duration>,
    pub stale_if_error: bool,
    pub access: AccessPolicy,
    pub ignore: IgnoreResponse,
    /// Checks a document must pass before it is stored (inactive when empty).
    pub validation: Arc<Validation>,
    /// Which request headers a fill forwards, and which count as credentials.
    pub headers: Arc<FillHeaders>,
    /// Largest body stored on this route (None: only `cache.max_size` bounds it).
    pub max_object_size: Option<u64>,
    /// The precompressed variants kept and served on this route.
    pub compression: Arc<CompressionConfig>,
}

/// A rule's id pattern, matched against the whole id. The common shape — one ASCII character
/// class repeated `{m,n}` times, like the default `[A-Za-z0-9._-]{1,128}` — is matched with a
/// byte table (the regex engine costs several microseconds per request); anything else with
/// the regular expression.
#[derive(Debug, Clone)]
pub struct IdPattern {
    regex: regex_lite::Regex,
    class: Option<CharRun>,
}

/// One ASCII character class, repeated between `min` and `max` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CharRun {
    allowed: u128,
    min: usize,
    max: usize,
}

impl IdPattern {
    pub fn new(pattern: &str) -> Result<IdPattern, regex_lite::Error> {
        let regex = regex_lite::Regex::new(&format!("^(?:{pattern})$"))?;
        Ok(IdPattern { regex, class: CharRun::parse(pattern) })
    }

    pub fn is_match(&self, id: &str) -> bool {
        match &self.class {
            Some(c) => c.is_match(id),
            None => self.regex.is_match(id),
        }
    }
}

impl CharRun {
    /// `[items]{m,n}` or `[items]{n}`, items being ASCII letters, digits and `.` `_` `-` `~`
    /// `:` `@`, or ranges `a-z`; None for anything else (negation, escapes, other
    /// quantifiers), which the regex handles.
    fn parse(p: &str) -> Option<CharRun> {
        let rest = p.strip_prefix('[')?;
        let (items, quant) = rest.split_once(']')?;
        let (min, max) = match quant.strip_prefix('{')?.strip_suffix('}')?.split_once(',') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let n = quant[1..quant.len() - 1].parse().ok()?;
                (n, n)
            }
        };
        if min > max {
            return None;
        }
        let plain = |c: u8| c.is_ascii_alphanumeric() || b"._-~:@".contains(&c);
        let b = items.as_bytes();
        if b.is_empty() || b[0] == b'^' || !b.iter().all(|&c| plain(c)) {
            return None;
        }
        let mut allowed = 0u128;
        let mut i = 0;
        while i < b.len() {
            // `x-y` is a range unless the `-` is first or last (then it is literal).
            if i + 2 < b.len() && b[i + 1] == b'-' {
                let (lo, hi) = (b[i], b[i + 2]);
                if lo > hi || !lo.is_ascii_alphanumeric() || !hi.is_ascii_alphanumeric() {
                    return None;
                }
                (lo..=hi).for_each(|c| allowed |= 1 << c);
                i += 3;
            } else {
                allowed |= 1 << b[i];
                i += 1;
            }
        }
        Some(CharRun { allowed, min, max })
    }

    fn is_match(&self, id: &str) -> bool {
        (self.min..=self.max).contains(&id.len()) && id.bytes().all(|c| c < 128 && self.allowed & (1 << c) != 0)
    }
}

/// What to do with one request.
#[derive(Debug)]
pub enum Route {
    /// Serve through the cache.
    Cache(CacheTarget),
    /// Forward to the origin as is.
    Pass,
    /// Refuse with this error; nothing is forwarded. `varies`: the rule keeps compressed
    /// variants, so its answers, this one too, say `Vary: Accept-Encoding`.
    Reject { rule: String, error: ProxyError, varies: bool },
}

/// The ordered rule list.
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<RuleConfig>,
}

impl Rules {
    pub fn new(rules: Vec<RuleConfig>) -> Self {
        Rules { rules }
    }

    /// The keys each rule would give `lote_id` (without query strings).
    pub fn keys_of(&self, lote_id: &str) -> Vec<String> {
        self.rules.iter().map(|r| format!("{}{}{}", r.key_prefix, lote_id, r.key_suffix)).collect()
    }

    /// What a warm of batch `id` fills: one target per rule, as a `GET` of the rule's path for
    /// that id would resolve it (or why that id is refused there), with the rule's name.
    pub fn warm_targets(&self, id: &str) -> Vec<(String, Result<CacheTarget, String>)> {
        self.rules
            .iter()
            .map(|rule| {
                let path = format!("{}{}{}", rule.path_prefix, encode_id(id), rule.path_suffix);
                let target = match http::Uri::try_from(path.as_str()) {
                    Err(e) => Err(format!("not a valid path: {e}")),
                    Ok(uri) => {
                        let mut req = Request::new(());
                        *req.uri_mut() = uri;
                        match self.route(&req) {
                            Route::Cache(t) if t.rule == rule.name => Ok(t),
                            Route::Cache(t) => Err(format!("its path is served by rule {:?} first", t.rule)),
                            Route::Reject { error, .. } => Err(error.detail()),
                            Route::Pass => Err("not a cache route".into()),
                        }
                    }
                };
                (rule.name.clone(), target)
            })
            .collect()
    }

    /// The batch id a store key was made from, by the first rule whose key template fits.
    pub fn lote_id_of_key(&self, key: &str) -> Option<String> {
        self.rules.iter().find_map(|r| {
            let id = key.strip_prefix(r.key_prefix.as_str())?.strip_suffix(r.key_suffix.as_str())?;
            (!id.is_empty() && r.id_pattern.is_match(id)).then(|| id.to_string())
        })
    }

    /// Decides the route of `req`. Only `GET` and `HEAD` are cached; other methods pass.
    pub fn route<B>(&self, req: &Request<B>) -> Route {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Route::Pass;
        }
        // Borrowed unless the path has escapes (most pass-through paths have none).
        let decoded: std::borrow::Cow<[u8]> = percent_decode_str(req.uri().path()).into();
        for rule in &self.rules {
            let Some(raw_id) = decoded
                .strip_prefix(rule.path_prefix.as_bytes())
                .and_then(|rest| rest.strip_suffix(rule.path_suffix.as_bytes()))
            else {
                continue;
            };
            let varies = !rule.compression.is_off();
            let reject = |detail: String| Route::Reject {
                rule: rule.name.clone(),
                error: ProxyError::InvalidId { detail },
                varies,
            };
            let Ok(id) = std::str::from_utf8(raw_id) else {
                return reject("lote_id is not valid UTF-8".into());
            };
            if id == "." || id == ".." || !rule.id_pattern.is_match(id) {
                return reject(format!("lote_id \"{id}\" does not match the allowed pattern"));
            }
            if has_body(req) {
                return Route::Reject {
                    rule: rule.name.clone(),
                    error: ProxyError::BadRequest { detail: "a GET on a cache route must not carry a body".into() },
                    varies,
                };
            }
            let base_path = format!("{}{}{}", rule.path_prefix, encode_id(id), rule.path_suffix);
            let key = format!("{}{}{}", rule.key_prefix, id, rule.key_suffix);
            let (key, origin_path) = match (req.uri().query(), rule.query) {
                (None, _) => (key, base_path),
                (Some(q), QueryPolicy::Key) => (format!("{key}?{q}"), format!("{base_path}?{q}")),
                (Some(_), QueryPolicy::Reject) => {
                    return Route::Reject {
                        rule: rule.name.clone(),
                        error: ProxyError::BadRequest { detail: "query strings are not accepted on this route".into() },
                        varies,
                    }
                }
            };
            let validation = rule.validation.is_active().then(|| rule.validation.clone());
            return Route::Cache(CacheTarget {
                rule: rule.name.clone(),
                lote_id: id.to_string(),
                key,
                origin_path,
                validation,
                ttl: rule.ttl,
                stale_if_error: rule.stale_if_error,
                access: rule.access.clone(),
                ignore: rule.ignore,
                headers: rule.headers.clone(),
                max_object_size: rule.max_object_size,
                compression: rule.compression.clone(),
            });
        }
        Route::Pass
    }
}

fn has_body<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    h.contains_key(http::header::TRANSFER_ENCODING)
        || h.get(http::header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{default_rule, QueryPolicy};

    fn route(uri: &str) -> Route {
        Rules::new(vec![default_rule()]).route(&Request::get(uri).body(()).unwrap())
    }

    #[test]
    fn the_character_class_fast_path_agrees_with_the_regex() {
        let patterns = ["[A-Za-z0-9._-]{1,128}", "[a-f0-9]{8}", "[-a-z]{2,3}", "[0-9]{1,4}", "[A-Z.]{0,2}"];
        let ids = [
            "",
            "a",
            "ab",
            "abc",
            "a-b",
            "-a",
            "LOTE-2025_07.16",
            "1234",
            "12345",
            "deadbeef",
            "DEADBEEF",
            "a b",
            "a/b",
            "ñ",
            "añb",
            "..",
            "A.",
            "AB.",
            &"x".repeat(128),
            &"x".repeat(129),
        ];
        for p in patterns {
            let fast = IdPattern::new(p).unwrap();
            assert!(fast.class.is_some(), "{p} takes the fast path");
            let regex = regex_lite::Regex::new(&format!("^(?:{p})$")).unwrap();
            for id in ids {
                assert_eq!(fast.is_match(id), regex.is_match(id), "pattern {p}, id {id:?}");
            }
        }
        for p in ["[^a]{1,2}", "[a\\-z]{1,2}", "[a-z]+", "L-[0-9]{1,4}", "[a-z]{3,1}", "[z-a]{1,2}"] {
            assert!(CharRun::parse(p).is_none(), "{p} is left to the regex");
        }
    }

    #[test]
    fn batch_path_maps_to_the_owners_file_name() {
        match route("/download_batch_results/LOTE-2025_07.16") {
            Route::Cache(t) => {
                assert_eq!(t.key, "LOTE-2025_07.16_resultados.json");
                assert_eq!(t.lote_id, "LOTE-2025_07.16");
                assert_eq!(t.origin_path, "/download_batch_results/LOTE-2025_07.16");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn percent_encoded_id_is_decoded_once() {
        match route("/download_batch_results/L%2D1") {
            Route::Cache(t) => assert_eq!(t.key, "L-1_resultados.json"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_outside_the_pattern_are_rejected_not_passed() {
        for bad in [
            "/download_batch_results/",
            "/download_batch_results/.",
            "/download_batch_results/..",
            "/download_batch_results/%2e%2e",
            "/download_batch_results/A/..%2fB",
            "/download_batch_results/A%2F..%2FB",
            "/download_batch_results/A;jsessionid=1",
            "/download_batch_results/A%00",
            "/download_batch_results/A/",
            "/download_batch_results/%FF",
        ] {
            assert!(matches!(route(bad), Route::Reject { .. }), "{bad} was not rejected");
        }
        let long = format!("/download_batch_results/{}", "a".repeat(129));
        assert!(matches!(route(&long), Route::Reject { .. }));
    }

    #[test]
    fn other_paths_and_methods_pass_through() {
        assert!(matches!(route("/monitoreo"), Route::Pass));
        assert!(matches!(route("//download_batch_results/A"), Route::Pass));
        let post = Request::post("/download_batch_results/A").body(()).unwrap();
        assert!(matches!(Rules::new(vec![default_rule()]).route(&post), Route::Pass));
    }

    #[test]
    fn query_is_rejected_by_default_and_keyed_when_configured() {
        assert!(matches!(route("/download_batch_results/A?x=1"), Route::Reject { .. }));
        let mut rule = default_rule();
        rule.query = QueryPolicy::Key;
        let req = Request::get("/download_batch_results/A?x=1").body(()).unwrap();
        match Rules::new(vec![rule]).route(&req) {
            Route::Cache(t) => {
                assert_eq!(t.key, "A_resultados.json?x=1");
                assert_eq!(t.origin_path, "/download_batch_results/A?x=1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn get_with_a_body_on_a_cache_route_is_rejected() {
        let req = Request::get("/download_batch_results/A").header("content-length", "3").body(()).unwrap();
        assert!(matches!(Rules::new(vec![default_rule()]).route(&req), Route::Reject { .. }));
    }

    use proptest::prelude::*;

    /// Bytes an http path may carry unencoded (`%` never: it would start an escape).
    fn raw_ok(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)
    }

    /// An id's bytes: mostly characters the default pattern allows, some anything.
    fn arb_id_bytes() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            6 => prop::sample::select(b"AZaz09._-L".to_vec()),
            1 => prop::sample::select(b"/%?#;: ~\x00\x7f".to_vec()),
            1 => any::<u8>(),
        ];
        prop_oneof![
            8 => prop::collection::vec(byte, 0..12),
            1 => prop::collection::vec(Just(b'a'), 126..131),
            1 => prop::sample::select(vec![b".".to_vec(), b"..".to_vec(), "ñ".as_bytes().to_vec(), vec![0xc3], vec![0xed, 0xa0, 0x80]]),
        ]
    }

    /// Percent-encodes `id`: bytes a path cannot carry always, the others when `encode[i]`, in
    /// upper or lower hex as `upper[i]` says.
    fn encode_arbitrarily(id: &[u8], encode: &[bool], upper: &[bool]) -> String {
        let mut out = String::new();
        for (i, &b) in id.iter().enumerate() {
            if !raw_ok(b) || encode[i % encode.len()] {
                let hex = format!("%{b:02X}");
                out.push_str(&if upper[i % upper.len()] { hex } else { hex.to_lowercase() });
            } else {
                out.push(b as char);
            }
        }
        out
    }

    fn arb_pattern() -> impl Strategy<Value = String> {
        let item = prop_oneof![
            3 => prop::sample::select(b"abcxyzAZ09._-~:@".to_vec()).prop_map(|c| (c as char).to_string()),
            2 => (prop::sample::select(b"aAm0z9Z".to_vec()), prop::sample::select(b"aAm0z9Z".to_vec()))
                .prop_map(|(a, b)| format!("{}-{}", a as char, b as char)),
        ];
        (prop::collection::vec(item, 1..5), 0usize..6, 0usize..6, any::<bool>()).prop_map(|(items, a, b, exact)| {
            let quant = if exact { format!("{{{a}}}") } else { format!("{{{},{}}}", a.min(b), a.max(b)) };
            format!("[{}]{quant}", items.concat())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn a_percent_encoded_id_is_cached_under_its_decoded_self_exactly_when_it_is_allowed(
            id in arb_id_bytes(),
            encode in prop::collection::vec(any::<bool>(), 1..8),
            upper in prop::collection::vec(any::<bool>(), 1..8),
        ) {
            let path = format!("/download_batch_results/{}", encode_arbitrarily(&id, &encode, &upper));
            let pattern = regex_lite::Regex::new(&format!("^(?:{})$", crate::config::DEFAULT_ID_PATTERN)).unwrap();
            let allowed = std::str::from_utf8(&id).ok().filter(|s| *s != "." && *s != ".." && pattern.is_match(s));
            match (route(&path), allowed) {
                (Route::Cache(t), Some(id)) => {
                    prop_assert_eq!(&t.lote_id, id);
                    prop_assert_eq!(t.key, format!("{id}_resultados.json"));
                    prop_assert_eq!(t.origin_path, format!("/download_batch_results/{}", encode_id(id)));
                }
                (Route::Reject { .. }, None) => {}
                (other, allowed) => prop_assert!(false, "{path}: {other:?}, allowed: {allowed:?}"),
            }
        }

        #[test]
        fn the_character_class_fast_path_agrees_with_the_regex_on_generated_patterns(
            pattern in arb_pattern(),
            ids in prop::collection::vec("[a-zA-Z0-9._~:@ñ/ -]{0,7}", 1..16),
        ) {
            // A pattern the regex engine refuses is refused by IdPattern::new before the fast
            // path could be used (e.g. `[a-m--]`, which CharRun alone would read).
            let Ok(regex) = regex_lite::Regex::new(&format!("^(?:{pattern})$")) else {
                prop_assert!(IdPattern::new(&pattern).is_err());
                return Ok(());
            };
            let id_pattern = IdPattern::new(&pattern).unwrap();
            prop_assume!(id_pattern.class.is_some());
            for id in &ids {
                prop_assert_eq!(id_pattern.is_match(id), regex.is_match(id), "pattern {}, id {:?}", pattern, id);
            }
        }

        #[test]
        fn an_encoded_id_decodes_back_to_itself(id in any::<String>()) {
            let encoded = encode_id(&id);
            prop_assert!(encoded.bytes().all(raw_ok) || encoded.contains('%'));
            prop_assert_eq!(percent_decode_str(&encoded).decode_utf8().unwrap(), id.as_str());
        }
    }
}
