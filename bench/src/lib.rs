//! twinbox bench (see docs/ARCHITECTURE.md).
