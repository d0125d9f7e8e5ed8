//! Init's markers → a timeline and an outcome: the one interpreter both boxes use, so a
//! marker means the same thing whichever transport (I/O port or pipe) carried it.
//!
//! Decided rules, the same in both boxes:
//! - the first `WorkloadExited` marker is the workload's status (`Exited` / `Signaled`);
//!   later ones are ignored (init sends one; a second can only come from a confused guest);
//! - `InitFailed(errno)` without a workload exit is the box's failure: `Outcome::Failed`
//!   naming the errno, never a made-up exit status;
//! - without either, the box says why it ended (`finish`'s argument) and the last phase
//!   reached is appended, so a reader knows how far the run got;
//! - a malformed marker is never fatal: it is counted and becomes a note of the report.

use crate::phase::{Phase, Timeline};
use crate::report::Outcome;
use twinbox_proto::{ExitCode, Marker, MarkerError};

/// What init reported so far, stamped with the host clock as each marker arrived.
#[derive(Clone, Debug)]
pub struct MarkerLog {
    timeline: Timeline,
    exit: Option<ExitCode>,
    init_failed: Option<u32>,
    malformed: Vec<u32>,
    /// Bytes of a marker not complete yet (byte-stream transports).
    partial: Vec<u8>,
}

/// What a finished run reports, from its markers and the box's own account of its end.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    /// Every phase init reported, plus the host's own stamps.
    pub timeline: Timeline,
    /// How the workload (or the box) ended.
    pub outcome: Outcome,
    /// Facts for the report's reader (malformed markers).
    pub notes: Vec<String>,
}

/// At most this many malformed values are kept for the note; the count is exact.
const MALFORMED_SHOWN: usize = 4;

impl MarkerLog {
    /// An empty log for a run spawned at `spawn_ns`.
    pub fn new(spawn_ns: u64) -> Self {
        Self {
            timeline: Timeline::starting_at(spawn_ns),
            exit: None,
            init_failed: None,
            malformed: Vec::new(),
            partial: Vec::new(),
        }
    }

    /// Records one decoded (or undecodable) marker that arrived at `now_ns`.
    pub fn record(&mut self, marker: Result<Marker, MarkerError>, now_ns: u64) {
        match marker {
            Ok(marker) => {
                if let Some(phase) = Phase::from_marker(marker.phase()) {
                    self.timeline.record(phase, now_ns);
                }
                match marker {
                    Marker::WorkloadExited(code) => self.exit = self.exit.or(Some(code)),
                    Marker::InitFailed(errno) => {
                        self.init_failed = self.init_failed.or(Some(errno))
                    }
                    Marker::InitStarted | Marker::WorkloadStarted => {}
                }
            }
            Err(MarkerError(value)) => self.malformed.push(value),
        }
    }

    /// Feeds bytes of a stream transport (the container's pipe: little-endian `u32`s) that
    /// arrived at `now_ns`; a marker split across reads is completed by the next call.
    pub fn feed(&mut self, bytes: &[u8], now_ns: u64) {
        self.partial.extend_from_slice(bytes);
        let whole = self.partial.len() / 4 * 4;
        let words: Vec<u32> = self.partial[..whole]
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        self.partial.drain(..whole);
        for word in words {
            self.record(Marker::decode(word), now_ns);
        }
    }

    /// The timeline so far.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// The timeline, for the host's own stamps (sandbox ready, guest entry, torn down).
    pub fn timeline_mut(&mut self) -> &mut Timeline {
        &mut self.timeline
    }

    /// The workload's exit status, once reported.
    pub fn exit(&self) -> Option<ExitCode> {
        self.exit
    }

    /// Init's failure errno, if it reported one.
    pub fn init_failed(&self) -> Option<u32> {
        self.init_failed
    }

    /// The last phase the run reached so far. `TornDown` is the host's own end stamp, not
    /// progress of the run, so it never counts (a box may stamp it before `finish`).
    pub fn last_phase(&self) -> Phase {
        self.timeline
            .stamps
            .iter()
            .map(|s| s.phase)
            .filter(|phase| *phase != Phase::TornDown)
            .max()
            .unwrap_or(Phase::Spawn)
    }

