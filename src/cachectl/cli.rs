//! The `lotecache cache …` commands as the command line sees them: their arguments, and their
//! output for people (tables, one-line summaries) or scripts (`--json`), with exit statuses:
//! 0 done, 1 something bad was found (a bad entry, a failed warm), 2 the command could not run.
//! The operations themselves are in the parent module.

// The commands' doc comments are their `--help` text, rendered by clap, not rustdoc.
#![allow(rustdoc::invalid_html_tags)]

use crate::cache::store;
use crate::{cachectl, config};
use clap::Subcommand;
use std::{path::PathBuf, process::ExitCode};

/// Where a `cache` command finds the store.
#[derive(clap::Args)]
pub struct StoreArgs {
    /// Cache directory.
    #[arg(long, conflicts_with = "config")]
    cache_dir: Option<PathBuf>,
    /// Take the cache directory from this config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

impl StoreArgs {
    fn dir(&self) -> Result<PathBuf, ExitCode> {
        if let Some(d) = &self.cache_dir {
            return Ok(d.clone());
        }
        match config::load(self.config.as_deref(), &config::Overrides::default()) {
            Ok(c) => Ok(c.cache_dir),
            Err(errors) => Err(config::print_errors(&errors)),
        }
    }
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// List entries: key, lote id, size, stored at, digest.
    Ls {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Entries, bytes, content files, unreferenced content, temp files.
    Stats {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove entries by lote id, by key, or all (server stopped; while it runs use the
    /// admin API's POST /purge).
    Purge {
        #[command(flatten)]
        store: StoreArgs,
        /// The batch whose entries to remove.
        #[arg(required_unless_present_any = ["key", "all"])]
        lote_id: Option<String>,
        #[arg(long, conflicts_with_all = ["lote_id", "all"])]
        key: Option<String>,
        #[arg(long, conflicts_with_all = ["lote_id", "key"])]
        all: bool,
    },
    /// Remove content no entry references and compact the index (server stopped).
    Gc {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write every entry, verified, as <dir>/<lote_id>_resultados.json (atomically).
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// Destination directory (created if missing).
        dir: PathBuf,
    },
    /// Store the saved documents in DIR (named like the rule's keys, <lote_id>_resultados.json)
    /// as entries, each validated with the rule's checks for the id its name gives (server
    /// stopped; re-running skips what is stored). Exit 1 if a file failed.
    Import {
        /// The config whose rule (and cache directory) to use; the shipped one has the checks
        /// import needs.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Cache directory (overrides the config's).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// The rule to import as (default: the first).
        #[arg(long)]
        rule: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Directory of saved documents.
        dir: PathBuf,
    },
    /// Warm each batch listed in FILE (one id per line): through the proxy as a client would
    /// (--via), or by the server itself with the admin API's POST /warm (--admin; the admin
    /// token from LOTECACHE_ADMIN_TOKEN; fills carry the rule's service headers, no client's).
    #[command(group(clap::ArgGroup::new("target").required(true).args(["via", "admin"])))]
    Warm {
        /// File of lote ids, one per line ('#' comments and blank lines skipped).
        file: PathBuf,
        /// Base URL of the proxy, e.g. http://127.0.0.1:8080.
        #[arg(long)]
        via: Option<String>,
        /// Base URL of the admin API, e.g. http://127.0.0.1:9091.
        #[arg(long)]
        admin: Option<String>,
        /// Requests at a time.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Path of a batch on the proxy.
        #[arg(long, default_value = config::DEFAULT_RULE_PATH)]
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every entry against its digest; exit 0 only if all are good.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// Remove the bad entries (the server must be stopped: this takes the directory lock).
        #[arg(long)]
        remove: bool,
    },
}

/// Prints `value` as JSON, or `human` otherwise.
fn output(json: bool, value: &impl serde::Serialize, human: impl FnOnce()) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).expect("output serializes"));
    } else {
        human();
    }
}

