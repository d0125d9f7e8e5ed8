//! The KVM side of a VM: opening /dev/kvm, the VM with its local APICs in the kernel (a
//! split irqchip: the IOAPIC is emulated in the VMM, `ioapic.rs`; no PIC, no PIT), and
//! vCPUs with their CPUID and boot registers.

use crate::cpuid::{self, Profile};
use crate::ioapic;
use crate::layout::KVM_TSS_ADDRESS;
use crate::regs::{self, EntryMode};
use kvm_bindings::{kvm_enable_cap, KVM_CAP_SPLIT_IRQCHIP};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use thiserror::Error;

/// Why the VM could not be created.
#[derive(Debug, Error)]
pub enum MachineError {
    #[error("/dev/kvm does not exist — this host has no KVM (load kvm_intel/kvm_amd, or run in the lab)")]
    NoKvm,
    #[error("/dev/kvm: permission denied — run as root or add yourself to the kvm group")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the stable version 12")]
    ApiVersion(i32),
    #[error("this host's KVM lacks the split irqchip (KVM_CAP_SPLIT_IRQCHIP, Linux 4.4 and later), which twinbox's VMM needs")]
    NoSplitIrqchip,
    #[error("{vcpus} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus { vcpus: u32, max: usize },
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error("vCPU {vcpu}: {source}")]
    Regs { vcpu: u32, source: regs::RegsError },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Kvm { what, source }
}

/// Opens /dev/kvm with a message a user can act on when that fails.
pub fn open_kvm() -> Result<Kvm, MachineError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => MachineError::NoKvm,
        libc::EACCES | libc::EPERM => MachineError::KvmPermission,
        _ => MachineError::KvmOpen(e),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(MachineError::ApiVersion(version));
    }
    Ok(kvm)
}

/// Checks `vcpus` against what this host's KVM allows.
pub fn check_vcpus(kvm: &Kvm, vcpus: u32) -> Result<(), MachineError> {
    let max = kvm.get_max_vcpus();
    if vcpus as usize > max {
        return Err(MachineError::TooManyVcpus { vcpus, max });
    }
    Ok(())
}

/// Creates the VM with a split irqchip: local APICs in the kernel, the IOAPIC in the VMM.
///
/// No PIC and no PIT: a guest with the TSC-deadline timer and a known TSC frequency (the
/// CPUID of `cpuid.rs`, kvm-clock) needs neither, and each would cost the destroy of
/// every VM milliseconds of kernel grace periods (see `ioapic.rs`). Linux finds no PIC
/// (its probe reads back all ones) and routes every interrupt through the IOAPIC.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, MachineError> {
    if !kvm.check_extension(Cap::SplitIrqchip) {
        return Err(MachineError::NoSplitIrqchip);
    }
    let vm = kvm.create_vm().map_err(kvm_err("VM creation"))?;
    // Intel VT-x needs three pages for the real-mode TSS; other backends ignore it.
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("TSS address"))?;
    // Before any vCPU exists. args[0]: the GSIs 0..N whose routes are the IOAPIC's pins
    // (KVM asks userspace for their EOIs when level-triggered).
    let mut split = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    split.args[0] = ioapic::NUM_PINS as u64;
    vm.enable_cap(&split).map_err(kvm_err("split irqchip"))?;
    Ok(vm)
}

/// How the boot vCPU enters the guest.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    /// Entry protocol.
    pub mode: EntryMode,
    /// Entry address.
    pub rip: u64,
    /// The protocol's pointer (start_info / zero page).
    pub boot_info: u64,
}

/// Creates `count` vCPUs with CPUID for `profile`; vCPU 0 starts at `entry`.
pub fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    count: u32,
    profile: Profile,
    entry: BootEntry,
) -> Result<Vec<VcpuFd>, MachineError> {
    let supported = cpuid::supported(kvm)?;
    (0..count)
        .map(|id| {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("vCPU creation"))?;
            vcpu.set_cpuid2(&cpuid::for_vcpu(&supported, id, count, profile))
                .map_err(kvm_err("CPUID setup"))?;
            let boot = (id == 0).then_some((entry.rip, entry.boot_info));
            regs::setup_vcpu(&vcpu, entry.mode, boot)
                .map_err(|source| MachineError::Regs { vcpu: id, source })?;
            Ok(vcpu)
        })
        .collect()
}

/// Whether KVM supports `cap` (used for the irqfd/ioeventfd that virtio needs).
pub fn has_cap(kvm: &Kvm, cap: Cap) -> bool {
    kvm.check_extension(cap)
}
