//! Every number the bench records, named once: its key in `results.json`, its unit and
//! which direction is better. Scenarios declare these, extract them and the report reads
//! them back through the same constants, so no key is spelled in two places.

use crate::results::MetricDef;

/// One measured quantity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metric {
    /// Key in [`crate::results::RunRecord::metrics`].
    pub key: &'static str,
    /// Unit shown in the report.
    pub unit: &'static str,
    /// Whether more is better (throughput) or worse (time, memory).
    pub higher_is_better: bool,
}

impl Metric {
    const fn lower(key: &'static str, unit: &'static str) -> Self {
        Self {
            key,
            unit,
            higher_is_better: false,
        }
    }

    const fn higher(key: &'static str, unit: &'static str) -> Self {
        Self {
            key,
            unit,
            higher_is_better: true,
        }
    }

    /// Its stored form in `results.json`.
    pub fn def(self) -> MetricDef {
        MetricDef {
            key: self.key.into(),
            unit: self.unit.into(),
            higher_is_better: self.higher_is_better,
        }
    }
}

/// Host-clock time from spawn to the end of teardown.
pub const TO_TORN_DOWN_MS: Metric = Metric::lower("to_torn_down_ms", "ms");
/// Host-clock time from spawn to the workload's exit.
pub const TO_WORKLOAD_EXITED_MS: Metric = Metric::lower("to_workload_exited_ms", "ms");
/// Host memory of one instance.
pub const HOST_MEMORY_MIB: Metric = Metric::lower("host_memory_mib", "MiB");
/// Peak RSS of the runtime or VMM process itself, guest RAM excluded.
pub const RUNTIME_RSS_MIB: Metric = Metric::lower("runtime_rss_mib", "MiB");
/// Peak PSS of the VMM process itself (shared pages divided by their sharers), guest RAM
/// excluded.
pub const RUNTIME_PSS_MIB: Metric = Metric::lower("runtime_pss_mib", "MiB");
/// `sysbench cpu` events per second.
pub const EVENTS_PER_S: Metric = Metric::higher("events_per_s", "events/s");
/// `sysbench memory` bandwidth.
pub const MIB_PER_S: Metric = Metric::higher("mib_per_s", "MiB/s");
/// Drop of the host's MemAvailable per instance alive.
pub const MIB_PER_INSTANCE: Metric = Metric::lower("mib_per_instance", "MiB");
/// Drop of the host's MemFree per instance alive.
pub const MEMFREE_MIB_PER_INSTANCE: Metric = Metric::lower("memfree_mib_per_instance", "MiB");
/// Instances alive at once in a density run (recorded, not tabled).
pub const INSTANCES: Metric = Metric::lower("instances", "instances");
/// The host's MemAvailable before a density run (recorded, not tabled).
pub const BASELINE_AVAILABLE_MIB: Metric = Metric::higher("baseline_available_mib", "MiB");
/// Mean cost of `syscall(SYS_getppid)`.
pub const SYSCALL_NS: Metric = Metric::lower("syscall_ns", "ns");
/// Mean cost of fork + `_exit` + wait.
pub const FORK_US: Metric = Metric::lower("fork_us", "µs");
/// Mean cost of fork + exec + wait.
pub const EXEC_US: Metric = Metric::lower("exec_us", "µs");
/// fio 4 KiB random reads per second.
pub const RANDREAD_4K_IOPS: Metric = Metric::higher("randread_4k_iops", "IOPS");
/// fio 1 MiB sequential read bandwidth.
pub const SEQREAD_1M_MIB_S: Metric = Metric::higher("seqread_1m_mib_s", "MiB/s");
/// iperf3, one TCP stream, host sends to the box (Gbit/s arriving).
pub const TCP_TO_BOX_GBIT_S: Metric = Metric::higher("tcp_to_box_gbit_s", "Gbit/s");
/// iperf3 `-R`, one TCP stream, the box sends to the host (Gbit/s arriving).
pub const TCP_FROM_BOX_GBIT_S: Metric = Metric::higher("tcp_from_box_gbit_s", "Gbit/s");
/// TCP request/response transactions per second (1-byte messages, one connection).
pub const TCP_RR_PER_S: Metric = Metric::higher("tcp_rr_per_s", "transactions/s");
/// Median TCP request/response round trip.
pub const TCP_RR_P50_US: Metric = Metric::lower("tcp_rr_p50_us", "µs");
/// 99th percentile TCP request/response round trip.
pub const TCP_RR_P99_US: Metric = Metric::lower("tcp_rr_p99_us", "µs");

/// All of them (tests check that keys are unique).
pub const ALL: [Metric; 21] = [
    TO_TORN_DOWN_MS,
    TO_WORKLOAD_EXITED_MS,
    HOST_MEMORY_MIB,
    RUNTIME_RSS_MIB,
    RUNTIME_PSS_MIB,
    EVENTS_PER_S,
    MIB_PER_S,
    MIB_PER_INSTANCE,
    MEMFREE_MIB_PER_INSTANCE,
    INSTANCES,
    BASELINE_AVAILABLE_MIB,
    SYSCALL_NS,
    FORK_US,
    EXEC_US,
    RANDREAD_4K_IOPS,
    SEQREAD_1M_MIB_S,
    TCP_TO_BOX_GBIT_S,
    TCP_FROM_BOX_GBIT_S,
    TCP_RR_PER_S,
    TCP_RR_P50_US,
    TCP_RR_P99_US,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_snake_case_with_their_unit() {
        for (i, m) in ALL.iter().enumerate() {
            assert!(
                ALL[i + 1..].iter().all(|o| o.key != m.key),
                "{} twice",
                m.key
            );
            assert!(
                m.key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                m.key
            );
            assert!(!m.unit.is_empty(), "{} has no unit", m.key);
        }
    }

    #[test]
    fn stored_form_matches() {
        let d = EVENTS_PER_S.def();
        assert_eq!(
            (d.key.as_str(), d.unit.as_str(), d.higher_is_better),
            ("events_per_s", "events/s", true)
        );
    }
}