/// Runs a `lotecache cache …` command and prints its outcome.
pub async fn run(command: CacheCommand) -> ExitCode {
    use std::io::IsTerminal;
    let progress = |json: bool| !json && std::io::stderr().is_terminal();
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("lotecache cache {what}: {e}");
        ExitCode::from(2)
    };
    match command {
        CacheCommand::Ls { store } => {
            let dir = match store.dir() {
                Ok(d) => d,
                Err(code) => return code,
            };
            let entries = cachectl::ls(&dir);
            let list: Vec<_> =
                entries.iter().map(|e| crate::admin::entry_json(&crate::cache::store::EntrySummary::from(e))).collect();
            output(store.json, &list, || {
                println!(
                    "{:<48} {:<32} {:>12}  {:<24}  {:<16}  variants",
                    "key", "lote_id", "bytes", "stored at", "sha256"
                );
                for e in &list {
                    let variants: Vec<String> = e["variants"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|v| format!("{}:{}", v["encoding"].as_str().unwrap_or(""), v["size"]))
                        .collect();
                    println!(
                        "{:<48} {:<32} {:>12}  {:<24}  {:<16}  {}",
                        e["key"].as_str().unwrap_or(""),
                        e["lote_id"].as_str().unwrap_or(""),
                        e["size"],
                        e["stored_at"].as_str().unwrap_or(""),
                        &e["sha256"].as_str().unwrap_or("")[..16],
                        variants.join(" ")
                    );
                }
                println!("{} entries", list.len());
            });
            ExitCode::SUCCESS
        }
        CacheCommand::Stats { store } => {
            let dir = match store.dir() {
                Ok(d) => d,
                Err(code) => return code,
            };
            let s = cachectl::stats(&dir);
            output(store.json, &s, || {
                println!("store            {}", s.dir);
                println!("entries          {} ({} bytes)", s.entries, s.bytes);
                println!("variants         {} ({} bytes, compressed)", s.variants, s.variant_bytes);
                println!("content files    {} ({} bytes)", s.content_files, s.content_bytes);
                println!(
                    "unreferenced     {} ({} bytes; `cache gc` removes them)",
                    s.unreferenced_files, s.unreferenced_bytes
                );
                println!("temp files       {}", s.tmp_files);
            });
            ExitCode::SUCCESS
        }
        CacheCommand::Purge { store, lote_id, key, all } => {
            let dir = match store.dir() {
                Ok(d) => d,
                Err(code) => return code,
            };
            let which = match (lote_id, key, all) {
                (_, _, true) => store::Purge::All,
                (_, Some(k), _) => store::Purge::Key(k),
                (Some(id), _, _) => store::Purge::LoteId(id),
                _ => unreachable!("clap requires one of them"),
            };
            match cachectl::purge(&dir, which).await {
                Ok(removed) => {
                    output(store.json, &serde_json::json!({ "removed": removed }), || {
                        removed.iter().for_each(|k| println!("removed {k}"));
                        println!("{} entries removed", removed.len());
                    });
                    ExitCode::SUCCESS
                }
                Err(e) => fail(
                    "purge",
                    &format!("{e}\n(while the server runs, purge through its admin API: curl -X POST -H 'Authorization: Bearer $TOKEN' http://127.0.0.1:9091/purge -d '{{\"lote_id\":\"...\"}}')"),
                ),
            }
        }
        CacheCommand::Gc { store } => {
            let dir = match store.dir() {
                Ok(d) => d,
                Err(code) => return code,
            };
            match cachectl::gc(&dir).await {
                Ok(r) => {
                    output(store.json, &r, || {
                        println!(
                            "removed {} unreferenced content files ({} bytes), compacted {} index buckets",
                            r.removed_files, r.removed_bytes, r.compacted_buckets
                        )
                    });
                    ExitCode::SUCCESS
                }
                Err(e) => fail("gc", &e),
            }
        }
        CacheCommand::Export { store, dir: out } => {
            let dir = match store.dir() {
                Ok(d) => d,
                Err(code) => return code,
            };
            match cachectl::export(&dir, &out, progress(store.json)).await {
                Ok(r) => {
                    output(store.json, &r, || {
                        for b in &r.bad {
                            println!("  BAD  {} (lote {}): {} — not exported", b.key, b.lote_id, b.reason);
                        }
                        println!("exported {} files to {}, {} bad", r.exported.len(), r.dir, r.bad.len());
                    });
                    if r.bad.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => fail("export", &e),
            }
        }
        CacheCommand::Import { config: path, cache_dir, rule, json, dir: from } => {
            let overrides =
                config::Overrides { cache_dir: cache_dir.map(|d| d.display().to_string()), ..Default::default() };
            let config = match config::load(path.as_deref(), &overrides) {
                Ok(c) => c,
                Err(errors) => return config::print_errors(&errors),
            };
            let chosen = match &rule {
                Some(name) => config.rules.iter().find(|r| &r.name == name),
                None => config.rules.first(),
            };
            let Some(chosen) = chosen else {
                return fail("import", &format!("no rule named {:?} in the config", rule.unwrap_or_default()));
            };
            match cachectl::import(&config.cache_dir, (config.max_size, config.min_free), &from, chosen, progress(json))
                .await
            {
                Ok(r) => {
                    output(json, &r, || {
                        r.failed.iter().for_each(|f| println!("  FAILED  {}: {}", f.file, f.reason));
                        r.skipped.iter().for_each(|f| println!("  skipped {}: {}", f.file, f.reason));
                        println!(
                            "imported {} from {} as rule {}, {} skipped, {} failed",
                            r.imported.len(),
                            r.dir,
                            r.rule,
                            r.skipped.len(),
                            r.failed.len()
                        );
                    });
                    if r.failed.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => fail("import", &e),
            }
        }
        CacheCommand::Warm { file, via, admin, concurrency, path, json } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => return fail("warm", &format!("cannot read {}: {e}", file.display())),
            };
            let ids: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect();
            if let Some(admin) = admin {
                let Ok(token) = std::env::var("LOTECACHE_ADMIN_TOKEN") else {
                    return fail("warm", &"--admin needs the admin token in LOTECACHE_ADMIN_TOKEN");
                };
                let r = cachectl::warm_via_admin(ids, &admin, &token).await;
                output(json, &r, || {
                    r.failed.iter().for_each(|f| println!("  FAILED {f}"));
                    let counts: Vec<String> = r.results.iter().map(|(k, n)| format!("{n} {k}")).collect();
                    println!("{} requested: {}", r.requested, counts.join(", "));
                });
                return if r.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
            }
            let via = via.expect("clap requires --via or --admin");
            let r = cachectl::warm(ids, &via, &path, concurrency, progress(json)).await;
            output(json, &r, || {
                r.failed.iter().for_each(|f| println!("  FAILED {f}"));
                println!(
                    "{} requested: {} hits, {} stored, {} not stored, {} failed",
                    r.requested,
                    r.hit,
                    r.stored,
                    r.not_stored,
                    r.failed.len()
                );
            });
            if r.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        CacheCommand::Verify { store, remove } => cache_verify(store, remove).await,
    }
}

async fn cache_verify(args: StoreArgs, remove: bool) -> ExitCode {
    let dir = match args.dir() {
        Ok(d) => d,
        Err(code) => return code,
    };
    use std::io::IsTerminal;
    let progress = !args.json && std::io::stderr().is_terminal();
    let report = match cachectl::verify(&dir, remove, progress).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lotecache cache verify: {e}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
    } else {
        println!("verified {} entries ({} bytes) in {}", report.checked, report.bytes, report.dir);
        for b in &report.bad {
            println!("  BAD  {} (lote {}): {}", b.key, b.lote_id, b.reason);
        }
        if report.unreadable > 0 {
            println!("  {} index line(s) could not be read", report.unreadable);
        }
        let removed = if remove { format!(", {} removed", report.removed) } else { String::new() };
        println!("{} good, {} bad{removed}", report.checked - report.bad.len(), report.bad.len());
    }
    if report.all_good() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
