//! The twinbox microVM monitor (see docs/ARCHITECTURE.md).

pub mod smoke;
