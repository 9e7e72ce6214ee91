//! A seeded, randomized fault model. The real proxy (in-process, two worker runtimes as
//! `server.workers = 2` runs them) sits in front of the test origin; many clients download a
//! few dozen batches (small and large, on a validated route and on one without validation)
//! while a chaos task, every decision taken from one seeded RNG, purges, reloads, collects,
//! shrinks `max_size`, damages stored files, makes the origin fail / cut / stall / re-process
//! a batch / hand out per-request cookies, and kills and restarts the proxy. Every response
//! goes through the oracle (below); at the end the store is checked at rest.
//!
//! Replay: `LOTECACHE_FAULT_MODEL_SEED=<seed>` runs that seed alone (decisions are the same;
//! the interleaving with the proxy's own timing is not). `LOTECACHE_FAULT_MODEL_SECS=<n>`
//! runs scenarios with seeds derived from the time for about `n` seconds. By default a fixed
//! seed set runs in about a minute. `LOTECACHE_FAULT_MODEL_LOG=1` prints every scenario's
//! event log, passed or not.
//!
//! The oracles (each a function below, each failure named after it):
//! - `complete-200-is-not-a-served-version`: a complete `200` (clean end, Content-Length
//!   matched) is exactly one version the origin generated for that id — except a hit sent
//!   from its file with `sendfile` while chaos rewrote that file in place: zero-copy sending
//!   shares the file's cached pages with the socket until the client reads them, so such a
//!   write can reach the client (a documented limit; lotecache never writes a content file in
//!   place). Those are counted in the summary (`hits rewritten in place under a zero-copy
//!   send`), and any other wrong complete `200` fails;
//! - `complete-206-is-not-a-slice-of-a-served-version`: a complete `206` (clients also send
//!   one `Range`) is exactly bytes a..=b of a served version whose length is the N of its
//!   `Content-Range: bytes a-b/N` (the same zero-copy exception);
//! - `416-for-a-satisfiable-range`: a `416` names the length of a served version, and the
//!   range asked starts at or past it;
//! - `http10-cut-body-passed-off-as-complete`: the same for an HTTP/1.0 `200` without
//!   Content-Length that ended with a clean close (unless the proxy was killed meanwhile);
//! - `set-cookie-of-another-client`: a Set-Cookie names the client's own token, or a
//!   per-answer token no other client received;
//! - `request-exceeded-its-bound`: every request ends within 15 s;
//! - `proxy-error-without-json-body`: 4xx/5xx bodies are JSON;
//! - `head-length-of-no-version`: a `200` HEAD announces the length of a served version;
//! - `hit-cut-without-damage-or-restart`: a verified hit is only cut if chaos damaged its
//!   file or killed the proxy during it;
//! - at the end: `fills-not-drained` (within 60 s), `live-entry-lost-its-content-file`,
//!   `temp-file-left-at-rest`, `orphan-content-file-after-gc` (after a restart and a GC with
//!   zero grace), and
//!   `origin-generations-over-bound` (see [`oracle_generations`]).
//!
//! Not covered yet: the real binary killed with SIGKILL (restarts here drop the in-process
//! proxy and its worker runtimes), silent corruption that keeps the file's fingerprint (the
//! scrubber's job; the scrubber is off), transient read errors, the shared store, access
//! checks and TTL / stale-if-error routes.

use crate::support::origin::{document, Behavior, TestOrigin};

