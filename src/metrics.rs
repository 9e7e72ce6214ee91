//! Prometheus metrics of one proxy instance (its own registry, so several instances in one
//! process — tests — never mix their counts). Names are documented in docs/operations.md.

use crate::cache::negotiate::Coding;
use crate::cache::status::Outcome;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// Requests by outcome: hit, miss, collapsed, stale, pass, rejected, error.
    pub requests: IntCounterVec,
    pub stored: IntCounter,
    /// Cache-route responses not stored, by reason (origin-status-500, validation:…, …).
    pub not_stored: IntCounterVec,
    pub validation_failures: IntCounterVec,
    /// Stored entries that failed verification on read, by reason.
    pub integrity_failures: IntCounterVec,
    /// Stored entries that could not be read for a reason that proves nothing about them
    /// (I/O error, file table full, past the hit deadline): answered 503, kept.
    pub read_errors: IntCounter,
    /// Entries removed, by reason: lru, purge, corrupt, too-large.
    pub evictions: IntCounterVec,
    pub store_bytes: IntGauge,
    /// `cache.max_size` (0: no cap).
    pub store_max_bytes: IntGauge,
    pub store_entries: IntGauge,
    pub fills_in_flight: IntGauge,
    /// Time from sending a request to the origin to its response head.
    pub origin_latency: Histogram,
    /// Origin failures by kind: unreachable, timeout, error, status-5xx.
    pub origin_errors: IntCounterVec,
    /// Sum of the recorded generation time of each hit's entry.
    pub origin_seconds_saved: prometheus::Counter,
    /// Sum of the document size of each hit's entry: bytes the origin did not generate again.
    pub origin_bytes_saved: IntCounter,
    pub gc_removed_files: IntCounter,
    /// Shared-store operations by operation and result (ok, not-found, error, corrupt).
    pub shared_ops: IntCounterVec,
    /// 1 while the shared store answers, 0 after a failure until it answers again.
    pub shared_up: IntGauge,
    /// 1 when a shared store is configured (so a 0 in `shared_up` means down, not absent).
    pub shared_configured: IntGauge,
    /// Write-through uploads to the shared store not finished yet.
    pub shared_uploads_pending: IntGauge,
    /// Compressed variants stored, by coding.
    pub variants_built: IntCounterVec,
    /// Variants built but not kept, by reason (not-smaller, no-room: under `cache.min_free`,
    /// over-max-size-or-replaced, failed, queue-full).
    pub variants_not_kept: IntCounterVec,
    /// Access checks by result (allow, deny, error) and source (asked: a sub-request to the
    /// backend; cached: a kept decision).
    pub access_checks: prometheus::IntCounterVec,
    /// Time the backend took to answer an access check.
    pub access_check_seconds: Histogram,
    /// Hits by the representation sent (identity, br, gzip), resolved once.
    hit_encodings: [IntCounter; 1 + Coding::ALL.len()],
    /// `requests` resolved once per outcome: the request path does no label lookup.
    pub outcome: Outcomes,
}

/// One counter per request outcome, resolved at start: the request path does no label lookup.
pub struct Outcomes([IntCounter; Outcome::ALL.len()]);

impl Outcomes {
    fn new(requests: &IntCounterVec) -> Outcomes {
        Outcomes(Outcome::ALL.map(|o| requests.with_label_values(&[o.label()])))
    }

