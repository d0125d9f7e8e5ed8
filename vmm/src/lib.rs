//! The twinbox microVM monitor (see docs/ARCHITECTURE.md).

pub mod boot;
pub mod console;
pub mod cpuid;
pub mod event_loop;
pub mod interrupt;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod mptable;
pub mod regs;
pub mod rootfs;
pub mod smoke;
pub mod usage;
pub mod vcpu;