/// Bodies larger than this are sent from their file with `sendfile` (`read::WHOLE_MAX`, and
/// the memory tier's largest object by default).
const SENT_FROM_FILE: usize = 1024 * 1024;
use crate::support::raw::{http10_get, RawEnd};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use lotecache::{config, RunningProxy};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    Arc, Mutex,
};
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "fault-model-token";
/// The fixed seeds CI runs.
const CI_SEEDS: [u64; 4] = [1, 2, 3, 4];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_randomized_fault_model_never_serves_a_wrong_document_or_another_users_cookie() {
    let seeds: Vec<(u64, Duration)> =
        match (env_u64("LOTECACHE_FAULT_MODEL_SEED"), env_u64("LOTECACHE_FAULT_MODEL_SECS")) {
            (Some(seed), secs) => vec![(seed, Duration::from_secs(secs.unwrap_or(12)))],
            (None, Some(secs)) => {
                // Seeds from the time, one scenario of at most 20 s after another.
                let mut rng = Rng::new(
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
                );
                let mut left = secs;
                let mut out = Vec::new();
                while left >= 5 {
                    let traffic = left.min(20) - 3;
                    out.push((rng.next_u64() >> 16, Duration::from_secs(traffic)));
                    left -= traffic + 3;
                }
                out
            }
            (None, None) => CI_SEEDS.iter().map(|&s| (s, Duration::from_secs(11))).collect(),
        };
    eprintln!("fault model: seeds {:?}", seeds.iter().map(|(s, _)| *s).collect::<Vec<_>>());
    let mut failed = Vec::new();
    for (seed, traffic) in seeds {
        let scenario = Scenario::from_seed(seed, traffic);
        let outcome = run_scenario(&scenario).await;
        eprintln!("{}", outcome.summary);
        if !outcome.failures.is_empty() || std::env::var_os("LOTECACHE_FAULT_MODEL_LOG").is_some() {
            eprintln!("{}", outcome.report);
        }
        if !outcome.failures.is_empty() {
            failed.push((seed, outcome.failures));
        }
    }
    if !failed.is_empty() {
        let lines: Vec<String> = failed
            .iter()
            .map(|(seed, f)| {
                let mut by: BTreeMap<&str, usize> = BTreeMap::new();
                f.iter().for_each(|x| *by.entry(x.oracle).or_default() += 1);
                format!("  seed {seed}: {by:?} (replay: LOTECACHE_FAULT_MODEL_SEED={seed})")
            })
            .collect();
        panic!("the fault model found oracle failures (reports with event logs above):\n{}", lines.join("\n"));
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------
// The RNG: splitmix64, every decision of a scenario drawn from streams forked off its seed.

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
    /// An independent stream for one task.
    fn fork(&mut self, stream: u64) -> Rng {
        Rng(self.next_u64() ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }
    /// An index drawn by weight.
    fn weighted(&mut self, weights: &[u64]) -> usize {
        let mut x = self.below(weights.iter().sum());
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

// ---------------------------------------------------------------------------------------
// The scenario.

/// The two cache routes: the validated one (JSON + lote_id asserts) and one without
/// validation, which fetches the same batches from `/raw/...` on the origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Validated,
    Raw,
}

#[derive(Clone, Debug)]
struct Batch {
    id: String,
    route: Route,
}

impl Batch {
    fn path(&self) -> String {
        match self.route {
            Route::Validated => format!("/download_batch_results/{}", self.id),
            Route::Raw => format!("/raw/download_batch_results/{}", self.id),
        }
    }
    fn key(&self) -> String {
        match self.route {
            Route::Validated => format!("{}_resultados.json", self.id),
            Route::Raw => format!("{}_raw.json", self.id),
        }
    }
}

/// Everything a scenario is, decided from its seed.
#[derive(Clone, Debug)]
struct Scenario {
    seed: u64,
    /// How long clients and chaos run.
    traffic: Duration,
    clients: usize,
    batches: Vec<Batch>,
    /// The first `hot` batches get most of the traffic (so requests collapse).
    hot: usize,
    /// No request may take longer than this.
    request_bound: Duration,
    /// Pause between chaos events.
    chaos_gap_ms: (u64, u64),
    /// When (from the start) the proxy is killed and restarted.
    restarts: Vec<Duration>,
    /// `server.workers` of the proxy (its own worker runtimes).
    workers: usize,
    /// `cache.max_size` outside shrink windows, and the shrunk one.
    max_size: u64,
    shrunk_size: u64,
}

impl Scenario {
    fn from_seed(seed: u64, traffic: Duration) -> Scenario {
        let mut rng = Rng::new(seed).fork(1);
        let count = rng.range(24, 36) as usize;
        let batches = (0..count)
            .map(|n| {
                let route = if rng.chance(50) { Route::Validated } else { Route::Raw };
                let tag = if route == Route::Validated { "V" } else { "R" };
                // The hot set (first six) always has two large documents: sent with sendfile.
                let weights: &[u64] = if n < 2 { &[0, 50, 30, 20] } else { &[60, 25, 10, 5] };
                let size = match rng.weighted(weights) {
                    0 => String::new(),
                    1 => format!("-{}kb", rng.pick(&[300, 512])),
                    2 => "-1mb".to_string(),
                    _ => "-2mb".to_string(),
                };
                Batch { id: format!("FM{tag}{n}{size}"), route }
            })
            .collect();
        let n_restarts = rng.range(1, 2 + traffic.as_secs() / 10);
        let mut restarts: Vec<Duration> =
            (0..n_restarts).map(|_| rng.ms(1500, traffic.as_millis() as u64 - 1000)).collect();
        restarts.sort();
        Scenario {
            seed,
            traffic,
            clients: rng.range(16, 32) as usize,
            batches,
            hot: 6,
            request_bound: Duration::from_secs(15),
            chaos_gap_ms: (30, 250),
            restarts,
            workers: 2,
            max_size: 256 * 1024 * 1024,
            shrunk_size: *rng.pick(&[600 * 1024, 2 * 1024 * 1024, 3 * 1024 * 1024]),
        }
    }
}

/// Settings the chaos task changes by reload.
#[derive(Clone, Debug)]
struct Knobs {
    max_size: u64,
    memory_tier: &'static str,
    replay_buffer: &'static str,
    gc_grace: &'static str,
}

fn config_text(origin: SocketAddr, dir: &Path, knobs: &Knobs, workers: usize) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
workers = {workers}
[origin]
url = "http://{origin}"
connect_timeout = "1s"
response_timeout = "2s"
body_idle_timeout = "1s"
[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"
[cache]
dir = "{dir}"
scrub_rate = "off"
max_size = "{max_size}"
memory_tier = "{memory_tier}"
memory_object_max = "256KiB"
memory_recheck = "200ms"
replay_buffer = "{replay_buffer}"
wait_timeout = "5s"
fill_timeout = "10s"
gc_interval = "2s"
gc_grace = "{gc_grace}"

[[rules]]
name = "validated"
path = "/download_batch_results/{{lote_id}}"
key = "{{lote_id}}_resultados.json"
json = true
[[rules.assert]]
pointer = "/metadata/lote_id"
equals = "{{lote_id}}"
[[rules.assert]]
pointer = "/archivos_procesados/*/lote_id"
equals = "{{lote_id}}"

[[rules]]
name = "raw"
path = "/raw/download_batch_results/{{lote_id}}"
key = "{{lote_id}}_raw.json"
"#,
        dir = dir.display(),
        max_size = knobs.max_size,
        memory_tier = knobs.memory_tier,
        replay_buffer = knobs.replay_buffer,
        gc_grace = knobs.gc_grace,
    )
}

fn parse_config(text: &str) -> config::Config {
    config::parse("fault-model", text, &config::Overrides::default()).expect("fault model config")
}

// ---------------------------------------------------------------------------------------
// Events: what the chaos task did, timestamped, for the report.

#[derive(Clone, Debug)]
enum Fault {
    CutShort(usize),
    Stall(Duration),
    Status(u16),
    Refuse,
    Hang,
    ChunkedNoEnd,
    ChunkedCut(usize),
    /// Close-delimited, cut after this many bytes (validated route only: without
    /// validation a cut close-delimited body is indistinguishable from a whole one).
    CloseCut(usize),
    /// Another batch's document (validated route only, for the same reason).
    OtherBatch(String),
    Slow {
        delay: Duration,
        pieces: usize,
        gap: Duration,
    },
}

impl Fault {
    fn behavior(&self) -> Behavior {
        match self {
            Fault::CutShort(n) => Behavior::CutShort { send: *n },
            Fault::Stall(d) => Behavior::StallMidBody { stall: *d },
            Fault::Status(c) => Behavior::Status(*c),
            Fault::Refuse => Behavior::Refuse,
            Fault::Hang => Behavior::Hang,
            Fault::ChunkedNoEnd => Behavior::ChunkedNoEnd,
            Fault::ChunkedCut(n) => Behavior::ChunkedCut { send: *n },
            Fault::CloseCut(n) => Behavior::CloseDelimited { send: Some(*n) },
            Fault::OtherBatch(other) => Behavior::Custom(document(other)),
            Fault::Slow { delay, pieces, gap } => Behavior::Ok { delay: *delay, pieces: *pieces, gap: *gap },
        }
    }
    /// Whether the generation it is used on can fail (and so not store).
    fn fails(&self) -> bool {
        !matches!(self, Fault::Slow { .. } | Fault::Stall(_))
    }
}

/// A lasting answering mode of the origin for one batch.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Close-delimited, complete (never stored without validation: no length).
    CloseDelimited,
    /// Chunked, complete.
    Chunked,
}

#[derive(Clone, Debug)]
enum RestartKind {
    /// `shutdown(0)`, then the worker runtimes dropped.
    ShutdownZeroGrace,
    /// The `RunningProxy` dropped and the worker runtimes with it, no shutdown at all.
    Drop,
}

#[derive(Clone, Debug)]
enum Event {
    PurgeKey { key: String },
    PurgeLote { id: String },
    PurgeAll,
    Gc,
    Reload { knobs: Knobs },
    Shrink { max_size: u64 },
    RestoreSize { max_size: u64 },
    Corrupt { id: String, file: String, offset: u64 },
    Truncate { id: String, file: String, to: u64 },
    Delete { id: String, file: String },
    OriginFault { id: String, fault: Fault },
    OriginVersion { id: String, version: u32 },
    CookiesOn { id: String },
    CookiesOff { id: String },
    ModeOn { id: String, mode: Mode },
    ModeOff { id: String },
    Restart { kind: RestartKind },
    Restarted { addr: SocketAddr },
    TrafficEnd,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::PurgeKey { key } => write!(f, "purge key {key}"),
            Event::PurgeLote { id } => write!(f, "purge lote_id {id}"),
            Event::PurgeAll => write!(f, "purge all"),
            Event::Gc => write!(f, "gc"),
            Event::Reload { knobs } => write!(
                f,
                "reload (max_size {}, memory_tier {}, replay_buffer {}, gc_grace {})",
                knobs.max_size, knobs.memory_tier, knobs.replay_buffer, knobs.gc_grace
            ),
            Event::Shrink { max_size } => write!(f, "shrink max_size to {max_size} (reload)"),
            Event::RestoreSize { max_size } => write!(f, "restore max_size to {max_size} (reload)"),
            Event::Corrupt { id, file, offset } => write!(f, "corrupt {id}: flip byte {offset} of {file}"),
            Event::Truncate { id, file, to } => write!(f, "truncate {id}: {file} to {to} bytes"),
            Event::Delete { id, file } => write!(f, "delete {id}: {file}"),
            Event::OriginFault { id, fault } => write!(f, "origin: next generation of {id} {fault:?}"),
            Event::OriginVersion { id, version } => write!(f, "origin: {id} re-processed, now version {version}"),
            Event::CookiesOn { id } => write!(f, "origin: per-request Set-Cookie (and slow answers) on for {id}"),
            Event::CookiesOff { id } => write!(f, "origin: per-request Set-Cookie off for {id}"),
            Event::ModeOn { id, mode } => write!(f, "origin: {id} answers {mode:?}"),
            Event::ModeOff { id } => write!(f, "origin: {id} answers normally again"),
            Event::Restart { kind } => write!(f, "kill proxy ({kind:?})"),
            Event::Restarted { addr } => write!(f, "proxy restarted on {addr}"),
            Event::TrafficEnd => write!(f, "traffic ends"),
        }
    }
}

/// An oracle failure.
#[derive(Clone, Debug)]
struct Failure {
    at: Duration,
    oracle: &'static str,
    request: String,
    detail: String,
}

