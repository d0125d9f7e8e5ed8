//! The log on stderr: warnings and errors, or what `RUST_LOG` asks for.
//!
//! `RUST_LOG` takes comma-separated directives, each a level (`debug`), a target prefix
//! (`vmm`: everything it logs) or both (`vmm=trace`), parsed by tracing-subscriber's
//! `Targets`. Not its `EnvFilter`: that one's span and field directives bring a regex engine
//! whose Unicode tables are ~190 KiB of pointers the dynamic loader relocates at every start
//! of the binary (~50 page faults), and twinbox opens no spans to filter on.
//!
//! The formatter (tracing-subscriber's `fmt` over its span registry, whose slab alone is
//! 32 KiB of zeroed pointers, ~14 page faults in all) is built on the first event the
//! filter lets through ([`OnFirstEvent`]): a run that logs nothing, the usual case at the
//! default level, never builds it. A page fault costs ~15 µs on a PVM host.

use std::sync::OnceLock;
use tracing::subscriber::{Interest, Subscriber};
use tracing::{span, Event, Metadata};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt as _};
use tracing_subscriber::Registry;

/// The level when `RUST_LOG` is unset or unreadable.
const DEFAULT_LEVEL: LevelFilter = LevelFilter::WARN;

/// Sends the log to stderr, filtered as `RUST_LOG` says.
pub fn init() {
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| parse(&directives))
        .unwrap_or_else(|| Targets::new().with_default(DEFAULT_LEVEL));
    OnFirstEvent::new(filter, || Box::new(formatter(std::io::stderr))).init();
}

/// tracing-subscriber's formatter of events, writing to `writer`, without timestamps.
fn formatter<W>(writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .without_time(),
    )
}

/// A subscriber that is `filter` until an event passes it, and from then on also the
/// subscriber `build` makes, which every event and span goes to.
pub struct OnFirstEvent {
    filter: Targets,
    build: fn() -> Box<dyn Subscriber + Send + Sync>,
    built: OnceLock<Box<dyn Subscriber + Send + Sync>>,
}

impl OnFirstEvent {
    /// `filter` now, `build()` when it is first needed.
    pub fn new(filter: Targets, build: fn() -> Box<dyn Subscriber + Send + Sync>) -> Self {
        Self {
            filter,
            build,
            built: OnceLock::new(),
        }
    }

    fn output(&self) -> &(dyn Subscriber + Send + Sync) {
        self.built.get_or_init(self.build).as_ref()
    }
}

// `current_span` keeps the default (unknown): twinbox asks no subscriber for it, and the
// formatter tracks its own spans inside.
impl Subscriber for OnFirstEvent {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if self.enabled(metadata) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter
            .would_enable(metadata.target(), metadata.level())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Layer::<Registry>::max_level_hint(&self.filter)
    }

    fn new_span(&self, span: &span::Attributes<'_>) -> span::Id {
        self.output().new_span(span)
    }

    fn record(&self, span: &span::Id, values: &span::Record<'_>) {
        self.output().record(span, values)
    }

    fn record_follows_from(&self, span: &span::Id, follows: &span::Id) {
        self.output().record_follows_from(span, follows)
    }

    fn event(&self, event: &Event<'_>) {
        self.output().event(event)
    }

    fn enter(&self, span: &span::Id) {
        self.output().enter(span)
    }

    fn exit(&self, span: &span::Id) {
        self.output().exit(span)
    }

    fn clone_span(&self, id: &span::Id) -> span::Id {
        self.output().clone_span(id)
    }

    fn try_close(&self, id: span::Id) -> bool {
        self.output().try_close(id)
    }
}

/// The filter `directives` describe, read as `EnvFilter` reads them: empty directives are
/// skipped, none at all means errors only; `None` when one is not understood (the caller
/// then keeps the default rather than guess).
fn parse(directives: &str) -> Option<Targets> {
    let directives: Vec<&str> = directives.split(',').filter(|d| !d.is_empty()).collect();
    if directives.is_empty() {
        return Some(Targets::new().with_default(LevelFilter::ERROR));
    }
    directives.join(",").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn a_level_a_target_and_both_are_understood() {
        let filter = parse("info,vmm=trace,container").expect("valid directives");
        assert!(filter.would_enable("bench::runner", &Level::INFO));
        assert!(!filter.would_enable("bench::runner", &Level::DEBUG));
        assert!(filter.would_enable("vmm::cgroup", &Level::TRACE));
        assert!(filter.would_enable("container::run", &Level::TRACE));
    }

    #[test]
    fn empty_means_errors_only_and_nonsense_means_the_default() {
        let filter = parse("").expect("empty is valid");
        assert!(filter.would_enable("vmm", &Level::ERROR));
        assert!(!filter.would_enable("vmm", &Level::WARN));
        assert!(parse("vmm=loud").is_none());
        assert!(parse("a=b=c").is_none());
    }

    /// Where the formatter of the test below writes.
    static CAPTURED: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

    struct Captured;

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            CAPTURED.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn what_the_filter_passes_is_written_as_the_formatter_writes_it_and_nothing_else() {
        let filter = parse("warn,twinbox=debug").expect("valid directives");
        let subscriber = OnFirstEvent::new(filter, || Box::new(formatter(|| Captured)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "vmm::cgroup", "not asked for");
            tracing::warn!(target: "vmm::cgroup", "a warning {}", 1);
            tracing::debug!(target: "twinbox::cli", answer = 42, "asked for");
        });
        let written = String::from_utf8(CAPTURED.lock().unwrap().clone()).expect("text");
        let written = without_colours(&written);
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 2, "{written}");
        for (line, level, target, text) in [
            (lines[0], "WARN", "vmm::cgroup", "a warning 1"),
            (lines[1], "DEBUG", "twinbox::cli", "asked for answer=42"),
        ] {
            assert!(
                line.contains(level) && line.contains(target) && line.ends_with(text),
                "{line:?} is not {level} {target}: {text}"
            );
        }
    }

    /// `text` without its ANSI colour sequences (ESC [ ... m).
    fn without_colours(text: &str) -> String {
        let mut plain = String::new();
        let mut rest = text;
        while let Some(start) = rest.find('\x1b') {
            plain.push_str(&rest[..start]);
            rest = rest[start..].split_once('m').map_or("", |(_, after)| after);
        }
        plain + rest
    }
}
