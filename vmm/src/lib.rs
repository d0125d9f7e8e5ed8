//! The twinbox microVM monitor (see docs/ARCHITECTURE.md).

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod mptable;
pub mod regs;
pub mod smoke;
pub mod vcpu;
