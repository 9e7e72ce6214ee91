//! Typed configuration: the TOML file format (`RawConfig`), command-line overrides, and
//! validation into a ready-to-use `Config` with every error reported with its location.

pub use crate::admin::AdminConfig;
pub use crate::cache::fill::FillConfig;
use crate::cache::negotiate::{
    Coding, CompressionConfig, DEFAULT_BROTLI_QUALITY, DEFAULT_GZIP_LEVEL, DEFAULT_MIN_SAVING_PERCENT,
};
pub use crate::cache::policy::IgnoreResponse;
pub use crate::cache::shared::SharedConfig;
pub use crate::cache::target::{
    AccessPolicy, AuthCheck, FillHeaders, DEFAULT_CACHE_ENTRIES, DEFAULT_CACHE_TTL, DEFAULT_CREDENTIAL_HEADERS,
    DEFAULT_DENY_TTL, DEFAULT_FORWARD_HEADERS,
};
use crate::cache::validate::{parse_pointer, Assertion, Check, OnFail, Validation};
pub use crate::logging::{LogConfig, LogFormat};
pub use crate::origin::OriginConfig;
pub use crate::rules::{QueryPolicy, RuleConfig};
use serde::Deserialize;
use std::sync::Arc;
use std::{net::SocketAddr, path::PathBuf, time::Duration};
use toml::Spanned;

/// The file format, as written by operators. Strings that need checking are `Spanned`
/// so that each error can point at its line and column.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub origin: RawOrigin,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub log: RawLog,
    /// The shared store (second tier); absent: none.
    pub shared: Option<RawShared>,
    /// `None` (no `[[rules]]` in the file) means the built-in batch-results rule.
    pub rules: Option<Vec<RawRule>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<String>>,
    pub header_read_timeout: Option<Spanned<String>>,
    pub max_header_bytes: Option<Spanned<String>>,
    pub max_connections: Option<usize>,
    pub send_buffer: Option<Spanned<String>>,
    pub workers: Option<usize>,
    pub pin_workers: Option<bool>,
    /// Removed settings, still accepted (ignored, with a notice) so an old file keeps working.
    pub yield_interval: Option<Spanned<toml::Value>>,
    pub worker_slice: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOrigin {
    pub url: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub response_timeout: Option<Spanned<String>>,
    pub body_idle_timeout: Option<Spanned<String>>,
    pub pool_idle_timeout: Option<Spanned<String>>,
    pub pool_max_idle_per_host: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Spanned<String>>,
    pub token: Option<String>,
}

/// `[shared]`: an S3-compatible object store shared by several replicas.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShared {
    /// `s3://BUCKET[/prefix]`.
    pub url: Option<Spanned<String>>,
    /// S3 endpoints tried in turn (e.g. each node of a cluster); absent: AWS.
    pub endpoints: Option<Vec<Spanned<String>>>,
    pub region: Option<String>,
    /// Credentials; the `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` variables are preferred.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Virtual-hosted-style addressing (`BUCKET.host`); the default is path style.
    pub virtual_hosted_style: Option<bool>,
    pub timeout: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub transfer_timeout: Option<Spanned<String>>,
    pub probe_interval: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub access: Option<bool>,
    pub format: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub memory_tier: Option<Spanned<String>>,
    pub memory_recheck: Option<Spanned<String>>,
    pub memory_object_max: Option<Spanned<String>>,
    pub scrub_rate: Option<Spanned<String>>,
    pub max_size: Option<Spanned<String>>,
    pub gc_interval: Option<Spanned<String>>,
    pub gc_grace: Option<Spanned<String>>,
    pub dir: Option<Spanned<String>>,
    pub replay_buffer: Option<Spanned<String>>,
    pub wait_timeout: Option<Spanned<String>>,
    pub fill_timeout: Option<Spanned<String>>,
    pub min_free: Option<Spanned<String>>,
    pub max_fills: Option<usize>,
    pub max_fills_per_worker: Option<usize>,
    pub fill_queue: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Spanned<String>,
    pub path: Spanned<String>,
    pub id_pattern: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub query: Option<Spanned<String>>,
    /// The body must be valid JSON before it is stored.
    pub json: Option<bool>,
    /// Entries older than this are refetched (absent: kept until purged or evicted).
    pub ttl: Option<Spanned<String>>,
    /// Serve an expired entry when the origin fails or answers 5xx.
    pub stale_if_error: Option<bool>,
    /// Who may get a stored entry: "public", or "auth" with `[rules.auth]`.
    pub access: Option<Spanned<String>>,
    pub auth: Option<RawAuth>,
    /// Response headers that do not prevent storing on this route.
    pub ignore_response: Option<Vec<Spanned<String>>>,
    /// Client request headers a fill forwards (replaces the default list).
    pub forward_headers: Option<Vec<Spanned<String>>>,
    /// Request headers that carry credentials (replaces the default list).
    pub credential_headers: Option<Vec<Spanned<String>>>,
    /// `[rules.service_headers]`: headers every fill sends, each value read from the named
    /// environment variable (a service token: never written in this file, never logged).
    pub service_headers: Option<std::collections::BTreeMap<String, Spanned<String>>>,
    /// Largest body stored on this route; larger ones are served, never written.
    pub max_object_size: Option<Spanned<String>>,
    #[serde(default, rename = "assert")]
    pub asserts: Vec<RawAssert>,
    /// `[rules.compression]`: which precompressed variants are kept and served.
    pub compression: Option<RawCompression>,
}

/// `[rules.compression]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompression {
    pub encodings: Option<Vec<Spanned<String>>>,
    pub brotli_quality: Option<Spanned<i64>>,
    pub gzip_level: Option<Spanned<i64>>,
    pub min_saving_percent: Option<Spanned<i64>>,
}

/// `[rules.auth]`: the backend URL that decides, per request, whether a client may get a batch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub url: Spanned<String>,
    pub timeout: Option<Spanned<String>>,
    /// How long an allow is kept ("0s": not kept).
    pub cache_ttl: Option<Spanned<String>>,
    /// How long a refusal is kept ("0s": not kept).
    pub deny_ttl: Option<Spanned<String>>,
    /// Decisions kept at most.
    pub cache_entries: Option<usize>,
}

