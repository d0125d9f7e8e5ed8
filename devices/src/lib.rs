//! Emulated devices of the twinbox microVM (see docs/ARCHITECTURE.md).
