//! What the host's KVM is, for tests that must decide where a VM runs.

use twinbox_spec::host::{self, KvmFlavor};

/// The flavour of this host's `/dev/kvm` (hardware, nested, PVM, absent, no access).
pub fn host_kvm() -> KvmFlavor {
    host::kvm_flavor()
}

/// Fails the test unless the host's `/dev/kvm` can run a guest at all; returns its flavour.
pub fn require_kvm(what: &str) -> KvmFlavor {
    let flavor = host_kvm();
    assert!(
        flavor.usable(),
        "{what} needs /dev/kvm: {}",
        flavor.describe()
    );
    flavor
}