    /// Ends the log. `box_end` is the box's account of why it ended when the workload did
    /// not report an exit (e.g. "time limit of 30.0 s reached", "the guest reset").
    pub fn finish(self, box_end: impl FnOnce() -> String) -> Finished {
        let mut notes = Vec::new();
        if !self.malformed.is_empty() {
            let shown: Vec<String> = self
                .malformed
                .iter()
                .take(MALFORMED_SHOWN)
                .map(|v| format!("{v:#010x}"))
                .collect();
            notes.push(format!(
                "init sent {} malformed phase marker(s) ({}); they were ignored",
                self.malformed.len(),
                shown.join(", ")
            ));
        }
        if !self.partial.is_empty() {
            notes.push(format!(
                "the marker channel closed in the middle of a marker ({} stray byte(s))",
                self.partial.len()
            ));
        }
        let outcome = match (self.exit, self.init_failed) {
            (Some(code), _) => Outcome::from(code),
            (None, Some(errno)) => Outcome::Failed(format!(
                "twinbox-init failed before the workload could run (errno {errno}: {})",
                std::io::Error::from_raw_os_error(errno as i32)
            )),
            (None, None) => Outcome::Failed(format!(
                "{} (last phase reached: {})",
                box_end(),
                self.last_phase().name()
            )),
        };
        Finished {
            timeline: self.timeline,
            outcome,
            notes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(markers: &[Marker]) -> MarkerLog {
        let mut log = MarkerLog::new(100);
        for (i, m) in markers.iter().enumerate() {
            log.record(Ok(*m), 200 + i as u64);
        }
        log
    }

    #[test]
    fn workload_exit_is_the_outcome_and_phases_are_stamped() {
        let log = log_of(&[
            Marker::InitStarted,
            Marker::WorkloadStarted,
            Marker::WorkloadExited(ExitCode::Exited(3)),
        ]);
        let done = log.finish(|| unreachable!("the workload reported its exit"));
        assert_eq!(done.outcome, Outcome::Exited(3));
        assert_eq!(done.timeline.get(Phase::InitStarted), Some(200));
        assert_eq!(done.timeline.get(Phase::WorkloadExited), Some(202));
        assert!(done.notes.is_empty());
    }

    #[test]
    fn the_first_exit_wins() {
        let log = log_of(&[
            Marker::WorkloadExited(ExitCode::Signaled(9)),
            Marker::WorkloadExited(ExitCode::Exited(0)),
        ]);
        assert_eq!(log.finish(String::new).outcome, Outcome::Signaled(9));
    }

    #[test]
    fn init_failure_is_a_failed_box_in_both_boxes() {
        let log = log_of(&[Marker::InitStarted, Marker::InitFailed(2)]);
        let done = log.finish(|| "init exited".into());
        match done.outcome {
            Outcome::Failed(why) => {
                assert!(why.contains("twinbox-init failed"), "{why}");
                assert!(why.contains("errno 2"), "{why}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn without_markers_the_box_end_and_last_phase_are_reported() {
        let mut log = log_of(&[Marker::InitStarted]);
        log.timeline_mut().record(Phase::TornDown, 900);
        assert_eq!(
            log.finish(|| "time limit of 1.0 s reached".into()).outcome,
            Outcome::Failed(
                "time limit of 1.0 s reached (last phase reached: init_started)".into()
            )
        );
        assert_eq!(
            MarkerLog::new(1)
                .finish(|| "the guest reset".into())
                .outcome,
            Outcome::Failed("the guest reset (last phase reached: spawn)".into())
        );
    }

    #[test]
    fn malformed_markers_become_one_note() {
        let mut log = log_of(&[Marker::WorkloadExited(ExitCode::Exited(0))]);
        for v in [0xdead_beef, 0xffff_ffff, 7, 8, 9] {
            log.record(Err(MarkerError(v)), 300);
        }
        let done = log.finish(String::new);
        assert_eq!(done.outcome, Outcome::Exited(0));
        assert_eq!(done.notes.len(), 1);
        assert!(
            done.notes[0].starts_with("init sent 5 malformed"),
            "{}",
            done.notes[0]
        );
        assert!(done.notes[0].contains("0xdeadbeef"), "{}", done.notes[0]);
    }

    #[test]
    fn a_stream_may_split_markers_anywhere() {
        let bytes: Vec<u8> = [
            Marker::InitStarted,
            Marker::WorkloadStarted,
            Marker::WorkloadExited(ExitCode::Exited(42)),
        ]
        .iter()
        .flat_map(|m| m.encode().to_le_bytes())
        .collect();
        let mut log = MarkerLog::new(0);
        log.feed(&bytes[..3], 10);
        assert_eq!(log.last_phase(), Phase::Spawn);
        log.feed(&bytes[3..9], 20);
        assert_eq!(log.timeline().get(Phase::InitStarted), Some(20));
        log.feed(&bytes[9..], 30);
        assert_eq!(log.exit(), Some(ExitCode::Exited(42)));
        assert_eq!(log.finish(String::new).outcome, Outcome::Exited(42));
    }

    #[test]
    fn a_torn_final_marker_is_noted() {
        let mut log = MarkerLog::new(0);
        log.feed(&[1, 2], 5);
        let done = log.finish(|| "init exited".into());
        assert!(
            done.notes.iter().any(|n| n.contains("2 stray byte")),
            "{:?}",
            done.notes
        );
    }
}
