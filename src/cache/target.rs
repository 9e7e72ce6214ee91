//! What the cache is asked to serve: a request of a cache route, resolved by the rules into the
//! batch id, the store key, the origin path, and the route's policies (who may be served, which
//! request headers a fill forwards, what a document must pass). The rules build it; the cache
//! only reads it, so it depends on nothing above it.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::sync::Arc;
use std::time::Duration;

/// A cache-route request, resolved.
#[derive(Debug, Clone)]
pub struct CacheTarget {
    pub rule: String,
    pub lote_id: String,
    /// The store key, e.g. `L-1_resultados.json`.
    pub key: String,
    /// Path and query of the rebuilt origin request.
    pub origin_path: String,
    /// What a document must pass before it is stored (None: no validation).
    pub validation: Option<Arc<super::validate::Validation>>,
    /// Entries older than this are refetched.
    pub ttl: Option<std::time::Duration>,
    /// Serve an expired entry when the origin fails or answers 5xx.
    pub stale_if_error: bool,
    pub access: AccessPolicy,
    pub ignore: super::policy::IgnoreResponse,
    /// Which request headers its fills forward, and which count as credentials.
    pub headers: Arc<FillHeaders>,
    /// Largest body stored on this route.
    pub max_object_size: Option<u64>,
    /// The precompressed variants kept and served on this route.
    pub compression: Arc<super::negotiate::CompressionConfig>,
}

impl CacheTarget {
    /// Whether an entry stored at `stored_at_ms` is within the route's TTL (always, without one).
    pub fn is_fresh(&self, stored_at_ms: u128) -> bool {
        self.ttl.is_none_or(|ttl| crate::clock::now_ms().saturating_sub(stored_at_ms) < ttl.as_millis())
    }
}

/// Who may be served a stored entry of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessPolicy {
    /// No policy written: requests carrying `Cookie` or `Authorization` bypass the cache.
    CredentialsBypass,
    /// Anyone who can reach the proxy (written explicitly as `access = "public"`).
    Public,
    /// Every request is checked first with a sub-request (see `cache::access`), carrying
    /// the client's credential headers: 2xx allows, 401/403 is returned; its answers are kept
    /// for a few seconds.
    Auth(Arc<AuthCheck>),
}

/// A rule's access check (`[rules.auth]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthCheck {
    /// The check's URL (`{lote_id}` replaced); a path is on the origin.
    pub url: String,
    pub timeout: Duration,
    /// How long an allow is kept (0: not kept).
    pub cache_ttl: Duration,
    /// How long a refusal is kept (0: not kept).
    pub deny_ttl: Duration,
    /// Decisions kept at most for this rule.
    pub cache_entries: usize,
}

/// Defaults of the decision cache: a user's burst of clicks costs one check; a revoked access
/// ends within seconds; a refusal is asked again at once (the user may log in meanwhile).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(5);
pub const DEFAULT_DENY_TTL: Duration = Duration::ZERO;
pub const DEFAULT_CACHE_ENTRIES: usize = 100_000;

/// The request headers of a rule's fills: a fill is one request made on behalf of many
/// clients, so it forwards only an explicit set, never the client's headers wholesale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillHeaders {
    /// Forwarded on every fill (`forward_headers`; default [`DEFAULT_FORWARD_HEADERS`]).
    pub forward: Vec<http::HeaderName>,
    /// Headers that identify a client (`credential_headers`; default
    /// [`DEFAULT_CREDENTIAL_HEADERS`]). On a rule without an access policy a request carrying
    /// any of them bypasses the cache; on a rule with an access check they go to the check
    /// and on that request's fill; otherwise they are never forwarded on a fill.
    pub credentials: Vec<http::HeaderName>,
    /// Sent on every fill of the rule, whoever asked, and on warms (`service_headers`; the
    /// values come from environment variables and are marked sensitive: never logged).
    pub service: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl FillHeaders {
    /// Whether `headers` holds any credential header.
    pub fn carries_credentials(&self, headers: &http::HeaderMap) -> bool {
        self.credentials.iter().any(|name| headers.contains_key(name))
    }
}

impl Default for FillHeaders {
    fn default() -> Self {
        let names = |list: &[&'static str]| list.iter().map(|&n| http::HeaderName::from_static(n)).collect();
        FillHeaders {
            forward: names(DEFAULT_FORWARD_HEADERS),
            credentials: names(DEFAULT_CREDENTIAL_HEADERS),
            service: Vec::new(),
        }
    }
}

/// What a fill forwards by default: content negotiation, the client's software, tracing,
/// and the addressing the backend may build links from. Nothing that identifies a user.
pub const DEFAULT_FORWARD_HEADERS: &[&str] =
    &["host", "accept", "accept-language", "user-agent", "x-request-id", "x-forwarded-for"];

/// Request headers that carry credentials by default: HTTP's own, API keys, the identity
/// headers of authenticating front ends (oauth2-proxy, Apache/nginx auth modules, AWS ALB,
/// Azure App Service, Google IAP, Cloudflare Access) and client-certificate headers.
pub const DEFAULT_CREDENTIAL_HEADERS: &[&str] = &[
    "cookie",
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-access-token",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-preferred-username",
    "x-forwarded-groups",
    "x-forwarded-access-token",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-access-token",
    "x-remote-user",
    "remote-user",
    "x-user",
    "x-user-id",
    "x-ssl-client-cert",
    "x-ssl-client-dn",
    "x-client-cert",
    "x-client-dn",
    "ssl-client-cert",
    "x-forwarded-client-cert",
    "x-arr-clientcert",
    "x-amzn-oidc-data",
    "x-amzn-oidc-identity",
    "x-amzn-oidc-accesstoken",
    "x-ms-client-principal",
    "x-ms-client-principal-name",
    "x-ms-client-principal-id",
    "x-goog-authenticated-user-email",
    "x-goog-authenticated-user-id",
    "x-goog-iap-jwt-assertion",
    "cf-access-jwt-assertion",
    "cf-access-authenticated-user-email",
];

/// Bytes kept as they are when the id is put back into an origin path.
const ID_KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `id` as it goes into an origin URL path.
pub fn encode_id(id: &str) -> String {
    utf8_percent_encode(id, ID_KEEP).to_string()
}