/// `[[rules.assert]]`: a check on the values at a JSON pointer before storing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAssert {
    pub pointer: Spanned<String>,
    pub equals: Option<String>,
    pub one_of: Option<Vec<String>>,
    #[serde(default)]
    pub optional: bool,
    pub on_fail: Option<Spanned<String>>,
}

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub header_read_timeout: Duration,
    /// Largest request head accepted (then 431).
    pub max_header_bytes: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// `SO_SNDBUF` of client connections (0: the kernel's autotuning).
    pub send_buffer: usize,
    /// Runtime worker threads (0: one per core).
    pub workers: usize,
    /// Each worker pinned to a core of its own; see [`crate::server::runtime`].
    pub pin_workers: bool,
    pub origin: OriginConfig,
    pub cache_dir: PathBuf,
    /// Cap on the bytes of live entries (0: none).
    pub max_size: u64,
    /// Free space kept on the cache's file system: below it, answers are served and not
    /// stored (0: off).
    pub min_free: u64,
    /// Bytes of verified small bodies kept in memory, and the largest body kept.
    pub memory_tier: u64,
    pub memory_object_max: u64,
    /// How often a memory-tier hit re-checks that its file is unchanged.
    pub memory_recheck: Duration,
    /// Bytes per second the scrubber re-hashes (0: off).
    pub scrub_rate: u64,
    pub gc_interval: Duration,
    /// Content files younger than this are never collected.
    pub gc_grace: Duration,
    pub fill: FillConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub rules: Vec<RuleConfig>,
    /// The shared store, if one is configured (a change needs a restart).
    pub shared: Option<SharedConfig>,
    /// What the file says that is accepted but has no effect (removed settings), one line each:
    /// logged as warnings at start and printed by `check-config`.
    pub notices: Vec<String>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ORIGIN: &str = "http://127.0.0.1:5000";
pub const DEFAULT_CACHE_DIR: &str = "./lotecache-data";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";
pub const DEFAULT_RULE_PATH: &str = "/download_batch_results/{lote_id}";
pub const DEFAULT_ID_PATTERN: &str = "[A-Za-z0-9._-]{1,128}";
pub const DEFAULT_KEY: &str = "{lote_id}_resultados.json";

/// One problem in a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `file:line:column`, `--flag`, or `file` when no finer location is known.
    pub location: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.location, self.field, self.message)
    }
}

/// Command-line values that replace the file's.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub origin: Option<String>,
    pub cache_dir: Option<String>,
    pub admin_listen: Option<String>,
    pub log_format: Option<String>,
    /// `--shared-store s3://BUCKET[/prefix]`.
    pub shared_store: Option<String>,
    /// `--s3-endpoint URL`, repeatable: replaces the file's endpoints.
    pub s3_endpoints: Vec<String>,
}

/// Reads, parses and validates a config file (or the built-in defaults when `path` is None),
/// applying `overrides`. Returns every error found.
pub fn load(path: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, Vec<ConfigError>> {
    let (name, text) = match path {
        None => ("<defaults>".to_string(), String::new()),
        Some(p) => {
            let name = p.display().to_string();
            match std::fs::read_to_string(p) {
                Ok(t) => (name, t),
                Err(e) => {
                    return Err(vec![ConfigError {
                        location: name,
                        field: "file".into(),
                        message: format!("cannot read: {e}"),
                    }])
                }
            }
        }
    };
    let mut config = parse(&name, &text, overrides)?;
    if let Ok(token) = std::env::var("LOTECACHE_ADMIN_TOKEN") {
        if !token.is_empty() {
            config.admin.token = Some(token);
        }
    }
    Ok(config)
}

/// Prints every error of a config that could not be loaded, then their count, on stderr; the
/// exit status of a command that stops there.
pub fn print_errors(errors: &[ConfigError]) -> std::process::ExitCode {
    for e in errors {
        eprintln!("{e}");
    }
    eprintln!("{} error(s)", errors.len());
    std::process::ExitCode::FAILURE
}

/// Parses and validates config `text`; `name` is used in error locations.
pub fn parse(name: &str, text: &str, overrides: &Overrides) -> Result<Config, Vec<ConfigError>> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let location = match e.span() {
            Some(span) => locate(name, text, span.start),
            None => name.to_string(),
        };
        vec![ConfigError { location, field: "syntax".into(), message: e.message().trim().to_string() }]
    })?;
    Validator { name, text, errors: Vec::new(), notices: Vec::new() }.run(raw, overrides)
}

/// `name:line:column` for a byte offset into `text` (1-based, columns in characters).
fn locate(name: &str, text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    format!("{name}:{line}:{col}")
}

struct Validator<'a> {
    name: &'a str,
    text: &'a str,
    errors: Vec<ConfigError>,
    /// Warnings that do not stop the configuration (`Config::notices`).
    notices: Vec<String>,
}

/// A value to validate, with where it came from.
struct Located<'v> {
    value: &'v str,
    location: String,
}

