//! What a killed twinbox leaves behind, removed at the start of the next container run.
//!
//! Everything else of a run dies with its owner: the container's init has SIGKILL as its
//! parent-death signal (`child.rs`), its mounts live in its own mount namespace, the loop
//! device clears itself and detached mounts unmount when their fd closes, and the staging
//! tmpfs goes over one directory shared by every run, inside the run's mount namespace.
//! What is named on the host and outlives a SIGKILL of the CLI are the run's cgroups (one
//! per controller hierarchy; earlier versions also made a staging directory per run, which
//! the sweep still removes). Their naming,
//! `twinbox-<pid>-<start>-<pidns>-<n>`, and the sweep of dead owners' names live in
//! `twinbox_spec::cgroup_run` (with their tests), because the VMM names its own cgroup the
//! same way: a container start also sweeps what a killed `twinbox vm run` left, and the
//! other way round.

pub use twinbox_spec::cgroup_run::{
    next_run_name, owner_of, pid_namespace, run_name, start_time, sweep, Owner, Places, Swept,
    STAGING_ROOT,
};
