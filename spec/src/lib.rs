//! The shared vocabulary of twinbox: what a run is asked to do ([`RunSpec`]), what it
//! reports ([`RunReport`]), the phases it is timed by ([`Phase`], [`Timeline`]), and where
//! the built artifacts live ([`artifacts`]). Both boxes, the VM and the container, take a
//! `RunSpec` and return a `RunReport`: that symmetry is the product.

pub mod artifacts;
pub mod cgroup_run;
pub mod clock;
pub mod guest_cmdline;
pub mod host;
pub mod image;
pub mod interrupt;
pub mod lease_lock;
pub mod outcome;
pub mod phase;
pub mod report;
pub mod run_spec;
pub mod terminal;

pub use outcome::{Finished, MarkerLog};
pub use phase::{Phase, Timeline};
pub use report::{BoxKind, LinkInfo, Outcome, RunReport, Usage};
pub use run_spec::{DiskSpec, NetMode, RunSpec, SpecError, StdinMode, WorkloadUser};
pub use twinbox_proto as proto;