impl<'a> Validator<'a> {
    /// The override if given, else the file's value, else the default.
    fn pick<'v>(
        &self,
        flag: Option<&'v str>,
        flag_name: &str,
        file: Option<&'v Spanned<String>>,
        default: &'v str,
    ) -> Located<'v> {
        if let Some(v) = flag {
            return Located { value: v, location: flag_name.to_string() };
        }
        match file {
            Some(s) => Located { value: s.get_ref(), location: locate(self.name, self.text, s.span().start) },
            None => Located { value: default, location: format!("{} (default)", self.name) },
        }
    }

    fn err(&mut self, at: &Located<'_>, field: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            location: at.location.clone(),
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn duration(&mut self, field: &str, value: Option<&Spanned<String>>, default: &str) -> Duration {
        let at = self.pick(None, "", value, default);
        match humantime::parse_duration(at.value) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.err(&at, field, "must be greater than zero");
                Duration::from_secs(1)
            }
            Err(e) => {
                self.err(&at, field, format!("not a duration ({e}); write e.g. \"30s\", \"5m\""));
                Duration::from_secs(1)
            }
        }
    }

    /// A count that must be at least one.
    fn count(&mut self, field: &str, value: Option<usize>, default: usize) -> usize {
        match value {
            Some(0) => {
                let at = Located { value: "", location: self.name.to_string() };
                self.err(&at, field, "must be at least 1");
                1
            }
            Some(n) => n,
            None => default,
        }
    }

    fn size(&mut self, field: &str, value: Option<&Spanned<String>>, default: &str) -> u64 {
        let at = self.pick(None, "", value, default);
        match at.value.parse::<bytesize::ByteSize>() {
            Ok(b) if b.as_u64() > 0 => b.as_u64(),
            Ok(_) => {
                self.err(&at, field, "must be greater than zero");
                1
            }
            Err(e) => {
                self.err(&at, field, format!("not a size ({e}); write e.g. \"32MiB\", \"1GB\""));
                1
            }
        }
    }

    /// A size where `"0"` (or `"off"`) means off.
    /// A duration where `"0s"`/`"0"`/`"off"` mean none.
    fn duration_or_zero(&mut self, field: &str, value: Option<&Spanned<String>>, default: Duration) -> Duration {
        match value.map(|v| v.get_ref().trim()) {
            None => default,
            Some("0" | "off") => Duration::ZERO,
            Some(_) => {
                let at = self.pick(None, "", value, "");
                match humantime::parse_duration(at.value) {
                    Ok(d) => d,
                    Err(e) => {
                        self.err(&at, field, format!("not a duration ({e}); write e.g. \"5s\", or \"0s\" for none"));
                        default
                    }
                }
            }
        }
    }

    fn size_or_zero(&mut self, field: &str, value: Option<&Spanned<String>>, default: &str) -> u64 {
        match value.map(|v| v.get_ref().trim()) {
            Some("0") | Some("off") => 0,
            _ => self.size(field, value, default),
        }
    }

    fn run(mut self, raw: RawConfig, ov: &Overrides) -> Result<Config, Vec<ConfigError>> {
        let listen_at = self.pick(ov.listen.as_deref(), "--listen", raw.server.listen.as_ref(), DEFAULT_LISTEN);
        let listen = match listen_at.value.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.err(
                    &listen_at,
                    "server.listen",
                    format!("{:?} is not an address like 127.0.0.1:8080", listen_at.value),
                );
                SocketAddr::from(([127, 0, 0, 1], 8080))
            }
        };
        let header_read_timeout =
            self.duration("server.header_read_timeout", raw.server.header_read_timeout.as_ref(), "10s");
        let max_header_bytes =
            (self.size("server.max_header_bytes", raw.server.max_header_bytes.as_ref(), "64KiB") as usize).max(8192);
        let max_connections = raw.server.max_connections.unwrap_or(10_000).max(1);
        let send_buffer = self.size_or_zero("server.send_buffer", raw.server.send_buffer.as_ref(), "256KiB") as usize;
        let workers = raw.server.workers.unwrap_or(0);
        let pin_workers = raw.server.pin_workers.unwrap_or(false);
        let mut notices = Vec::new();
        for (field, removed) in
            [("server.yield_interval", &raw.server.yield_interval), ("server.worker_slice", &raw.server.worker_slice)]
        {
            if let Some(v) = removed {
                let at = locate(self.name, self.text, v.span().start);
                notices.push(format!("{at}: {field} was removed (it only helped a saturated benchmark); ignored"));
            }
        }

        let url_at = self.pick(ov.origin.as_deref(), "--origin", raw.origin.url.as_ref(), DEFAULT_ORIGIN);
        let (scheme, authority) = match parse_origin_url(url_at.value) {
            Ok(v) => v,
            Err(msg) => {
                self.err(&url_at, "origin.url", msg);
                (http::uri::Scheme::HTTP, http::uri::Authority::from_static("127.0.0.1:5000"))
            }
        };
        let origin = OriginConfig {
            scheme,
            authority,
            connect_timeout: self.duration("origin.connect_timeout", raw.origin.connect_timeout.as_ref(), "5s"),
            response_timeout: self.duration("origin.response_timeout", raw.origin.response_timeout.as_ref(), "120s"),
            body_idle_timeout: self.duration("origin.body_idle_timeout", raw.origin.body_idle_timeout.as_ref(), "30s"),
            pool_idle_timeout: self.duration("origin.pool_idle_timeout", raw.origin.pool_idle_timeout.as_ref(), "90s"),
            pool_max_idle_per_host: raw.origin.pool_max_idle_per_host.unwrap_or(64),
        };

        let dir_at = self.pick(ov.cache_dir.as_deref(), "--cache-dir", raw.cache.dir.as_ref(), DEFAULT_CACHE_DIR);
        if dir_at.value.trim().is_empty() {
            self.err(&dir_at, "cache.dir", "must not be empty");
        }
        let cache_dir = PathBuf::from(dir_at.value);
        let max_size = match &raw.cache.max_size {
            None => 0,
            Some(v) => self.size("cache.max_size", Some(v), "0"),
        };
        let memory_tier = self.size_or_zero("cache.memory_tier", raw.cache.memory_tier.as_ref(), "128MiB");
        let memory_object_max = self.size("cache.memory_object_max", raw.cache.memory_object_max.as_ref(), "1MiB");
        let memory_recheck = self.duration("cache.memory_recheck", raw.cache.memory_recheck.as_ref(), "1s");
        let scrub_rate = self.size_or_zero("cache.scrub_rate", raw.cache.scrub_rate.as_ref(), "4MiB");
        let gc_interval = self.duration("cache.gc_interval", raw.cache.gc_interval.as_ref(), "10m");
        let gc_grace = self.duration("cache.gc_grace", raw.cache.gc_grace.as_ref(), "2m");
        let admin_at =
            self.pick(ov.admin_listen.as_deref(), "--admin-listen", raw.admin.listen.as_ref(), DEFAULT_ADMIN_LISTEN);
        let admin_listen = match admin_at.value.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.err(
                    &admin_at,
                    "admin.listen",
                    format!("{:?} is not an address like 127.0.0.1:9091", admin_at.value),
                );
                SocketAddr::from(([127, 0, 0, 1], 9091))
            }
        };
        let admin = AdminConfig { listen: admin_listen, token: raw.admin.token.clone().filter(|t| !t.is_empty()) };
        let format_at = self.pick(ov.log_format.as_deref(), "--log-format", raw.log.format.as_ref(), "text");
        let format = match format_at.value {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                self.err(&format_at, "log.format", format!("{other:?} is not one of \"text\", \"json\""));
                LogFormat::Text
            }
        };
        let log = LogConfig {
            level: raw.log.level.clone().unwrap_or_else(|| "info".into()),
            access: raw.log.access.unwrap_or(true),
            format,
        };
        let fill = FillConfig {
            replay_buffer: self.size("cache.replay_buffer", raw.cache.replay_buffer.as_ref(), "32MiB"),
            wait_timeout: self.duration("cache.wait_timeout", raw.cache.wait_timeout.as_ref(), "130s"),
            fill_timeout: self.duration("cache.fill_timeout", raw.cache.fill_timeout.as_ref(), "15m"),
            max_fills: self.count("cache.max_fills", raw.cache.max_fills, 64),
            max_fills_per_worker: self.count("cache.max_fills_per_worker", raw.cache.max_fills_per_worker, 32),
            fill_queue: raw.cache.fill_queue.unwrap_or(1024),
        };
        let min_free = self.size_or_zero("cache.min_free", raw.cache.min_free.as_ref(), "256MiB");

        let shared = self.shared(raw.shared.as_ref(), ov);

        let rules = match &raw.rules {
            None => vec![default_rule()],
            Some(list) => {
                let mut names = std::collections::HashSet::new();
                let mut keys = std::collections::HashMap::new();
                let mut out = Vec::new();
                for r in list {
                    if !names.insert(r.name.get_ref().clone()) {
                        let at = self.pick(None, "", Some(&r.name), "");
                        self.err(&at, "rules.name", format!("duplicate rule name {:?}", r.name.get_ref()));
                    }
                    // Entries are namespaced by rule, so overlapping keys are never confused;
                    // one template twice is still a mistake (two rules fighting over one file).
                    let key_at = self.pick(None, "", r.key.as_ref(), DEFAULT_KEY);
                    let template = key_at.value.to_string();
                    if let Some(first) = keys.insert(template.clone(), r.name.get_ref().clone()) {
                        self.err(
                            &key_at,
                            "rules.key",
                            format!(
                                "rules {first:?} and {:?} have the same key template {template:?}; give each rule its own",
                                r.name.get_ref()
                            ),
                        );
                    }
                    if let Some(rule) = self.rule(r) {
                        out.push(rule);
                    }
                }
                out
            }
        };

        notices.append(&mut self.notices);
        if self.errors.is_empty() {
            Ok(Config {
                listen,
                header_read_timeout,
                max_header_bytes,
                max_connections,
                send_buffer,
                workers,
                pin_workers,
                notices,
                origin,
                cache_dir,
                max_size,
                min_free,
                memory_tier,
                memory_object_max,
                memory_recheck,
                scrub_rate,
                gc_interval,
                gc_grace,
                fill,
                admin,
                log,
                rules,
                shared,
            })
        } else {
            Err(self.errors)
        }
    }

    fn shared(&mut self, raw: Option<&RawShared>, ov: &Overrides) -> Option<SharedConfig> {
        let default = RawShared::default();
        let r = raw.unwrap_or(&default);
        let url_at = match (ov.shared_store.as_deref(), r.url.as_ref()) {
            (None, None) => {
                if raw.is_some() || !ov.s3_endpoints.is_empty() {
                    let location = if ov.s3_endpoints.is_empty() { self.name } else { "--s3-endpoint" };
                    let at = Located { value: "", location: location.to_string() };
                    self.err(
                        &at,
                        "shared.url",
                        "a shared store needs its location: shared.url or --shared-store s3://BUCKET[/prefix]",
                    );
                }
                return None;
            }
            (flag, file) => self.pick(flag, "--shared-store", file, ""),
        };
        let (bucket, prefix) =
            match url_at.value.strip_prefix("s3://").map(|rest| rest.split_once('/').unwrap_or((rest, ""))) {
                Some((b, p))
                    if !b.is_empty()
                        && b.len() <= 63
                        && b.bytes()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.') =>
                {
                    (b.to_string(), p.trim_matches('/').to_string())
                }
                _ => {
                    self.err(
                        &url_at,
                        "shared.url",
                        format!(
                            "{:?} is not s3://BUCKET[/prefix] (bucket: lowercase letters, digits, '-', '.')",
                            url_at.value
                        ),
                    );
                    (String::new(), String::new())
                }
            };
        let mut endpoints = Vec::new();
        if !ov.s3_endpoints.is_empty() {
            for e in &ov.s3_endpoints {
                let at = Located { value: e, location: "--s3-endpoint".into() };
                if let Some(e) = self.endpoint(&at) {
                    endpoints.push(e);
                }
            }
        } else {
            for e in r.endpoints.iter().flatten() {
                let at = self.pick(None, "", Some(e), "");
                if let Some(e) = self.endpoint(&at) {
                    endpoints.push(e);
                }
            }
        }
        let (timeout, transfer_timeout) = (
            self.duration("shared.timeout", r.timeout.as_ref(), "5s"),
            self.duration("shared.transfer_timeout", r.transfer_timeout.as_ref(), "120s"),
        );
        if transfer_timeout < timeout {
            let at = self.pick(None, "", r.transfer_timeout.as_ref(), "120s");
            self.err(&at, "shared.transfer_timeout", "must not be shorter than shared.timeout");
        }
        let keys = (r.access_key_id.as_deref().unwrap_or(""), r.secret_access_key.as_deref().unwrap_or(""));
        if keys.0.is_empty() != keys.1.is_empty() {
            let at = Located { value: "", location: self.name.to_string() };
            self.err(&at, "shared.access_key_id", "set both access_key_id and secret_access_key, or neither");
        }
        Some(SharedConfig {
            bucket,
            prefix,
            endpoints,
            region: r.region.clone().filter(|s| !s.is_empty()),
            access_key_id: r.access_key_id.clone().filter(|s| !s.is_empty()),
            secret_access_key: r.secret_access_key.clone().filter(|s| !s.is_empty()),
            virtual_hosted: r.virtual_hosted_style.unwrap_or(false),
            timeout,
            connect_timeout: self.duration("shared.connect_timeout", r.connect_timeout.as_ref(), "2s"),
            transfer_timeout,
            probe_interval: self.duration("shared.probe_interval", r.probe_interval.as_ref(), "10s"),
        })
    }

    fn endpoint(&mut self, at: &Located<'_>) -> Option<String> {
        match at.value.parse::<http::Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => {
                Some(at.value.trim_end_matches('/').to_string())
            }
            _ => {
                self.err(at, "shared.endpoints", format!("{:?} is not an http:// or https:// URL", at.value));
                None
            }
        }
    }

    fn rule(&mut self, r: &RawRule) -> Option<RuleConfig> {
        let before = self.errors.len();
        let path_at = self.pick(None, "", Some(&r.path), "");
        let (path_prefix, path_suffix) = match split_placeholder(path_at.value) {
            Some((p, s)) if p.starts_with('/') && !s.contains('{') && !p.contains('{') => (p, s),
            _ => {
                self.err(&path_at, "rules.path", "must start with '/' and contain {lote_id} exactly once");
                (String::new(), String::new())
            }
        };
        let pat_at = self.pick(None, "", r.id_pattern.as_ref(), DEFAULT_ID_PATTERN);
        let id_pattern = match crate::rules::IdPattern::new(pat_at.value) {
            Ok(re) => Some(re),
            Err(e) => {
                self.err(&pat_at, "rules.id_pattern", format!("invalid regular expression: {e}"));
                None
            }
        };
        let key_at = self.pick(None, "", r.key.as_ref(), DEFAULT_KEY);
        let (key_prefix, key_suffix) = match split_placeholder(key_at.value) {
            Some((p, s)) if !p.contains('{') && !s.contains('{') => (p, s),
            _ => {
                self.err(&key_at, "rules.key", "must contain {lote_id} exactly once");
                (String::new(), String::new())
            }
        };
        let q_at = self.pick(None, "", r.query.as_ref(), "reject");
        let query = match q_at.value {
            "reject" => QueryPolicy::Reject,
            "key" => QueryPolicy::Key,
            other => {
                self.err(&q_at, "rules.query", format!("{other:?} is not one of \"reject\", \"key\""));
                QueryPolicy::Reject
            }
        };
        let validation = self.validation(r);
        let ttl = r.ttl.as_ref().map(|t| self.duration("rules.ttl", Some(t), "1s"));
        let access = self.access(r);
        let mut ignore = IgnoreResponse::default();
        for name in r.ignore_response.iter().flatten() {
            match name.get_ref().to_ascii_lowercase().as_str() {
                "set-cookie" => ignore.set_cookie = true,
                "cache-control" => ignore.cache_control = true,
                "vary" => ignore.vary = true,
                other => {
                    let at = self.pick(None, "", Some(name), "");
                    self.err(
                        &at,
                        "rules.ignore_response",
                        format!("{other:?} is not one of \"set-cookie\", \"cache-control\", \"vary\""),
                    );
                }
            }
        }
        let headers = self.fill_headers(r);
        if access == AccessPolicy::CredentialsBypass {
            // Anonymous fills would fetch with the service's rights and store what they get
            // for everyone: only a rule that checks access (or says it is public) may.
            if let Some(var) = r.service_headers.iter().flatten().next().map(|(_, v)| v) {
                let at = self.pick(None, "", Some(var), "");
                self.err(
                    &at,
                    "rules.service_headers",
                    "needs an access policy: a [rules.auth] check (or access = \"public\"), else anonymous requests would be filled with the service's rights and served to anyone",
                );
            }
        }
        let compression = self.compression(r.compression.as_ref());
        let max_object_size = r.max_object_size.as_ref().map(|m| self.size("rules.max_object_size", Some(m), "0"));
        if self.errors.len() > before {
            return None;
        }
        Some(RuleConfig {
            name: r.name.get_ref().clone(),
            path_prefix,
            path_suffix,
            id_pattern: id_pattern?,
            key_prefix,
            key_suffix,
            query,
            ttl,
            stale_if_error: r.stale_if_error.unwrap_or(true),
            access,
            ignore,
            validation: Arc::new(validation),
            headers: Arc::new(headers),
            max_object_size: max_object_size.filter(|&n| n > 0),
            compression: Arc::new(compression),
        })
    }

    /// `[rules.compression]`: absent, the defaults (brotli and gzip); `encodings = []`, none.
    fn compression(&mut self, raw: Option<&RawCompression>) -> CompressionConfig {
        let Some(raw) = raw else { return CompressionConfig::default() };
        let int = |this: &mut Self,
                   field: &str,
                   v: Option<&Spanned<i64>>,
                   range: std::ops::RangeInclusive<i64>,
                   default: u32| {
            let Some(v) = v else { return default };
            if range.contains(v.get_ref()) {
                return *v.get_ref() as u32;
            }
            let at = Located { value: "", location: locate(this.name, this.text, v.span().start) };
            this.err(&at, field, format!("must be between {} and {}", range.start(), range.end()));
            default
        };
        let br =
            int(self, "rules.compression.brotli_quality", raw.brotli_quality.as_ref(), 0..=11, DEFAULT_BROTLI_QUALITY);
        let gzip = int(self, "rules.compression.gzip_level", raw.gzip_level.as_ref(), 1..=9, DEFAULT_GZIP_LEVEL);
        let min_saving = int(
            self,
            "rules.compression.min_saving_percent",
            raw.min_saving_percent.as_ref(),
            0..=99,
            DEFAULT_MIN_SAVING_PERCENT as u32,
        );
        let mut codings = Vec::new();
        match &raw.encodings {
            None => codings = CompressionConfig::default().codings,
            Some(list) => {
                for name in list {
                    let at = self.pick(None, "", Some(name), "");
                    match Coding::from_token(name.get_ref().trim()) {
                        Some(c) if codings.iter().any(|(k, _)| *k == c) => {
                            self.err(&at, "rules.compression.encodings", format!("{:?} is listed twice", c.token()))
                        }
                        Some(c) => codings.push((c, 0)),
                        None => self.err(
                            &at,
                            "rules.compression.encodings",
                            format!("{:?} is not one of \"br\", \"gzip\"", name.get_ref()),
                        ),
                    }
                }
            }
        }
        for (c, level) in &mut codings {
            *level = match c {
                Coding::Br => br,
                Coding::Gzip => gzip,
            };
        }
        CompressionConfig { codings, min_saving_percent: min_saving as u8 }
    }

    /// A rule's fill header lists: each name a valid header name, no hop-by-hop one, and no
    /// credential in the forwarded list (credentials go only where an access check ran); and
    /// its service headers, their values read from the environment.
    fn fill_headers(&mut self, r: &RawRule) -> FillHeaders {
        let mut out = self.fill_header_lists(r);
        for (name, var) in r.service_headers.iter().flatten() {
            let at = self.pick(None, "", Some(var), "");
            let field = "rules.service_headers";
            let header = match http::HeaderName::from_bytes(name.trim().as_bytes()) {
                Ok(h) if crate::headers::is_hop_by_hop(h.as_str()) => {
                    self.err(&at, field, format!("{name:?} is a hop-by-hop header; it is never forwarded"));
                    continue;
                }
                Ok(h) if out.credentials.contains(&h) || out.forward.contains(&h) => {
                    self.err(
                        &at,
                        field,
                        format!("{name:?} is also a credential or forwarded header: a fill would send one in place of the other"),
                    );
                    continue;
                }
                Ok(h) => h,
                Err(_) => {
                    self.err(&at, field, format!("{name:?} is not a header name"));
                    continue;
                }
            };
            // The value is never put in a message: only the variable's name.
            match std::env::var(at.value) {
                Ok(v) if !v.is_empty() => match http::HeaderValue::from_str(&v) {
                    Ok(mut value) => {
                        value.set_sensitive(true);
                        out.service.push((header, value));
                    }
                    Err(_) => self.err(
                        &at,
                        field,
                        format!("the environment variable {} is not a valid header value", at.value),
                    ),
                },
                // Warms of this rule are then refused by the backend (not stored); the clicks
                // of users still fill with their own credentials.
                _ => self.notices.push(format!(
                    "{}: {field}: the environment variable {} is not set (or empty): fills of rule {:?} go without {}",
                    at.location,
                    at.value,
                    r.name.get_ref(),
                    header.as_str()
                )),
            }
        }
        out
    }

    fn fill_header_lists(&mut self, r: &RawRule) -> FillHeaders {
        let mut out = FillHeaders::default();
        let names = |this: &mut Self, field: &str, list: &[Spanned<String>]| -> Vec<http::HeaderName> {
            let mut v = Vec::new();
            for n in list {
                let at = this.pick(None, "", Some(n), "");
                match http::HeaderName::from_bytes(n.get_ref().trim().as_bytes()) {
                    Ok(h) if crate::headers::is_hop_by_hop(h.as_str()) => {
                        this.err(&at, field, format!("{:?} is a hop-by-hop header; it is never forwarded", h.as_str()))
                    }
                    Ok(h) => v.push(h),
                    Err(_) => this.err(&at, field, format!("{:?} is not a header name", n.get_ref())),
                }
            }
            v
        };
        if let Some(list) = &r.credential_headers {
            out.credentials = names(self, "rules.credential_headers", list);
        }
        if let Some(list) = &r.forward_headers {
            out.forward = names(self, "rules.forward_headers", list);
            // Each written name against the credential list (the valid ones: an invalid name
            // was reported above).
            for n in list {
                let Ok(h) = http::HeaderName::from_bytes(n.get_ref().trim().as_bytes()) else { continue };
                if out.credentials.contains(&h) {
                    let at = self.pick(None, "", Some(n), "");
                    self.err(
                        &at,
                        "rules.forward_headers",
                        format!(
                            "{:?} is a credential header: fills forward credentials only on a rule with an access check ([rules.auth])",
                            h.as_str()
                        ),
                    );
                }
            }
        }
        out
    }

    fn access(&mut self, r: &RawRule) -> AccessPolicy {
        let written = r.access.as_ref().map(|a| (a.get_ref().as_str(), self.pick(None, "", Some(a), "")));
        match (written, &r.auth) {
            (None, None) => AccessPolicy::CredentialsBypass,
            (Some(("public", _)), None) => AccessPolicy::Public,
            (Some(("auth", _)) | None, Some(auth)) => {
                let at = self.pick(None, "", Some(&auth.url), "");
                let absolute = at
                    .value
                    .parse::<http::Uri>()
                    .ok()
                    .is_some_and(|u| u.scheme() == Some(&http::uri::Scheme::HTTP) && u.authority().is_some());
                if !absolute && !at.value.starts_with('/') {
                    self.err(
                        &at,
                        "rules.auth.url",
                        "must be a path on the origin (\"/...\") or an absolute http:// URL ({lote_id} is replaced)",
                    );
                }
                let timeout = self.duration("rules.auth.timeout", auth.timeout.as_ref(), "5s");
                let cache_ttl =
                    self.duration_or_zero("rules.auth.cache_ttl", auth.cache_ttl.as_ref(), DEFAULT_CACHE_TTL);
                let deny_ttl = self.duration_or_zero("rules.auth.deny_ttl", auth.deny_ttl.as_ref(), DEFAULT_DENY_TTL);
                let cache_entries = auth.cache_entries.unwrap_or(DEFAULT_CACHE_ENTRIES).max(1);
                AccessPolicy::Auth(Arc::new(AuthCheck {
                    url: at.value.to_string(),
                    timeout,
                    cache_ttl,
                    deny_ttl,
                    cache_entries,
                }))
            }
            (Some(("auth", at)), None) => {
                self.err(&at, "rules.access", "\"auth\" needs a [rules.auth] table with its url");
                AccessPolicy::CredentialsBypass
            }
            (Some(("public", at)), Some(_)) => {
                self.err(&at, "rules.access", "\"public\" contradicts the [rules.auth] table");
                AccessPolicy::Public
            }
            (Some((other, at)), _) => {
                self.err(&at, "rules.access", format!("{other:?} is not one of \"public\", \"auth\""));
                AccessPolicy::CredentialsBypass
            }
        }
    }

    fn validation(&mut self, r: &RawRule) -> Validation {
        let mut asserts = Vec::new();
        for a in &r.asserts {
            let at = self.pick(None, "", Some(&a.pointer), "");
            let segments = match parse_pointer(at.value) {
                Ok(s) => s,
                Err(msg) => {
                    self.err(&at, "rules.assert.pointer", msg);
                    continue;
                }
            };
            let check = match (&a.equals, &a.one_of) {
                (Some(t), None) => Check::Equals(t.clone()),
                (None, Some(list)) if !list.is_empty() => Check::OneOf(list.clone()),
                _ => {
                    self.err(&at, "rules.assert", "give exactly one of `equals` or a non-empty `one_of`");
                    continue;
                }
            };
            let fail_at = self.pick(None, "", a.on_fail.as_ref(), "abort");
            let on_fail = match fail_at.value {
                "abort" => OnFail::Abort,
                "dont-store" => OnFail::DontStore,
                other => {
                    self.err(
                        &fail_at,
                        "rules.assert.on_fail",
                        format!("{other:?} is not one of \"abort\", \"dont-store\""),
                    );
                    continue;
                }
            };
            asserts.push(Assertion { pointer: at.value.to_string(), segments, check, optional: a.optional, on_fail });
        }
        Validation { json: r.json.unwrap_or(false), asserts }
    }
}