/// What the runner knows about one batch, for the generation bound.
#[derive(Default, Debug)]
struct Book {
    /// Purges, file damage, restarts: each may cost one more generation.
    invalidations: u64,
    /// One-shot origin faults queued.
    faults: u64,
    /// Requests started while the batch could not be stored (cookies, no-length mode,
    /// shrunk max_size), and how many such windows there were.
    unstorable_requests: u64,
    unstorable_windows: u64,
    cookies: bool,
    no_length: bool,
    /// Times (since the start) at which chaos damaged its stored file.
    damaged_at: Vec<Duration>,
    /// Wall-clock ms of the last damage, to compare with entries' `stored_at_ms`.
    last_damage_wall_ms: u128,
}

#[derive(Default, Debug)]
struct Stats {
    requests: u64,
    by_kind: BTreeMap<&'static str, u64>,
    by_status: BTreeMap<u16, u64>,
    by_cache_status: BTreeMap<String, u64>,
    complete_200: u64,
    /// Of those, sent compressed (br or gzip) and checked once decoded.
    complete_200_compressed: u64,
    /// Complete `206`s, each checked against a slice of a served version.
    complete_206: u64,
    cut_bodies: u64,
    left_early: u64,
    transport_errors: u64,
    http10_cut_by_restart: u64,
    /// Hits sent with `sendfile` whose file chaos rewrote in place during the response (see
    /// `complete-200-is-not-a-served-version`).
    rewritten_under_zero_copy: u64,
    events: u64,
}

// ---------------------------------------------------------------------------------------
// The runner.

struct Live {
    /// With its own worker threads (`server.workers`), as `lotecache serve` runs.
    proxy: RunningProxy,
}

struct Ctx {
    scenario: Scenario,
    origin: TestOrigin,
    dir: PathBuf,
    start: Instant,
    traffic_end: Instant,
    addr: Mutex<SocketAddr>,
    admin: Mutex<SocketAddr>,
    live: tokio::sync::Mutex<Option<Live>>,
    knobs: Mutex<Knobs>,
    events: Mutex<Vec<(Duration, String)>>,
    failures: Mutex<Vec<Failure>>,
    stats: Mutex<Stats>,
    books: Mutex<HashMap<String, Book>>,
    shrunk: AtomicBool,
    shrink_windows: AtomicU64,
    restarts: AtomicU64,
    /// Restart windows: (down at, up at) since the start; up is None while down.
    downtime: Mutex<Vec<(Duration, Option<Duration>)>>,
    etags: Mutex<HashMap<String, Vec<String>>>,
    /// Per-answer cookie tokens received, and by which request first.
    cookies: Mutex<HashMap<String, String>>,
}

impl Ctx {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
    fn log(&self, event: &Event, result: &str) {
        let line = if result.is_empty() { event.to_string() } else { format!("{event} -> {result}") };
        self.events.lock().unwrap().push((self.now(), line));
        self.stats.lock().unwrap().events += 1;
    }
    fn fail(&self, oracle: &'static str, request: &str, detail: String) {
        let at = self.now();
        let mut failures = self.failures.lock().unwrap();
        // The event log shows the first few of each oracle in place; the rest are counted.
        if failures.iter().filter(|f| f.oracle == oracle).count() < 5 {
            self.events.lock().unwrap().push((at, format!("!! {oracle}: {request}: {detail}")));
        }
        failures.push(Failure { at, oracle, request: request.to_string(), detail });
    }
    fn book<R>(&self, id: &str, f: impl FnOnce(&mut Book) -> R) -> R {
        f(self.books.lock().unwrap().entry(id.to_string()).or_default())
    }
    fn config(&self) -> config::Config {
        parse_config(&config_text(self.origin.addr, &self.dir, &self.knobs.lock().unwrap(), self.scenario.workers))
    }
    /// Whether a restart (down or up) happened within `from..to`.
    fn restarted_within(&self, from: Duration, to: Duration) -> bool {
        self.downtime.lock().unwrap().iter().any(|(down, up)| *down <= to && up.is_none_or(|u| u >= from))
    }
    fn damaged_within(&self, id: &str, from: Duration, to: Duration) -> bool {
        let margin = Duration::from_millis(50);
        self.book(id, |b| b.damaged_at.iter().any(|t| *t + margin >= from && *t <= to))
    }
}

struct Outcome {
    summary: String,
    report: String,
    failures: Vec<Failure>,
}

async fn run_scenario(scenario: &Scenario) -> Outcome {
    let origin = TestOrigin::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let knobs = Knobs { max_size: scenario.max_size, memory_tier: "64MiB", replay_buffer: "1MiB", gc_grace: "1s" };
    let start = Instant::now();
    let ctx = Arc::new(Ctx {
        scenario: scenario.clone(),
        origin: origin.clone(),
        dir: dir.clone(),
        start,
        traffic_end: start + scenario.traffic,
        addr: Mutex::new(([127, 0, 0, 1], 1).into()),
        admin: Mutex::new(([127, 0, 0, 1], 1).into()),
        live: tokio::sync::Mutex::new(None),
        knobs: Mutex::new(knobs),
        events: Mutex::default(),
        failures: Mutex::default(),
        stats: Mutex::default(),
        books: Mutex::default(),
        shrunk: AtomicBool::new(false),
        shrink_windows: AtomicU64::new(0),
        restarts: AtomicU64::new(0),
        downtime: Mutex::default(),
        etags: Mutex::default(),
        cookies: Mutex::default(),
    });
    start_live(&ctx).await;

    let mut rng = Rng::new(scenario.seed);
    let mut tasks = Vec::new();
    for n in 0..scenario.clients {
        tasks.push(tokio::spawn(client_loop(ctx.clone(), n, rng.fork(100 + n as u64))));
    }
    let chaos = tokio::spawn(chaos_loop(ctx.clone(), rng.fork(7)));
    for t in tasks {
        if let Err(e) = t.await {
            ctx.fail("client-task-panicked", "-", format!("{e}"));
        }
    }
    if let Err(e) = chaos.await {
        ctx.fail("chaos-task-panicked", "-", format!("{e}"));
    }
    ctx.log(&Event::TrafficEnd, "");

    check_at_rest(&ctx).await;

    let elapsed = ctx.now();
    let failures = ctx.failures.lock().unwrap().clone();
    let stats = ctx.stats.lock().unwrap();
    let summary = format!(
        "fault model seed {} ({} clients, {} batches, {:.1?}): {} requests, {} chaos events, {} restarts, \
         {} complete 200s ({} of them compressed), {} complete 206s, {} cut bodies, {} left early, {} transport errors, {} HTTP/1.0 cut by a restart, \
         {} hits rewritten in place under a zero-copy send, {} origin generations, {} Set-Cookies sent; kinds {:?}; statuses {:?}; cache-status {:?}; {} oracle failures",
        scenario.seed,
        scenario.clients,
        scenario.batches.len(),
        elapsed,
        stats.requests,
        stats.events,
        ctx.restarts.load(SeqCst),
        stats.complete_200,
        stats.complete_200_compressed,
        stats.complete_206,
        stats.cut_bodies,
        stats.left_early,
        stats.transport_errors,
        stats.http10_cut_by_restart,
        stats.rewritten_under_zero_copy,
        scenario.batches.iter().map(|b| origin.generations(&b.id)).sum::<u64>(),
        origin.cookies_sent(),
        stats.by_kind,
        stats.by_status,
        stats.by_cache_status,
        failures.len(),
    );
    let report = failure_report(&ctx, &failures);
    drop(stats);
    Outcome { summary, report, failures }
}

