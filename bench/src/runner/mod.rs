//! The boxes a scenario runs in. Each takes the same [`RunSpec`] and returns a
//! [`RunReport`] with host-stamped phases, or a reason it could not run at all.

use twinbox_spec::{RunReport, RunSpec};

pub mod container;
pub mod native;
pub mod peer_qemu;
pub mod process;
pub mod vm;

/// One box.
pub trait Runner {
    /// The box's name as shown in tables (`native`, `container`, `vm`, `qemu-microvm`).
    fn name(&self) -> &str;
    /// Runs `spec` once. `Err` means the box could not run it at all; a run that ran but
    /// failed is an `Ok` report whose outcome says so.
    fn run(&self, spec: &RunSpec) -> Result<RunReport, String>;
}

/// The runner for a box name given on the command line.
pub fn by_name(name: &str) -> Option<Box<dyn Runner>> {
    match name {
        "native" => Some(Box::new(native::Native)),
        "container" => Some(Box::new(container::Container)),
        "vm" => Some(Box::new(vm::Vm)),
        _ => None,
    }
}