/// The built-in rule: `GET|HEAD /download_batch_results/{lote_id}` → `{lote_id}_resultados.json`.
pub fn default_rule() -> RuleConfig {
    let (path_prefix, path_suffix) = split_placeholder(DEFAULT_RULE_PATH).expect("default path");
    let (key_prefix, key_suffix) = split_placeholder(DEFAULT_KEY).expect("default key");
    RuleConfig {
        name: "batch-results".into(),
        path_prefix,
        path_suffix,
        id_pattern: crate::rules::IdPattern::new(DEFAULT_ID_PATTERN).expect("default pattern"),
        key_prefix,
        key_suffix,
        query: QueryPolicy::Reject,
        ttl: None,
        stale_if_error: true,
        access: AccessPolicy::CredentialsBypass,
        ignore: IgnoreResponse::default(),
        validation: Arc::new(Validation::default()),
        headers: Arc::new(FillHeaders::default()),
        max_object_size: None,
        compression: Arc::new(CompressionConfig::default()),
    }
}

/// Splits `a{lote_id}b` into `("a", "b")`; None unless the placeholder appears exactly once.
fn split_placeholder(s: &str) -> Option<(String, String)> {
    const P: &str = "{lote_id}";
    let (a, b) = s.split_once(P)?;
    if b.contains(P) {
        return None;
    }
    Some((a.to_string(), b.to_string()))
}