fn failure_report(ctx: &Ctx, failures: &[Failure]) -> String {
    let seed = ctx.scenario.seed;
    let verdict = if failures.is_empty() { "passed" } else { "FAILED" };
    let mut out = format!(
        "==== fault model {verdict}, seed {seed} ====\nreplay: LOTECACHE_FAULT_MODEL_SEED={seed} cargo test --test proxy fault_model -- --nocapture\n\
         scenario: {} clients, traffic {:?}, restarts at {:?}, shrunk max_size {}, batches {:?}\n",
        ctx.scenario.clients,
        ctx.scenario.traffic,
        ctx.scenario.restarts,
        ctx.scenario.shrunk_size,
        ctx.scenario.batches.iter().map(|b| b.path()).collect::<Vec<_>>()
    );
    let mut by: BTreeMap<&str, Vec<&Failure>> = BTreeMap::new();
    failures.iter().for_each(|f| by.entry(f.oracle).or_default().push(f));
    out.push_str("oracle failures:\n");
    for (oracle, list) in &by {
        out.push_str(&format!("  {oracle}: {} (first ones below)\n", list.len()));
        for f in list.iter().take(5) {
            out.push_str(&format!("    [{:>8.3}s] {}: {}\n", f.at.as_secs_f64(), f.request, f.detail));
        }
    }
    out.push_str("event log (chaos events, and !! failing requests):\n");
    let events = ctx.events.lock().unwrap();
    for (at, line) in events.iter() {
        out.push_str(&format!("  [{:>8.3}s] {line}\n", at.as_secs_f64()));
    }
    out.push_str(&format!("==== end of seed {seed} ====\n"));
    out
}

async fn start_live(ctx: &Ctx) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match RunningProxy::start(ctx.config()).await {
            Ok(proxy) => {
                *ctx.addr.lock().unwrap() = proxy.local_addr();
                *ctx.admin.lock().unwrap() = proxy.admin_addr();
                *ctx.live.lock().await = Some(Live { proxy });
                return;
            }
            Err(e) => {
                // The previous process's store may still be closing (its lock held).
                assert!(Instant::now() < deadline, "the proxy does not start again: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn kill_live(ctx: &Ctx, kind: &RestartKind) {
    let Some(live) = ctx.live.lock().await.take() else { return };
    match kind {
        RestartKind::ShutdownZeroGrace => live.proxy.shutdown(Duration::ZERO).await,
        // Its worker threads stop at once, dropping whatever runs on them, as in a killed
        // process.
        RestartKind::Drop => drop(live.proxy),
    }
}

// ---------------------------------------------------------------------------------------
// Clients.

#[derive(Clone, Copy, Debug)]
enum Kind {
    Get,
    Head,
    IfNoneMatch,
    Leave,
    Http10,
    /// GET with one `Range` (`bytes=a-b` or `bytes=-n`).
    Range,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Get => "GET",
            Kind::Head => "HEAD",
            Kind::IfNoneMatch => "GET+If-None-Match",
            Kind::Leave => "GET, left after a few chunks",
            Kind::Http10 => "GET HTTP/1.0",
            Kind::Range => "GET+Range",
        }
    }
}

/// A response as the oracle sees it.
struct Reply {
    status: u16,
    headers: HeaderMap,
    /// Complete body (ended cleanly, matching any Content-Length), else why not.
    body: Result<Bytes, String>,
}

impl Reply {
    fn cache_status(&self) -> String {
        self.headers.get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
    }
}

async fn client_loop(ctx: Arc<Ctx>, n: usize, mut rng: Rng) {
    let mut i = 0u64;
    while Instant::now() < ctx.traffic_end {
        i += 1;
        let s = &ctx.scenario;
        let batch = if rng.chance(60) { &s.batches[rng.below(s.hot as u64) as usize] } else { rng.pick(&s.batches) };
        let kind = *rng.pick(&[
            Kind::Get,
            Kind::Get,
            Kind::Get,
            Kind::Get,
            Kind::Head,
            Kind::IfNoneMatch,
            Kind::Leave,
            Kind::Http10,
            Kind::Http10,
            Kind::Range,
        ]);
        let token = format!("c{n}-{i}");
        let request = format!("{} {} (client token {token})", kind.name(), batch.path());
        note_request(&ctx, &batch.id);
        let started = ctx.now();
        let etag = if matches!(kind, Kind::IfNoneMatch) {
            let etags = ctx.etags.lock().unwrap();
            etags.get(&batch.id).filter(|l| !l.is_empty()).map(|l| l[rng.below(l.len() as u64) as usize].clone())
        } else {
            None
        };
        let leave_after = rng.range(1, 4) as usize;
        let range = matches!(kind, Kind::Range).then(|| match rng.chance(25) {
            true => format!("bytes=-{}", rng.range(1, 40_000)),
            false => {
                let first = rng.below(300_000);
                format!("bytes={first}-{}", first + rng.below(60_000))
            }
        });
        let addr = *ctx.addr.lock().unwrap();
        let outcome = tokio::time::timeout(
            s.request_bound,
            one_request(addr, batch, kind, &token, etag.as_deref(), range.as_deref(), leave_after),
        )
        .await;
        let ended = ctx.now();
        {
            let mut st = ctx.stats.lock().unwrap();
            st.requests += 1;
            *st.by_kind.entry(kind.name()).or_default() += 1;
        }
        match outcome {
            Err(_) => ctx.fail(
                "request-exceeded-its-bound",
                &request,
                format!("no complete answer within {:?} (started at {:.3}s)", s.request_bound, started.as_secs_f64()),
            ),
            Ok(Err(e)) => {
                ctx.stats.lock().unwrap().transport_errors += 1;
                let _ = e;
            }
            Ok(Ok(reply)) => {
                let request = match &range {
                    Some(r) => format!("{request} [range: {r}]"),
                    None => request,
                };
                check_reply(&ctx, batch, kind, &token, &request, range.as_deref(), &reply, started, ended)
            }
        }
        tokio::time::sleep(rng.ms(0, 25)).await;
    }
}

/// Counts a request for the generation bound when the batch cannot be stored right now.
fn note_request(ctx: &Ctx, id: &str) {
    let shrunk = ctx.shrunk.load(SeqCst);
    ctx.book(id, |b| {
        if shrunk || b.cookies || b.no_length {
            b.unstorable_requests += 1;
        }
    });
}

async fn one_request(
    addr: SocketAddr,
    batch: &Batch,
    kind: Kind,
    token: &str,
    etag: Option<&str>,
    range: Option<&str>,
    leave_after: usize,
) -> Result<Reply, String> {
    if let Kind::Http10 = kind {
        let r = http10_get(addr, &batch.path(), &[("x-test-client", token)]).await.map_err(|e| e.to_string())?;
        let Some(status) = r.status else {
            return Err(format!("no response head ({} bytes, {:?})", r.body.len(), r.end));
        };
        let cl = r.headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
        let body = match (&r.end, cl) {
            (RawEnd::Error(e), _) => Err(format!("connection error after {} bytes: {e}", r.body.len())),
            (RawEnd::Eof, Some(cl)) if cl != r.body.len() => {
                Err(format!("{} bytes before the close, Content-Length {cl}", r.body.len()))
            }
            // A clean close: complete as far as an HTTP/1.0 client can tell.
            (RawEnd::Eof, _) => Ok(Bytes::from(r.body)),
        };
        return Ok(Reply { status, headers: r.headers, body });
    }
    let method = if let Kind::Head = kind { Method::HEAD } else { Method::GET };
    let mut req =
        Request::builder().method(method).uri(format!("http://{addr}{}", batch.path())).header("x-test-client", token);
    if let Some(etag) = etag {
        req = req.header("if-none-match", etag);
    }
    if let Some(range) = range {
        req = req.header("range", range);
    }
    // Half the clients (by token) take compressed answers, as browsers do; a HEAD's length
    // and a range are checked against identity versions, so those ask for identity.
    let compressed_ok = matches!(kind, Kind::Get | Kind::IfNoneMatch | Kind::Leave)
        && token.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32)) % 2 == 0;
    if compressed_ok {
        req = req.header("accept-encoding", "gzip, deflate, br");
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    let resp = crate::support::client().request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, mut body) = resp.into_parts();
    let mut got = Vec::new();
    let mut frames = 0;
    let body = loop {
        match body.frame().await {
            None => break Ok(Bytes::from(got)),
            Some(Err(e)) => break Err(format!("body error after {} bytes: {e:?}", got.len())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                    frames += 1;
                    if matches!(kind, Kind::Leave) && frames >= leave_after {
                        break Err(format!("left after {frames} chunks ({} bytes)", got.len()));
                    }
                }
            }
        }
    };
    let body = match (body, parts.headers.get("content-length").and_then(|v| v.to_str().ok())) {
        (Ok(b), Some(cl)) if kind_has_body(kind, parts.status) && cl != b.len().to_string() => {
            Err(format!("{} bytes, Content-Length {cl}", b.len()))
        }
        (b, _) => b,
    };
    // A complete compressed body is checked as the document it decodes to; one that does not
    // decode is a wrong document (no version is the empty marker below).
    let coding = parts.headers.get("content-encoding").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = match (body, coding.as_deref()) {
        (Ok(b), Some(coding)) if kind_has_body(kind, parts.status) && parts.status == StatusCode::OK => {
            if !compressed_ok {
                return Ok(Reply {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body: Ok(Bytes::from(format!("<{coding} sent to a client that did not accept it>"))),
                });
            }
            let mut out = Vec::new();
            let decoded = match coding {
                "br" => brotli::Decompressor::new(&b[..], 4096).read_to_end(&mut out),
                "gzip" => flate2::read::GzDecoder::new(&b[..]).read_to_end(&mut out),
                _ => Err(std::io::Error::other("unknown coding")),
            };
            match decoded {
                Ok(_) => Ok(Bytes::from(out)),
                Err(e) => Ok(Bytes::from(format!("<{coding} body that does not decode: {e}>"))),
            }
        }
        (b, _) => b,
    };
    Ok(Reply { status: parts.status.as_u16(), headers: parts.headers, body })
}