    /// The counter of `outcome`.
    pub fn of(&self, outcome: Outcome) -> &IntCounter {
        &self.0[Outcome::ALL.iter().position(|&o| o == outcome).expect("ALL lists every outcome")]
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone())).expect("metric names are unique");
            c
        }
        let counter_vec = |name: &str, help: &str, label: &str| {
            reg(&registry, IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
        };
        let requests = counter_vec("lotecache_requests_total", "Requests by outcome", "outcome");
        let not_stored =
            counter_vec("lotecache_not_stored_total", "Cache-route responses not stored, by reason", "reason");
        let validation_failures =
            counter_vec("lotecache_validation_failures_total", "Documents that failed validation", "reason");
        let integrity_failures =
            counter_vec("lotecache_integrity_failures_total", "Stored entries that failed verification", "reason");
        let evictions = counter_vec("lotecache_evictions_total", "Entries removed from the store", "reason");
        let shared_ops = reg(
            &registry,
            IntCounterVec::new(
                Opts::new("lotecache_shared_ops_total", "Shared-store operations by operation and result"),
                &["op", "result"],
            )
            .expect("valid metric"),
        );
        let variants_built = counter_vec("lotecache_variants_built_total", "Compressed variants stored", "encoding");
        let variants_not_kept =
            counter_vec("lotecache_variants_not_kept_total", "Compressed variants built but not kept", "reason");
        let hit_encodings = counter_vec("lotecache_hit_encodings_total", "Hits by the representation sent", "encoding");
        let access_checks = reg(
            &registry,
            IntCounterVec::new(
                Opts::new("lotecache_access_checks_total", "Access checks by result and by source (asked, cached)"),
                &["result", "source"],
            )
            .expect("valid metric"),
        );
        let access_check_seconds = reg(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new("lotecache_access_check_seconds", "Time the backend took to answer an access check")
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            )
            .expect("valid"),
        );
        let origin_errors = counter_vec("lotecache_origin_errors_total", "Origin failures by kind", "kind");
        // Series that alerts and dashboards query exist from the start, at 0: a rule on
        // `increase(...)` then sees the first failure, and a dashboard shows 0, not "no data".
        for reason in
            ["digest-mismatch", "content-size", "content-missing", "content-changed", "shared-digest", "shared-length"]
        {
            integrity_failures.with_label_values(&[reason]);
        }
        for kind in ["origin-unreachable", "origin-timeout", "origin-error", "status-5xx"] {
            origin_errors.with_label_values(&[kind]);
        }
        for reason in ["lru", "purge", "too-large"] {
            evictions.with_label_values(&[reason]);
        }
        for result in ["allow", "deny", "error"] {
            for source in ["asked", "cached"] {
                access_checks.with_label_values(&[result, source]);
            }
        }
        Metrics {
            stored: reg(&registry, IntCounter::new("lotecache_stored_total", "Entries stored").expect("valid")),
            store_bytes: reg(
                &registry,
                IntGauge::new("lotecache_store_bytes", "Bytes of live entries").expect("valid"),
            ),
            store_entries: reg(&registry, IntGauge::new("lotecache_store_entries", "Live entries").expect("valid")),
            store_max_bytes: reg(
                &registry,
                IntGauge::new("lotecache_store_max_bytes", "cache.max_size in bytes (0: no cap)").expect("valid"),
            ),
            origin_bytes_saved: reg(
                &registry,
                IntCounter::new(
                    "lotecache_origin_bytes_saved_total",
                    "Document bytes the origin was spared generating by hits",
                )
                .expect("valid"),
            ),
            fills_in_flight: reg(
                &registry,
                IntGauge::new("lotecache_fills_in_flight", "Origin fetches in progress").expect("valid"),
            ),
            origin_latency: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("lotecache_origin_response_seconds", "Origin time to response head")
                        .buckets(vec![0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]),
                )
                .expect("valid"),
            ),
            origin_seconds_saved: reg(
                &registry,
                prometheus::Counter::new(
                    "lotecache_origin_seconds_saved_total",
                    "Generation time the origin was spared by hits",
                )
                .expect("valid"),
            ),
            gc_removed_files: reg(
                &registry,
                IntCounter::new("lotecache_gc_removed_files_total", "Unreferenced content files removed")
                    .expect("valid"),
            ),
            shared_up: reg(
                &registry,
                IntGauge::new("lotecache_shared_up", "1 while the shared store answers (0 if down or not configured)")
                    .expect("valid"),
            ),
            shared_configured: reg(
                &registry,
                IntGauge::new("lotecache_shared_configured", "1 when a shared store is configured").expect("valid"),
            ),
            shared_uploads_pending: reg(
                &registry,
                IntGauge::new("lotecache_shared_uploads_pending", "Write-through uploads not finished").expect("valid"),
            ),
            read_errors: reg(
                &registry,
                IntCounter::new("lotecache_read_errors_total", "Stored entries that could not be read (kept)")
                    .expect("valid"),
            ),
            shared_ops,
            outcome: Outcomes::new(&requests),
            registry,
            requests,
            not_stored,
            validation_failures,
            integrity_failures,
            evictions,
            origin_errors,
            variants_built,
            variants_not_kept,
            access_checks,
            access_check_seconds,
            hit_encodings: std::array::from_fn(|i| {
                let label = i.checked_sub(1).map_or("identity", |c| Coding::ALL[c].token());
                hit_encodings.with_label_values(&[label])
            }),
        }
    }

    /// The counter of hits sent in `coding` (None: identity).
    pub fn hit_encoding(&self, coding: Option<Coding>) -> &IntCounter {
        let i = coding.map_or(0, |c| 1 + Coding::ALL.iter().position(|&k| k == c).expect("ALL lists every coding"));
        &self.hit_encodings[i]
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding to memory");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
