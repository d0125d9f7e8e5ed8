//! The container's seccomp profile (filled in by the lockdown work of issue 10).