fn kind_has_body(kind: Kind, status: StatusCode) -> bool {
    !matches!(kind, Kind::Head) && status != StatusCode::NOT_MODIFIED
}

// ---------------------------------------------------------------------------------------
// The oracle.

#[allow(clippy::too_many_arguments)]
fn check_reply(
    ctx: &Ctx,
    batch: &Batch,
    kind: Kind,
    token: &str,
    request: &str,
    range: Option<&str>,
    reply: &Reply,
    started: Duration,
    ended: Duration,
) {
    let cs = reply.cache_status();
    {
        let mut st = ctx.stats.lock().unwrap();
        *st.by_status.entry(reply.status).or_default() += 1;
        // Cache-Status without the per-origin-status detail, to keep the table short.
        let short = cs.split("; detail=origin-status").next().unwrap_or("").to_string();
        *st.by_cache_status.entry(short).or_default() += 1;
        match (&reply.body, kind) {
            (Err(_), Kind::Leave) => st.left_early += 1,
            (Err(_), _) => st.cut_bodies += 1,
            (Ok(_), _) if reply.status == 200 && kind_has_body(kind, StatusCode::OK) => {
                st.complete_200 += 1;
                st.complete_200_compressed += reply.headers.contains_key("content-encoding") as u64;
            }
            (Ok(_), _) if reply.status == 206 => st.complete_206 += 1,
            _ => {}
        }
    }
    let request = format!("{request} -> {} [{cs}]", reply.status);
    if let Err(detail) = oracle_cookies(&ctx.origin, &ctx.cookies, token, &request, &reply.headers) {
        ctx.fail("set-cookie-of-another-client", &request, detail);
    }
    if let Err(detail) = oracle_error_body(kind, reply) {
        ctx.fail("proxy-error-without-json-body", &request, detail);
    }
    match kind {
        Kind::Head => {
            if let Err(detail) = oracle_head(&ctx.origin, &batch.id, reply) {
                ctx.fail("head-length-of-no-version", &request, detail);
            }
        }
        Kind::Range if reply.status == 206 => match &reply.body {
            Ok(body) => {
                if let Err(detail) = oracle_part(&ctx.origin, &batch.id, &reply.headers, body) {
                    let from_file = detail.1 > SENT_FROM_FILE && ctx.damaged_within(&batch.id, started, ended);
                    if from_file {
                        // As for whole hits: an in-place write under a zero-copy send.
                        ctx.stats.lock().unwrap().rewritten_under_zero_copy += 1;
                    } else {
                        ctx.fail("complete-206-is-not-a-slice-of-a-served-version", &request, detail.0);
                    }
                }
            }
            Err(why) => {
                if let Err(detail) = oracle_hit_not_cut_without_cause(ctx, &batch.id, &cs, why, started, ended) {
                    ctx.fail("hit-cut-without-damage-or-restart", &request, detail);
                }
            }
        },
        Kind::Range if reply.status == 416 => {
            if let Err(detail) = oracle_unsatisfiable(&ctx.origin, &batch.id, range, &reply.headers) {
                ctx.fail("416-for-a-satisfiable-range", &request, detail);
            }
        }
        _ if reply.status == 200 => match &reply.body {
            Ok(body) => {
                if let Err(detail) = oracle_document(&ctx.origin, &ctx.scenario, &batch.id, body) {
                    let cut_by_restart = matches!(kind, Kind::Http10)
                        && !reply.headers.contains_key("content-length")
                        && ctx.restarted_within(started, ended);
                    if cut_by_restart {
                        // A killed process closes a close-delimited body like a complete one:
                        // nothing the proxy can do about that.
                        ctx.stats.lock().unwrap().http10_cut_by_restart += 1;
                    } else if matches!(kind, Kind::Http10) && !reply.headers.contains_key("content-length") {
                        ctx.fail("http10-cut-body-passed-off-as-complete", &request, detail);
                    } else if cs.contains("hit")
                        && body.len() > SENT_FROM_FILE
                        && ctx.damaged_within(&batch.id, started, ended)
                    {
                        // The file was written to in place while this hit was sent from it
                        // with sendfile: the socket shares the file's cached pages until the
                        // client reads them, so such a write can reach the client. lotecache
                        // never writes a content file in place (README, "How reads are
                        // verified"); counted, not failed.
                        ctx.stats.lock().unwrap().rewritten_under_zero_copy += 1;
                    } else {
                        ctx.fail("complete-200-is-not-a-served-version", &request, detail);
                    }
                } else if let Some(etag) = reply.headers.get("etag").and_then(|v| v.to_str().ok()) {
                    let mut etags = ctx.etags.lock().unwrap();
                    let list = etags.entry(batch.id.clone()).or_default();
                    if !list.iter().any(|e| e == etag) {
                        list.push(etag.to_string());
                    }
                }
            }
            Err(why) if !matches!(kind, Kind::Leave) => {
                if let Err(detail) = oracle_hit_not_cut_without_cause(ctx, &batch.id, &cs, why, started, ended) {
                    ctx.fail("hit-cut-without-damage-or-restart", &request, detail);
                }
            }
            Err(_) => {}
        },
        _ => {}
    }
}

/// Every `Set-Cookie` a client receives was made by the origin for that client's own request:
/// it names the client's token, or (the proxy does not forward `x-test-client` on a fill) a
/// per-answer token `g<n>-<id>` that no other client has received. `received` maps each
/// per-answer token to the request that got it first.
fn oracle_cookies(
    origin: &TestOrigin,
    received: &Mutex<HashMap<String, String>>,
    token: &str,
    request: &str,
    headers: &HeaderMap,
) -> Result<(), String> {
    for v in headers.get_all("set-cookie") {
        let v = v.to_str().unwrap_or("<non-UTF-8>");
        let theirs = v.strip_prefix("session=").unwrap_or(v);
        if theirs == token {
            continue;
        }
        let Some(id) = origin.cookie_sent_for(theirs) else {
            return Err(format!("received Set-Cookie {v:?}, which the origin never sent"));
        };
        if !theirs.starts_with('g') {
            return Err(format!("received Set-Cookie {v:?}, made for request {theirs} (batch {id}), not {token}"));
        }
        let mut seen = received.lock().unwrap();
        match seen.get(theirs) {
            Some(first) => {
                return Err(format!(
                    "received Set-Cookie {v:?} (one origin answer for {id}), already received by: {first}"
                ))
            }
            None => {
                seen.insert(theirs.to_string(), request.to_string());
            }
        }
    }
    Ok(())
}

