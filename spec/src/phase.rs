//! Phases of one run and the host-stamped timeline that records them.

use serde::{Deserialize, Serialize};
use std::fmt;
use twinbox_proto::PhaseCode;

/// The phases of a run, in order (DESIGN.md "One run, as data").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The CLI (or bench driver) started the run.
    Spawn,
    /// VM built (memory, kernel loaded, devices) / namespaces and rootfs ready.
    SandboxReady,
    /// VM only, restored from a snapshot (in place of a kernel boot): every vCPU and
    /// device is back in its saved state, about to run.
    Restored,
    /// First KVM_RUN / exec of twinbox-init.
    GuestEntry,
    /// twinbox-init reported that it runs.
    InitStarted,
    /// twinbox-init is about to exec the workload.
    WorkloadStarted,
    /// The workload exited.
    WorkloadExited,
    /// Everything of the run was released (VMM gone / mounts, cgroup, loop device freed).
    TornDown,
}

impl Phase {
    /// The phases every run has, in order ([`Phase::Restored`] is only in a VM restored
    /// from a snapshot: see [`Phase::WITH_RESTORED`]).
    pub const ALL: [Phase; 7] = [
        Phase::Spawn,
        Phase::SandboxReady,
        Phase::GuestEntry,
        Phase::InitStarted,
        Phase::WorkloadStarted,
        Phase::WorkloadExited,
        Phase::TornDown,
    ];

    /// Every phase, in order, [`Phase::Restored`] included.
    pub const WITH_RESTORED: [Phase; 8] = [
        Phase::Spawn,
        Phase::SandboxReady,
        Phase::Restored,
        Phase::GuestEntry,
        Phase::InitStarted,
        Phase::WorkloadStarted,
        Phase::WorkloadExited,
        Phase::TornDown,
    ];

    /// The snake_case name used in JSON and in `--timings`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Spawn => "spawn",
            Phase::SandboxReady => "sandbox_ready",
            Phase::Restored => "restored",
            Phase::GuestEntry => "guest_entry",
            Phase::InitStarted => "init_started",
            Phase::WorkloadStarted => "workload_started",
            Phase::WorkloadExited => "workload_exited",
            Phase::TornDown => "torn_down",
        }
    }

    /// The phase a marker from init reports, if it reports one.
    pub fn from_marker(code: PhaseCode) -> Option<Phase> {
        match code {
            PhaseCode::InitStarted => Some(Phase::InitStarted),
            PhaseCode::WorkloadStarted => Some(Phase::WorkloadStarted),
            PhaseCode::WorkloadExited => Some(Phase::WorkloadExited),
            PhaseCode::InitFailed => None,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One host-stamped phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub phase: Phase,
    /// Host `CLOCK_MONOTONIC` in nanoseconds.
    pub at_ns: u64,
}

/// The phases a run reached, stamped by the host clock, in the order they happened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    pub stamps: Vec<Stamp>,
}

impl Timeline {
    /// A timeline that starts with `spawn` at the given host time.
    pub fn starting_at(spawn_ns: u64) -> Self {
        Self {
            stamps: vec![Stamp {
                phase: Phase::Spawn,
                at_ns: spawn_ns,
            }],
        }
    }

    /// Records `phase` at `at_ns`. A phase recorded twice keeps its first stamp (a guest
    /// that repeats a marker cannot move time backwards).
    pub fn record(&mut self, phase: Phase, at_ns: u64) {
        if self.get(phase).is_none() {
            self.stamps.push(Stamp { phase, at_ns });
        }
    }

    /// Records `phase` now.
    pub fn record_now(&mut self, phase: Phase) {
        self.record(phase, crate::clock::monotonic_ns());
    }

    /// The stamp of `phase`, if reached.
    pub fn get(&self, phase: Phase) -> Option<u64> {
        self.stamps
            .iter()
            .find(|s| s.phase == phase)
            .map(|s| s.at_ns)
    }

    /// Nanoseconds from `from` to `to`, if both were reached and in that order.
    pub fn between(&self, from: Phase, to: Phase) -> Option<u64> {
        self.get(to)?.checked_sub(self.get(from)?)
    }

    /// True when the reached phases are stamped in non-decreasing order of phase.
    pub fn is_ordered(&self) -> bool {
        let mut reached: Vec<Stamp> = self.stamps.clone();
        reached.sort_by_key(|s| s.phase);
        reached.windows(2).all(|w| w[0].at_ns <= w[1].at_ns)
    }

    /// A human table: each reached phase with the time since spawn and since the
    /// previous phase, in milliseconds.
    pub fn render(&self) -> String {
        let mut reached: Vec<Stamp> = self.stamps.clone();
        reached.sort_by_key(|s| s.phase);
        let start = reached.first().map_or(0, |s| s.at_ns);
        let mut out = String::new();
        let mut previous = start;
        for stamp in reached {
            out.push_str(&format!(
                "{:<17} {:>10.3} ms  (+{:.3} ms)\n",
                stamp.phase.name(),
                (stamp.at_ns.saturating_sub(start)) as f64 / 1e6,
                (stamp.at_ns.saturating_sub(previous)) as f64 / 1e6,
            ));
            previous = stamp.at_ns;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_stamp_wins_and_order_is_checked() {
        let mut t = Timeline::starting_at(100);
        t.record(Phase::SandboxReady, 150);
        t.record(Phase::InitStarted, 300);
        t.record(Phase::InitStarted, 10);
        assert_eq!(t.get(Phase::InitStarted), Some(300));
        assert_eq!(t.between(Phase::Spawn, Phase::InitStarted), Some(200));
        assert!(t.is_ordered());
        t.record(Phase::GuestEntry, 400);
        assert!(!t.is_ordered());
    }

    #[test]
    fn render_lists_phases_with_deltas() {
        let mut t = Timeline::starting_at(0);
        t.record(Phase::TornDown, 2_500_000);
        let text = t.render();
        assert!(text.contains("spawn"));
        assert!(text.contains("torn_down"));
        assert!(text.contains("2.500 ms"));
    }

    #[test]
    fn json_names_are_snake_case() {
        assert_eq!(
            serde_json::to_string(&Phase::WorkloadExited).unwrap(),
            "\"workload_exited\""
        );
        for phase in Phase::ALL {
            assert_eq!(
                serde_json::to_string(&phase).unwrap(),
                format!("\"{}\"", phase.name())
            );
        }
    }
}
