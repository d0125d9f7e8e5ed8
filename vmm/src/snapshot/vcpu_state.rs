//! One vCPU's state out of KVM and back, in the order KVM needs.
//!
//! Saving: first a KVM_RUN with `immediate_exit` set, which completes an I/O instruction
//! the vCPU exited for (its result would otherwise be lost) without entering the guest;
//! then every piece. Restoring (after CPUID): MP state, registers, segments, XSAVE, XCRs,
//! debug registers, the local APIC, MSRs (the TSC before the TSC deadline, which is
//! relative to it), and the pending events last.
//!
//! One field is not written back as read: on AMD (KVM's SVM code) the task register's
//! type, which KVM reports busy whatever the CPU holds; see [`tr_as_the_cpu_had_it`].

use super::format::VcpuState;
use kvm_bindings::{kvm_msr_entry, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

/// IA32_TIME_STAMP_COUNTER.
const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: set after the TSC, which it is compared with.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Most MSRs in one KVM_GET/SET_MSRS.
const MSR_CHUNK: usize = 64;
/// Segment type of an available 64-bit TSS (a 32-bit one outside long mode).
const TSS_AVAILABLE: u8 = 0x9;
/// The busy bit of a TSS descriptor's type (type 11: a busy TSS).
const TSS_BUSY: u8 = 0x2;
/// EFER.LMA: long mode active.
const EFER_LMA: u64 = 1 << 10;

/// Why a vCPU's state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("vCPU {vcpu}: {what}: {source}")]
pub struct VcpuStateError {
    pub vcpu: u32,
    pub what: &'static str,
    pub source: kvm_ioctls::Error,
}

fn err(vcpu: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError { vcpu, what, source }
}

/// Reads the state of a paused vCPU. `msr_list`: KVM_GET_MSR_INDEX_LIST.
pub fn save(vcpu: &mut VcpuFd, id: u32, msr_list: &[u32]) -> Result<VcpuState, VcpuStateError> {
    // Completes a pending PIO/MMIO instruction; returns EINTR at once.
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
    Ok(VcpuState {
        mp_state: vcpu.get_mp_state().map_err(err(id, "MP state"))?,
        regs: vcpu.get_regs().map_err(err(id, "registers"))?,
        sregs: vcpu.get_sregs().map_err(err(id, "segment registers"))?,
        xsave: vcpu.get_xsave().map_err(err(id, "XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(err(id, "XCRs"))?,
        debug_regs: vcpu.get_debug_regs().map_err(err(id, "debug registers"))?,
        lapic: vcpu.get_lapic().map_err(err(id, "local APIC"))?,
        events: vcpu.get_vcpu_events().map_err(err(id, "vCPU events"))?,
        msrs: read_msrs(vcpu, id, msr_list)?,
        tsc_khz: vcpu.get_tsc_khz().ok(),
    })
}

/// Every MSR of `list` KVM reads; one it refuses (KVM lists some a given CPU lacks) is
/// left out, as Firecracker does.
fn read_msrs(vcpu: &VcpuFd, id: u32, list: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("at most MSR_CHUNK entries");
        let read = vcpu.get_msrs(&mut msrs).map_err(err(id, "MSRs"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it refuses: skip that one and go on after it.
        let done = (read + 1).min(chunk.len());
        rest = &rest[done..];
    }
    Ok(out)
}

/// Puts a saved state into a new vCPU (CPUID already set). `ahead_ns`: how far the
/// guest's TSC is moved on, so that its clocks are not behind the host's after the pause.
pub fn restore(
    vcpu: &VcpuFd,
    id: u32,
    state: &VcpuState,
    ahead_ns: u64,
) -> Result<(), VcpuStateError> {
    if let Some(khz) = state.tsc_khz {
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            // Without TSC scaling the guest would see another frequency than it measured;
            // refused by KVM then, and the guest's clock drifts rather than fails.
            if let Err(e) = vcpu.set_tsc_khz(khz) {
                tracing::warn!("vCPU {id}: cannot set the TSC to {khz} kHz: {e}");
            }
        }
    }
    vcpu.set_mp_state(state.mp_state)
        .map_err(err(id, "MP state"))?;
    vcpu.set_regs(&state.regs).map_err(err(id, "registers"))?;
    let sregs = tr_as_the_cpu_had_it(&state.sregs, host_kvm_is_svm());
    vcpu.set_sregs(&sregs)
        .map_err(err(id, "segment registers"))?;
    // SAFETY: a kvm_xsave of the size KVM_GET_XSAVE returns (4 KiB); the vCPU was given
    // the same CPUID (checked by digest), so KVM sized the area alike.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(err(id, "XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(err(id, "XCRs"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(err(id, "debug registers"))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(err(id, "local APIC"))?;
    write_msrs(vcpu, id, &ordered_msrs(state, ahead_ns))?;
    vcpu.set_vcpu_events(&state.events)
        .map_err(err(id, "vCPU events"))?;
    Ok(())
}

/// The segment registers to write back. On an SVM host the task register's busy bit is
/// taken off again: KVM's `svm_get_segment` sets it on every read of TR ("the busy flag
/// in the tr selector isn't exposed"), so KVM_GET_SREGS says type 11 while the CPU's
/// hidden TR held type 9, and writing 11 back puts into the VMCB what the CPU never had.
/// AMD hardware ignores TR's type for the I/O permission bitmap, but a CPU that checks it
/// — QEMU's software CPU requires type 9 (`helper_check_io`), which is how the lab runs
/// KVM — then refuses every user-mode `in`/`out` the TSS bitmap grants with a #GP. On VMX
/// hosts TR stays busy: VM entry requires a busy TSS in IA-32e mode.
fn tr_as_the_cpu_had_it(saved: &kvm_sregs, svm: bool) -> kvm_sregs {
    let mut sregs = *saved;
    let long_mode = saved.efer & EFER_LMA != 0;
    if svm && long_mode && saved.tr.present != 0 && saved.tr.type_ == TSS_AVAILABLE | TSS_BUSY {
        sregs.tr.type_ = TSS_AVAILABLE;
    }
    sregs
}

/// Whether this host's KVM runs guests with AMD's SVM: KVM picks its vendor module by the
/// CPU's vendor (AMD and Hygon: kvm_amd).
fn host_kvm_is_svm() -> bool {
    let leaf0 = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
}

/// The saved MSRs to write: the TSC moved on by `ahead_ns` and first, the TSC deadline
/// last.
fn ordered_msrs(state: &VcpuState, ahead_ns: u64) -> Vec<(u32, u64)> {
    let ticks = state.tsc_khz.map_or(0, |khz| {
        (u128::from(ahead_ns) * u128::from(khz) / 1_000_000) as u64
    });
    let mut msrs: Vec<(u32, u64)> = state
        .msrs
        .iter()
        .map(|&(index, data)| match index {
            MSR_IA32_TSC => (index, data.wrapping_add(ticks)),
            _ => (index, data),
        })
        .collect();
    msrs.sort_by_key(|&(index, _)| match index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    msrs
}

fn write_msrs(vcpu: &VcpuFd, id: u32, msrs: &[(u32, u64)]) -> Result<(), VcpuStateError> {
    for chunk in msrs.chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).expect("at most MSR_CHUNK entries");
        let written = vcpu.set_msrs(&msrs).map_err(err(id, "MSRs"))?;
        if written != chunk.len() {
            return Err(VcpuStateError {
                vcpu: id,
                what: "MSRs",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_mode_sregs_with_tr_type(type_: u8) -> kvm_sregs {
        let mut sregs = kvm_sregs {
            efer: EFER_LMA | (1 << 8),
            ..Default::default()
        };
        sregs.tr.type_ = type_;
        sregs.tr.present = 1;
        sregs.tr.selector = 0x40;
        sregs
    }

    #[test]
    fn svm_gets_back_the_available_tss_kvm_reported_busy() {
        let saved = long_mode_sregs_with_tr_type(11);
        let written = tr_as_the_cpu_had_it(&saved, true);
        assert_eq!(written.tr.type_, 9);
        // Nothing else moves.
        let mut expected = saved;
        expected.tr.type_ = 9;
        assert_eq!(written, expected);
    }

    #[test]
    fn vmx_keeps_the_busy_tss_its_vm_entry_requires() {
        let saved = long_mode_sregs_with_tr_type(11);
        assert_eq!(tr_as_the_cpu_had_it(&saved, false), saved);
    }

    #[test]
    fn only_a_present_busy_tss_in_long_mode_changes() {
        let mut not_present = long_mode_sregs_with_tr_type(11);
        not_present.tr.present = 0;
        assert_eq!(tr_as_the_cpu_had_it(&not_present, true), not_present);
        let mut legacy = long_mode_sregs_with_tr_type(11);
        legacy.efer = 0;
        assert_eq!(tr_as_the_cpu_had_it(&legacy, true), legacy);
        let other = long_mode_sregs_with_tr_type(3);
        assert_eq!(tr_as_the_cpu_had_it(&other, true), other);
    }

    #[test]
    fn the_tsc_moves_on_by_the_pause_and_comes_before_its_deadline() {
        let state = VcpuState {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            events: Default::default(),
            msrs: vec![(MSR_IA32_TSC_DEADLINE, 5), (0x174, 1), (MSR_IA32_TSC, 1000)],
            tsc_khz: Some(2_000_000),
        };
        // 1.5 s at 2 GHz: 3e9 ticks.
        let msrs = ordered_msrs(&state, 1_500_000_000);
        assert_eq!(
            msrs,
            vec![
                (MSR_IA32_TSC, 3_000_001_000),
                (0x174, 1),
                (MSR_IA32_TSC_DEADLINE, 5)
            ]
        );
    }
}