/// A complete `200` must be exactly one of the versions the origin generated for this id.
fn oracle_document(origin: &TestOrigin, scenario: &Scenario, id: &str, body: &[u8]) -> Result<(), String> {
    let versions = origin.served_versions(id);
    for &v in &versions {
        if origin.document_version(id, v) == body {
            return Ok(());
        }
    }
    // Describe what it is instead.
    let mut what = format!("{} bytes, matching none of the versions {versions:?} of {id}", body.len());
    for &v in &versions {
        let doc = origin.document_version(id, v);
        if body.len() < doc.len() && doc.starts_with(body) {
            what = format!("a cut copy of version {v} of {id}: {} of {} bytes", body.len(), doc.len());
        }
    }
    if let Some(other) = scenario.batches.iter().find(|b| b.id != id && document(&b.id) == body) {
        what = format!("the document of another batch, {}", other.id);
    }
    Err(what)
}

/// `Content-Range: bytes a-b/N` of a 206.
fn content_range(headers: &HeaderMap) -> Option<(usize, usize, usize)> {
    let v = headers.get("content-range")?.to_str().ok()?.strip_prefix("bytes ")?;
    let (span, len) = v.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, len.parse().ok()?))
}

/// A complete `206` is exactly bytes a..=b of a version the origin served whose length is the
/// `N` of its `Content-Range`; the error says what it is instead, with N.
fn oracle_part(origin: &TestOrigin, id: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), (String, usize)> {
    let Some((a, b, n)) = content_range(headers) else {
        return Err((format!("a 206 without a valid Content-Range: {:?}", headers.get("content-range")), 0));
    };
    if a > b || b >= n || body.len() != b - a + 1 {
        return Err((format!("Content-Range bytes {a}-{b}/{n} with a {}-byte body", body.len()), n));
    }
    // The part is of the version its ETag names (what If-Range relies on).
    let etag = headers.get("etag").and_then(|v| v.to_str().ok()).unwrap_or("");
    let versions = origin.served_versions(id);
    for &v in &versions {
        let doc = origin.document_version(id, v);
        let tag = format!("\"sha256-{}\"", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&doc)));
        if doc.len() == n && doc[a..=b] == *body && etag == tag {
            return Ok(());
        }
    }
    Err((
        format!(
            "bytes {a}-{b}/{n} (ETag {etag}) matching no slice of the version that ETag names, of {versions:?} of {id}"
        ),
        n,
    ))
}

/// A `416` says `bytes */N` for a version of length N, and the range asked really starts at or
/// past N.
fn oracle_unsatisfiable(origin: &TestOrigin, id: &str, range: Option<&str>, headers: &HeaderMap) -> Result<(), String> {
    let cr = headers.get("content-range").and_then(|v| v.to_str().ok()).unwrap_or("");
    let n: usize = cr.strip_prefix("bytes */").and_then(|n| n.parse().ok()).ok_or(format!("Content-Range {cr:?}"))?;
    let first = range.and_then(|r| r.strip_prefix("bytes=")?.split('-').next()?.parse::<usize>().ok());
    if first.is_none_or(|first| first < n) {
        return Err(format!("416 with bytes */{n} for the satisfiable range {range:?}"));
    }
    let versions = origin.served_versions(id);
    if versions.iter().any(|&v| origin.document_version(id, v).len() == n) {
        Ok(())
    } else {
        Err(format!("bytes */{n}, the length of none of the versions {versions:?} of {id}"))
    }
}

/// An error answer (4xx/5xx, not to HEAD) that ended cleanly carries a JSON body (the proxy's own errors
/// say so; the origin's errors in this model are JSON too).
fn oracle_error_body(kind: Kind, reply: &Reply) -> Result<(), String> {
    if reply.status < 400 || matches!(kind, Kind::Head) {
        return Ok(());
    }
    match &reply.body {
        Ok(b) if serde_json::from_slice::<serde_json::Value>(b).is_err() => {
            Err(format!("body is not JSON: {:?}", String::from_utf8_lossy(&b[..b.len().min(200)])))
        }
        _ => Ok(()),
    }
}

/// A `HEAD` answered `200` with a Content-Length announces the length of a served version.
fn oracle_head(origin: &TestOrigin, id: &str, reply: &Reply) -> Result<(), String> {
    if reply.status != 200 {
        return Ok(());
    }
    let Some(cl) = reply.headers.get("content-length").and_then(|v| v.to_str().ok()?.parse::<usize>().ok()) else {
        return Ok(());
    };
    let versions = origin.served_versions(id);
    if versions.iter().any(|&v| origin.document_version(id, v).len() == cl) {
        Ok(())
    } else {
        Err(format!("Content-Length {cl}, no version of {versions:?} has that length"))
    }
}

/// A hit verified before its response started may only be cut when its file was damaged
/// meanwhile or the proxy was killed.
fn oracle_hit_not_cut_without_cause(
    ctx: &Ctx,
    id: &str,
    cache_status: &str,
    why: &str,
    started: Duration,
    ended: Duration,
) -> Result<(), String> {
    if cache_status != "lotecache; hit" {
        return Ok(());
    }
    if ctx.damaged_within(id, started, ended) || ctx.restarted_within(started, ended) {
        return Ok(());
    }
    Err(format!(
        "a hit's body was cut ({why}) between {:.3}s and {:.3}s with no damage to its file and no restart",
        started.as_secs_f64(),
        ended.as_secs_f64()
    ))
}

/// Origin generations per id stay within what the chaos explains:
/// `2 + invalidations (purges, damage) + restarts + 2 × faults + unstorable requests +
/// unstorable windows + shrink windows`: one fill per event that can empty the entry, two
/// per injected fault (the failing one, and a retry of a request on a reused origin
/// connection), one per request while the batch cannot be stored.
fn oracle_generations(ctx: &Ctx) {
    let restarts = ctx.restarts.load(SeqCst);
    let shrinks = ctx.shrink_windows.load(SeqCst);
    for b in &ctx.scenario.batches {
        let got = ctx.origin.generations(&b.id);
        let bound = ctx.book(&b.id, |k| {
            2 + k.invalidations + restarts + 2 * k.faults + k.unstorable_requests + k.unstorable_windows + shrinks
        });
        if got > bound {
            let book = ctx.book(&b.id, |k| format!("{k:?}"));
            ctx.fail(
                "origin-generations-over-bound",
                &b.path(),
                format!("{got} generations > bound {bound} (restarts {restarts}, shrink windows {shrinks}, {book})"),
            );
        }
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(read) = std::fs::read_dir(&d) else { continue };
        for e in read.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => out.push(e.path()),
                Err(_) => {}
            }
        }
    }
    out
}

/// Live entries, traffic stopped and fills drained: each one's content file is there with its
/// size, unless chaos damaged it after the entry was stored.
fn oracle_live_entries_have_content(ctx: &Ctx, proxy: &RunningProxy) {
    let entries = proxy.store().entries();
    // Each body, and each compressed variant (chaos damages bodies only).
    for e in entries.iter().flat_map(|e| e.files()) {
        let ok = std::fs::metadata(&e.path).map(|m| m.len() == e.size).unwrap_or(false);
        let damaged_since = ctx.book(&e.lote_id, |b| b.last_damage_wall_ms >= e.stored_at_ms);
        if !ok && !damaged_since {
            ctx.fail(
                "live-entry-lost-its-content-file",
                &e.key,
                format!(
                    "{} is missing or not {} bytes, and chaos did not damage it since it was stored",
                    e.path.display(),
                    e.size
                ),
            );
        }
    }
}

