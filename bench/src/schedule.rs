//! The order of runs: boxes interleaved round by round (A B C A B C ...), so that slow
//! drifts of the host (thermal, other load) hit every box alike; the first `warmup` rounds
//! are run but not counted.

/// One run to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Index into the list of boxes.
    pub box_index: usize,
    /// Round number, counting warm-up rounds (0-based).
    pub round: u32,
    /// A warm-up run: done, stored, never summarised.
    pub warmup: bool,
}

/// All slots of one scenario: `warmup + runs` rounds, each visiting every box in order.
pub fn interleave(boxes: usize, warmup: u32, runs: u32) -> Vec<Slot> {
    (0..warmup + runs)
        .flat_map(|round| {
            (0..boxes).map(move |box_index| Slot {
                box_index,
                round,
                warmup: round < warmup,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_interleave_boxes_and_warmup_comes_first() {
        let slots = interleave(3, 1, 2);
        let order: Vec<(usize, u32, bool)> = slots
            .iter()
            .map(|s| (s.box_index, s.round, s.warmup))
            .collect();
        assert_eq!(
            order,
            vec![
                (0, 0, true),
                (1, 0, true),
                (2, 0, true),
                (0, 1, false),
                (1, 1, false),
                (2, 1, false),
                (0, 2, false),
                (1, 2, false),
                (2, 2, false),
            ]
        );
    }

    #[test]
    fn no_boxes_or_runs_means_nothing_to_do() {
        assert!(interleave(0, 1, 5).is_empty());
        assert!(interleave(2, 0, 0).is_empty());
        assert_eq!(interleave(1, 0, 3).iter().filter(|s| s.warmup).count(), 0);
    }
}
