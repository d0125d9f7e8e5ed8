//! The twinbox container (see docs/ARCHITECTURE.md).