/// At rest after a restart and a GC with zero grace: no temp file, no content file that no
/// live entry references.
fn oracle_store_at_rest(ctx: &Ctx, proxy: &RunningProxy) {
    let tmp = walk(&ctx.dir.join("tmp"));
    if !tmp.is_empty() {
        ctx.fail("temp-file-left-at-rest", "store", format!("{} temp files: {:?}", tmp.len(), tmp));
    }
    let live: std::collections::HashSet<PathBuf> =
        proxy.store().entries().iter().flat_map(|e| e.files().map(|f| f.path.clone())).collect();
    let orphans: Vec<PathBuf> = walk(&ctx.dir.join("content-v2")).into_iter().filter(|f| !live.contains(f)).collect();
    if !orphans.is_empty() {
        ctx.fail("orphan-content-file-after-gc", "store", format!("{} orphans: {:?}", orphans.len(), orphans));
    }
}

/// Waits until no fill runs and no compression of what they stored is pending (up to 60 s:
/// the machine may be busy with other tests); says so if they did not drain, since the
/// at-rest oracles would then see their files being written.
async fn wait_fills_drained(ctx: &Ctx, proxy: &RunningProxy) {
    for _ in 0..3000 {
        if proxy.cache().fills.is_empty() && proxy.cache().compressions_pending() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctx.fail(
        "fills-not-drained",
        "store",
        format!(
            "{} fills and {} compressions still running after 60 s",
            proxy.cache().fills.len(),
            proxy.cache().compressions_pending()
        ),
    );
}

/// After the traffic: origin back to normal, entries checked, a final download of every
/// batch through the running proxy, restart, GC with zero grace, the store at rest, the
/// generation bound.
async fn check_at_rest(ctx: &Arc<Ctx>) {
    for b in &ctx.scenario.batches {
        ctx.origin.set_request_cookie(&b.id, false);
        ctx.origin.set(&b.id, Behavior::Ok { delay: Duration::ZERO, pieces: 1, gap: Duration::ZERO });
    }
    if ctx.live.lock().await.is_none() {
        start_live(ctx).await;
    }
    {
        let live = ctx.live.lock().await;
        let proxy = &live.as_ref().unwrap().proxy;
        wait_fills_drained(ctx, proxy).await;
        oracle_live_entries_have_content(ctx, proxy);
    }
    // Restart, and download every batch once: served from the reopened store or refetched.
    kill_live(ctx, &RestartKind::ShutdownZeroGrace).await;
    ctx.restarts.fetch_add(1, SeqCst);
    start_live(ctx).await;
    let addr = *ctx.addr.lock().unwrap();
    for b in &ctx.scenario.batches {
        let request = format!("final GET {} (client token final)", b.path());
        match tokio::time::timeout(ctx.scenario.request_bound, one_request(addr, b, Kind::Get, "final", None, None, 0))
            .await
        {
            Err(_) => ctx.fail("request-exceeded-its-bound", &request, "final download".into()),
            Ok(Err(e)) => ctx.fail("final-download-failed", &request, e),
            Ok(Ok(reply)) => {
                let now = ctx.now();
                check_reply(ctx, b, Kind::Get, "final", &request, None, &reply, now, now);
            }
        }
    }
    let live = ctx.live.lock().await;
    let proxy = &live.as_ref().unwrap().proxy;
    wait_fills_drained(ctx, proxy).await;
    // The collector runs once the index has loaded after the restart.
    for _ in 0..3000 {
        if proxy.store().is_loaded() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // cache.gc_grace must be > 0 in the config: zero is set on the store directly.
    proxy.store().set_gc_grace(Duration::ZERO);
    if let Err(e) = proxy.store().gc().await {
        ctx.fail("gc-failed", "store", e.to_string());
    }
    oracle_store_at_rest(ctx, proxy);
    drop(live);
    oracle_generations(ctx);
    kill_live(ctx, &RestartKind::ShutdownZeroGrace).await;
}

// ---------------------------------------------------------------------------------------
// Chaos.

/// Something to undo later (end of a window).
enum Undo {
    RestoreSize,
    CookiesOff(String),
    ModeOff(String),
}

async fn chaos_loop(ctx: Arc<Ctx>, mut rng: Rng) {
    let mut undo: Vec<(Instant, Undo)> = Vec::new();
    let mut restarts = ctx.scenario.restarts.clone().into_iter().peekable();
    let mut versions: HashMap<String, u32> = HashMap::new();
    while Instant::now() < ctx.traffic_end {
        let (lo, hi) = ctx.scenario.chaos_gap_ms;
        tokio::time::sleep(rng.ms(lo, hi)).await;
        let now = Instant::now();
        let due: Vec<Undo> = {
            let (due, keep): (Vec<_>, Vec<_>) = undo.drain(..).partition(|(at, _)| *at <= now);
            undo = keep;
            due.into_iter().map(|(_, u)| u).collect()
        };
        for u in due {
            apply_undo(&ctx, u).await;
        }
        if restarts.peek().is_some_and(|at| ctx.now() >= *at) {
            restarts.next();
            let kind = if rng.chance(50) { RestartKind::ShutdownZeroGrace } else { RestartKind::Drop };
            restart(&ctx, kind).await;
            continue;
        }
        let batch = ctx.scenario.batches[if rng.chance(60) {
            rng.below(ctx.scenario.hot as u64)
        } else {
            rng.below(ctx.scenario.batches.len() as u64)
        } as usize]
            .clone();
        let id = batch.id.clone();
        // Weights: fault, version, cookies, mode, purge key, purge lote, purge all, gc,
        // reload, shrink, corrupt, truncate, delete.
        match rng.weighted(&[26, 5, 6, 4, 6, 5, 2, 4, 4, 2, 6, 3, 3]) {
            0 => {
                let fault = pick_fault(&mut rng, &ctx.scenario, &batch, &ctx.origin);
                ctx.origin.push_once(&id, fault.behavior());
                if fault.fails() {
                    ctx.book(&id, |b| b.faults += 1);
                }
                // Mostly with a purge, so that the next request meets the fault.
                let r = if rng.chance(60) { purge_key(&ctx, &batch).await } else { String::new() };
                ctx.log(&Event::OriginFault { id, fault }, &r);
            }
            1 => {
                let version = ctx.origin.bump_version(&id);
                versions.insert(id.clone(), version);
                ctx.log(&Event::OriginVersion { id, version }, "");
            }
            2 => {
                let mode_on = undo.iter().any(|(_, u)| matches!(u, Undo::ModeOff(x) if *x == id));
                if !ctx.book(&id, |b| b.cookies) && !mode_on {
                    ctx.origin.set_request_cookie(&id, true);
                    // A slow generation, so that other requests join the fills of the window.
                    let slow = Behavior::Ok { delay: rng.ms(50, 400), pieces: 4, gap: rng.ms(10, 50) };
                    ctx.origin.set(&id, slow);
                    ctx.book(&id, |b| {
                        b.cookies = true;
                        b.unstorable_windows += 1;
                    });
                    undo.push((now + rng.ms(300, 2000), Undo::CookiesOff(id.clone())));
                    // With a purge: the next requests miss, and answers with cookies are
                    // never stored, so every request of the window reaches the origin.
                    let r = purge_key(&ctx, &batch).await;
                    ctx.log(&Event::CookiesOn { id }, &r);
                }
            }
            3 => {
                let busy = ctx.book(&id, |b| b.cookies);
                if !busy && !undo.iter().any(|(_, u)| matches!(u, Undo::ModeOff(x) if *x == id)) {
                    let mode = if rng.chance(50) { Mode::CloseDelimited } else { Mode::Chunked };
                    ctx.origin.set(
                        &id,
                        match mode {
                            Mode::CloseDelimited => Behavior::CloseDelimited { send: None },
                            Mode::Chunked => Behavior::Chunked,
                        },
                    );
                    if matches!(mode, Mode::CloseDelimited) && batch.route == Route::Raw {
                        ctx.book(&id, |b| {
                            b.no_length = true;
                            b.unstorable_windows += 1;
                        });
                    }
                    undo.push((now + rng.ms(500, 3000), Undo::ModeOff(id.clone())));
                    ctx.log(&Event::ModeOn { id, mode }, "");
                }
            }
            4 => {
                let r = purge_key(&ctx, &batch).await;
                ctx.log(&Event::PurgeKey { key: batch.key() }, &r);
            }
            5 => {
                let r = admin(&ctx, Method::POST, "/purge", &format!("{{\"lote_id\":\"{id}\"}}")).await;
                ctx.book(&id, |b| b.invalidations += 1);
                ctx.log(&Event::PurgeLote { id }, &r);
            }
            6 => {
                let r = admin(&ctx, Method::POST, "/purge", "{\"all\":true}").await;
                for b in &ctx.scenario.batches {
                    ctx.book(&b.id, |k| k.invalidations += 1);
                }
                ctx.log(&Event::PurgeAll, &r);
            }
            7 => {
                let r = admin(&ctx, Method::POST, "/gc", "").await;
                ctx.log(&Event::Gc, &r);
            }
            8 => {
                let knobs = {
                    let mut k = ctx.knobs.lock().unwrap();
                    k.memory_tier = *rng.pick(&["0", "64MiB", "1MiB"]);
                    k.replay_buffer = *rng.pick(&["1MiB", "4MiB", "512KiB"]);
                    k.gc_grace = *rng.pick(&["1s", "100ms", "2m"]);
                    k.clone()
                };
                let r = reload(&ctx).await;
                ctx.log(&Event::Reload { knobs }, &r);
            }
            9 => {
                if !ctx.shrunk.load(SeqCst) {
                    let max_size = ctx.scenario.shrunk_size;
                    ctx.knobs.lock().unwrap().max_size = max_size;
                    ctx.shrunk.store(true, SeqCst);
                    ctx.shrink_windows.fetch_add(1, SeqCst);
                    let r = reload(&ctx).await;
                    undo.push((now + rng.ms(300, 2000), Undo::RestoreSize));
                    ctx.log(&Event::Shrink { max_size }, &r);
                }
            }
            n => damage(&ctx, &mut rng, n - 10).await,
        }
    }
    for (_, u) in undo {
        apply_undo(&ctx, u).await;
    }
}

fn pick_fault(rng: &mut Rng, scenario: &Scenario, batch: &Batch, origin: &TestOrigin) -> Fault {
    let len = origin.document_version(&batch.id, 0).len();
    let cut = rng.range(1, len as u64 - 1) as usize;
    let validated = batch.route == Route::Validated;
    loop {
        let f = match rng.weighted(&[5, 3, 4, 2, 1, 2, 4, 3, 2, 6]) {
            0 => Fault::CutShort(cut),
            1 => Fault::Stall(*rng.pick(&[Duration::from_millis(300), Duration::from_millis(1500)])),
            2 => Fault::Status(*rng.pick(&[500, 502, 503])),
            3 => Fault::Refuse,
            4 => Fault::Hang,
            5 => Fault::ChunkedNoEnd,
            6 => Fault::ChunkedCut(cut),
            7 if validated => Fault::CloseCut(cut),
            8 if validated => {
                let others: Vec<&Batch> = scenario.batches.iter().filter(|b| b.id != batch.id).collect();
                Fault::OtherBatch(rng.pick(&others).id.clone())
            }
            9 => Fault::Slow { delay: rng.ms(0, 600), pieces: rng.range(2, 16) as usize, gap: rng.ms(5, 60) },
            _ => continue,
        };
        return f;
    }
}

/// Purges one batch's key through the admin API (counted as an invalidation).
async fn purge_key(ctx: &Ctx, batch: &Batch) -> String {
    ctx.book(&batch.id, |b| b.invalidations += 1);
    let r = admin(ctx, Method::POST, "/purge", &format!("{{\"key\":\"{}\"}}", batch.key())).await;
    format!("purge key: {r}")
}

async fn apply_undo(ctx: &Ctx, u: Undo) {
    match u {
        Undo::RestoreSize => {
            let max_size = ctx.scenario.max_size;
            ctx.knobs.lock().unwrap().max_size = max_size;
            let r = reload(ctx).await;
            ctx.shrunk.store(false, SeqCst);
            ctx.log(&Event::RestoreSize { max_size }, &r);
        }
        Undo::CookiesOff(id) => {
            ctx.origin.set_request_cookie(&id, false);
            ctx.origin.set(&id, Behavior::Ok { delay: Duration::ZERO, pieces: 1, gap: Duration::ZERO });
            ctx.book(&id, |b| b.cookies = false);
            ctx.log(&Event::CookiesOff { id }, "");
        }
        Undo::ModeOff(id) => {
            ctx.origin.set(&id, Behavior::Ok { delay: Duration::ZERO, pieces: 1, gap: Duration::ZERO });
            ctx.book(&id, |b| b.no_length = false);
            ctx.log(&Event::ModeOff { id }, "");
        }
    }
}

async fn reload(ctx: &Ctx) -> String {
    let config = ctx.config();
    match ctx.live.lock().await.as_ref() {
        Some(live) => {
            live.proxy.reload(config);
            "applied".into()
        }
        None => "proxy down; applies at the restart".into(),
    }
}

async fn restart(ctx: &Ctx, kind: RestartKind) {
    ctx.log(&Event::Restart { kind: kind.clone() }, "");
    let down = ctx.now();
    ctx.downtime.lock().unwrap().push((down, None));
    kill_live(ctx, &kind).await;
    ctx.restarts.fetch_add(1, SeqCst);
    start_live(ctx).await;
    let up = ctx.now();
    if let Some(last) = ctx.downtime.lock().unwrap().last_mut() {
        last.1 = Some(up);
    }
    let addr = *ctx.addr.lock().unwrap();
    ctx.log(&Event::Restarted { addr }, &format!("down {:.0?}", up - down));
}

/// Corrupts (0), truncates (1) or deletes (2) the content file of a random live entry.
async fn damage(ctx: &Ctx, rng: &mut Rng, what: usize) {
    let entries = match ctx.live.lock().await.as_ref() {
        Some(live) => live.proxy.store().entries(),
        None => return,
    };
    if entries.is_empty() {
        return;
    }
    let e = entries[rng.below(entries.len() as u64) as usize].clone();
    let file = e.path.file_name().map(|f| f.to_string_lossy()[..12.min(f.len())].to_string()).unwrap_or_default();
    let id = e.lote_id.clone();
    // Recorded before the damage: a request that sees it started after this.
    let at = ctx.now();
    let wall = lotecache::clock::now_ms();
    ctx.book(&id, |b| {
        b.invalidations += 1;
        b.damaged_at.push(at);
        b.last_damage_wall_ms = wall;
    });
    let (event, result) = match what {
        0 => {
            let offset = rng.below(e.size.max(1));
            let r = flip_byte(&e.path, offset);
            (Event::Corrupt { id, file, offset }, r)
        }
        1 => {
            let to = rng.below(e.size.max(1));
            let r = std::fs::OpenOptions::new()
                .write(true)
                .open(&e.path)
                .and_then(|f| f.set_len(to))
                .map_or_else(|e| format!("failed: {e}"), |_| "done".into());
            (Event::Truncate { id, file, to }, r)
        }
        _ => {
            let r = std::fs::remove_file(&e.path).map_or_else(|e| format!("failed: {e}"), |_| "done".into());
            (Event::Delete { id, file }, r)
        }
    };
    ctx.log(&event, &result);
}

fn flip_byte(path: &Path, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom, Write};
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut b = [0u8; 1];
        f.read_exact(&mut b)?;
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(&[b[0] ^ 0xff])
    })();
    r.map_or_else(|e| format!("failed: {e}"), |_| "done".into())
}

/// An admin API call with the token; "<status> <body>" for the log.
async fn admin(ctx: &Ctx, method: Method, path: &str, body: &str) -> String {
    let addr = *ctx.admin.lock().unwrap();
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let fut = async {
        let resp = crate::support::client().request(req).await.map_err(|e| format!("{e}"))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| format!("{e}"))?.to_bytes();
        Ok::<_, String>(format!("{status} {}", String::from_utf8_lossy(&body[..body.len().min(160)])))
    };
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => format!("failed: {e}"),
        Err(_) => "timed out".into(),
    }
}
