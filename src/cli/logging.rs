//! The log on stderr: warnings and errors, or what `RUST_LOG` asks for.
//!
//! `RUST_LOG` takes comma-separated directives, each a level (`debug`), a target prefix
//! (`vmm`: everything it logs) or both (`vmm=trace`), parsed by tracing-subscriber's
//! `Targets`. Not its `EnvFilter`: that one's span and field directives bring a regex engine
//! whose Unicode tables are ~190 KiB of pointers the dynamic loader relocates at every start
//! of the binary (~50 page faults), and twinbox opens no spans to filter on.

use tracing_subscriber::filter::{LevelFilter, Targets};

/// The level when `RUST_LOG` is unset or unreadable.
const DEFAULT_LEVEL: LevelFilter = LevelFilter::WARN;

/// Sends the log to stderr, filtered as `RUST_LOG` says.
pub fn init() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| parse(&directives))
        .unwrap_or_else(|| Targets::new().with_default(DEFAULT_LEVEL));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .without_time(),
        )
        .init();
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
}