fn parse_origin_url(s: &str) -> Result<(http::uri::Scheme, http::uri::Authority), String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    let scheme = uri.scheme().cloned().ok_or_else(|| format!("{s:?} has no scheme; write http://host:port"))?;
    if scheme != http::uri::Scheme::HTTP {
        return Err(format!("{s:?}: only http:// origins are supported"));
    }
    let authority = uri.authority().cloned().ok_or_else(|| format!("{s:?} has no host"))?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{s:?}: the origin URL must not have a path or query"));
    }
    Ok((scheme, authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_gives_the_documented_defaults() {
        let c = parse("x", "", &Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.origin.authority.as_str(), "127.0.0.1:5000");
        assert_eq!(c.cache_dir, PathBuf::from("./lotecache-data"));
        assert_eq!(c.rules.len(), 1);
        assert_eq!(c.fill.replay_buffer, 32 * 1024 * 1024);
        assert_eq!(c.fill.fill_timeout, Duration::from_secs(900));
        assert_eq!(c.rules[0].path_prefix, "/download_batch_results/");
        assert_eq!(c.rules[0].key_suffix, "_resultados.json");
        assert_eq!(c.send_buffer, 256 * 1024);
        assert!(!c.pin_workers);
        assert!(c.notices.is_empty());
        let off = parse("x", "[server]\nsend_buffer = \"off\"\n", &Overrides::default()).unwrap();
        assert_eq!(off.send_buffer, 0);
    }

    #[test]
    fn a_removed_setting_is_ignored_with_a_notice_naming_its_line() {
        let c = parse("x", "[server]\nyield_interval = \"250us\"\nworker_slice = \"off\"\n", &Overrides::default())
            .expect("an old file still loads");
        assert_eq!(c.notices.len(), 2, "{:?}", c.notices);
        assert!(c.notices[0].starts_with("x:2:18: server.yield_interval was removed"), "{}", c.notices[0]);
        assert!(c.notices[1].starts_with("x:3:16: server.worker_slice was removed"), "{}", c.notices[1]);
    }

    #[test]
    fn every_semantic_error_is_reported_with_its_line() {
        let text = "[server]\nlisten = \"nope\"\n[origin]\nurl = \"ftp://x\"\nresponse_timeout = \"soon\"\n\
                    [[rules]]\nname = \"r\"\npath = \"/x\"\nid_pattern = \"[\"\n";
        let errs = parse("f.toml", text, &Overrides::default()).unwrap_err();
        let got: Vec<_> = errs.iter().map(|e| (e.location.as_str(), e.field.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("f.toml:2:10", "server.listen"),
                ("f.toml:4:7", "origin.url"),
                ("f.toml:5:20", "origin.response_timeout"),
                ("f.toml:8:8", "rules.path"),
                ("f.toml:9:14", "rules.id_pattern"),
            ]
        );
    }

    #[test]
    fn compression_is_brotli_and_gzip_by_default_and_each_rule_chooses() {
        let rule = |extra: &str| format!("[[rules]]\nname = \"r\"\npath = \"/d/{{lote_id}}\"\n{extra}");
        let compression =
            |extra: &str| parse("f", &rule(extra), &Overrides::default()).map(|c| c.rules[0].compression.clone());
        assert_eq!(*compression("").unwrap(), CompressionConfig::default());
        assert_eq!(default_rule().compression.codings, vec![(Coding::Br, 5), (Coding::Gzip, 6)]);
        let gzip_only =
            compression("[rules.compression]\nencodings = [\"gzip\"]\ngzip_level = 9\nmin_saving_percent = 25\n")
                .unwrap();
        assert_eq!(*gzip_only, CompressionConfig { codings: vec![(Coding::Gzip, 9)], min_saving_percent: 25 });
        assert!(compression("[rules.compression]\nencodings = []\n").unwrap().is_off());
        let errs = parse(
            "f",
            &rule("[rules.compression]\nencodings = [\"zstd\", \"br\", \"br\"]\nbrotli_quality = 12\ngzip_level = 0\nmin_saving_percent = 100\n"),
            &Overrides::default(),
        )
        .unwrap_err();
        let got: Vec<_> = errs.iter().map(|e| (e.location.as_str(), e.field.as_str(), e.message.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("f:6:18", "rules.compression.brotli_quality", "must be between 0 and 11"),
                ("f:7:14", "rules.compression.gzip_level", "must be between 1 and 9"),
                ("f:8:22", "rules.compression.min_saving_percent", "must be between 0 and 99"),
                ("f:5:14", "rules.compression.encodings", "\"zstd\" is not one of \"br\", \"gzip\""),
                ("f:5:28", "rules.compression.encodings", "\"br\" is listed twice"),
            ]
        );
    }

    #[test]
    fn unknown_keys_are_syntax_errors_with_location() {
        let errs = parse("f.toml", "[server]\nlisten_on = \"x\"\n", &Overrides::default()).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].location, "f.toml:2:1");
        assert!(errs[0].message.contains("unknown field"), "{}", errs[0].message);
    }

    #[test]
    fn access_policies_are_written_explicitly() {
        let rule = |extra: &str| format!("[[rules]]\nname = \"r\"\npath = \"/d/{{lote_id}}\"\n{extra}");
        let access = |extra: &str| parse("f", &rule(extra), &Overrides::default()).map(|c| c.rules[0].access.clone());
        assert_eq!(access("").unwrap(), AccessPolicy::CredentialsBypass);
        assert_eq!(access("access = \"public\"\n").unwrap(), AccessPolicy::Public);
        assert!(matches!(
            access("[rules.auth]\nurl = \"http://127.0.0.1:5000/acceso/{lote_id}\"\n").unwrap(),
            AccessPolicy::Auth { .. }
        ));
        assert_eq!(access("access = \"auth\"\n").unwrap_err()[0].field, "rules.access");
        assert_eq!(access("access = \"open\"\n").unwrap_err()[0].field, "rules.access");
        assert!(matches!(access("[rules.auth]\nurl = \"/acceso/{lote_id}\"\n").unwrap(), AccessPolicy::Auth { .. }));
        assert_eq!(access("[rules.auth]\nurl = \"acceso\"\n").unwrap_err()[0].field, "rules.auth.url");
    }

    #[test]
    fn flags_override_the_file() {
        let ov =
            Overrides { listen: Some("127.0.0.1:9".into()), cache_dir: Some("/tmp/c".into()), ..Default::default() };
        let c = parse("f", "[server]\nlisten = \"127.0.0.1:1\"\n", &ov).unwrap();
        assert_eq!(c.listen.port(), 9);
        assert_eq!(c.cache_dir, PathBuf::from("/tmp/c"));
        let ov = Overrides { listen: Some("bad".into()), ..Default::default() };
        let errs = parse("f", "", &ov).unwrap_err();
        assert_eq!(errs[0].location, "--listen");
    }

    #[test]
    fn the_shared_store_comes_from_the_file_or_the_flags_and_bad_values_are_located() {
        let file = "[shared]\nurl = \"s3://lotes/prod/batches/\"\nendpoints = [\"http://127.0.0.1:3900/\"]\ntimeout = \"1s\"\n";
        let c = parse("f", file, &Overrides::default()).unwrap().shared.unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("lotes", "prod/batches"));
        assert_eq!(c.endpoints, vec!["http://127.0.0.1:3900".to_string()]);
        assert_eq!((c.timeout, c.virtual_hosted), (Duration::from_secs(1), false));
        assert!(parse("f", "", &Overrides::default()).unwrap().shared.is_none());

        let ov = Overrides {
            shared_store: Some("s3://other".into()),
            s3_endpoints: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            ..Default::default()
        };
        let c = parse("f", file, &ov).unwrap().shared.unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("other", ""));
        assert_eq!(c.endpoints.len(), 2);

        let errs =
            parse("f", "[shared]\nurl = \"s3://Bad_Bucket\"\nendpoints = [\"ftp://x\"]\n", &Overrides::default())
                .unwrap_err();
        let got: Vec<_> = errs.iter().map(|e| (e.location.as_str(), e.field.as_str())).collect();
        assert_eq!(got, vec![("f:2:7", "shared.url"), ("f:3:14", "shared.endpoints")]);
        let ov = Overrides { s3_endpoints: vec!["http://127.0.0.1:1".into()], ..Default::default() };
        assert_eq!(parse("f", "", &ov).unwrap_err()[0].location, "--s3-endpoint");
    }
}
