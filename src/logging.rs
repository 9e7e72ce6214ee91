//! The process's log: human text or JSON lines on stderr, every line escaped
//! ([`crate::log_escape`]) so no client byte can forge a line, written by a background thread.
//! Owns the `[log]` settings.

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `[log]`: level filter (`RUST_LOG` overrides it), format, and whether access lines are written.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub access: bool,
}

/// Logs to stderr through a background writer (request threads never wait on the
/// terminal or journald); `RUST_LOG` overrides the configured level. Keep the guard alive:
/// dropping it flushes what is queued.
pub fn init(log: &LogConfig) -> tracing_appender::non_blocking::WorkerGuard {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    if !log.access {
        filter = filter.add_directive("lotecache::access=off".parse().expect("static directive"));
    }
    let (writer, guard) =
        tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(false).finish(std::io::stderr());
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal(); // no colour codes in journald or files
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(crate::log_escape::Escaping::new(writer, ansi));
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    guard
}
