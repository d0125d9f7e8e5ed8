//! The CPUID each vCPU sees: what KVM supports, with per-vCPU APIC IDs and topology, the
//! hypervisor bit, and (on PVM hosts) the features PVM's kernel-mode emulator cannot run
//! hidden so the guest kernel never uses them.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use thiserror::Error;

/// Why CPUID could not be prepared.
#[derive(Debug, Error)]
#[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
pub struct CpuidError(#[from] kvm_ioctls::Error);

/// Which feature set the guest gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Everything KVM supports (hardware virtualization).
    Host,
    /// KVM served by PVM: hide instructions its CPL0 emulator fails on and the paravirt
    /// features that make the kernel issue hypercalls (which never return there).
    Pvm,
}

// Leaf 1 ECX.
const L1_ECX_MONITOR: u32 = 1 << 3;
const L1_ECX_FMA: u32 = 1 << 12;
const L1_ECX_CX16: u32 = 1 << 13;
const L1_ECX_POPCNT: u32 = 1 << 23;
const L1_ECX_XSAVE: u32 = 1 << 26;
const L1_ECX_OSXSAVE: u32 = 1 << 27;
const L1_ECX_AVX: u32 = 1 << 28;
const L1_ECX_F16C: u32 = 1 << 29;
/// Leaf 1 ECX bit 31: "running under a hypervisor".
pub const L1_ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX.
const L1_EDX_HTT: u32 = 1 << 28;
// Leaf 7 subleaf 0 EBX.
const L7_EBX_AVX2: u32 = 1 << 5;
const L7_EBX_INVPCID: u32 = 1 << 10;
/// AVX-512 F, DQ, IFMA, PF, ER, CD, BW, VL.
const L7_EBX_AVX512: u32 =
    (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
// Leaf 0x8000_0001.
const LX1_ECX_ABM: u32 = 1 << 5;
const LX1_EDX_RDTSCP: u32 = 1 << 27;
/// KVM paravirt features kept on PVM: clocksource (MSR based, no hypercall), the second
/// clocksource MSRs, and the stable-clock hint. Everything else (PV unhalt, PV TLB flush,
/// PV IPIs, async PF, steal time, PV EOI, sched yield...) is dropped.
const KVM_FEATURES_KEPT_ON_PVM: u32 = (1 << 0) | (1 << 3) | (1 << 24);

/// The CPUID KVM supports on this host.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    Ok(kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)
}

/// Bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Adjusts one entry for vCPU `id` of `count` (one socket, `count` cores, 1 thread each).
pub fn normalize_entry(entry: &mut kvm_cpuid_entry2, id: u32, count: u32, profile: Profile) {
    match entry.function {
        0x1 => {
            // EBX: [31:24] initial APIC ID, [23:16] logical processors per package,
            // [15:8] CLFLUSH line size in qwords (8 = 64 bytes).
            entry.ebx = (id << 24) | (count.min(255) << 16) | (8 << 8) | (entry.ebx & 0xff);
            entry.ecx |= L1_ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= L1_EDX_HTT;
            } else {
                entry.edx &= !L1_EDX_HTT;
            }
            if profile == Profile::Pvm {
                entry.ecx &= !(L1_ECX_MONITOR
                    | L1_ECX_CX16
                    | L1_ECX_POPCNT
                    | L1_ECX_XSAVE
                    | L1_ECX_OSXSAVE
                    | L1_ECX_AVX
                    | L1_ECX_FMA
                    | L1_ECX_F16C);
            }
        }
        0x4 => {
            // EAX [31:26]: cores per package - 1; [25:14]: threads sharing this cache - 1.
            let cores = count.clamp(1, 64) - 1;
            entry.eax = (entry.eax & 0x3fff) | (cores << 26);
        }
        0x7 if entry.index == 0 && profile == Profile::Pvm => {
            entry.ebx &= !(L7_EBX_AVX2 | L7_EBX_INVPCID | L7_EBX_AVX512);
            // ECX/EDX hold AVX-512 extensions, VAES, AMX...: none of them is usable.
            entry.ecx = 0;
            entry.edx = 0;
        }
        0xb | 0x1f => {
            // Extended topology: level 0 = SMT (1 thread per core), level 1 = core.
            entry.edx = id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                1 => {
                    entry.eax = id_bits(count);
                    entry.ebx = count;
                    entry.ecx = (2 << 8) | 1;
                }
                n => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = n;
                }
            }
        }
        0x4000_0001 if profile == Profile::Pvm => {
            entry.eax &= KVM_FEATURES_KEPT_ON_PVM;
        }
        0x8000_0001 if profile == Profile::Pvm => {
            entry.ecx &= !LX1_ECX_ABM;
            entry.edx &= !LX1_EDX_RDTSCP;
        }
        _ => {}
    }
}

/// The CPUID table for vCPU `id` of `count`.
pub fn for_vcpu(supported: &CpuId, id: u32, count: u32, profile: Profile) -> CpuId {
    let entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        // The XSAVE state leaf describes state the PVM guest must not use.
        .filter(|e| !(profile == Profile::Pvm && e.function == 0xd))
        .map(|e| {
            let mut e = *e;
            normalize_entry(&mut e, id, count, profile);
            e
        })
        .collect();
    CpuId::from_entries(&entries).expect("fewer entries than KVM returned")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = entry(1, 0);
        e.ecx = 0;
        normalize_entry(&mut e, 3, 4, Profile::Host);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & L1_ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & L1_EDX_HTT, 0);
    }

    #[test]
    fn pvm_profile_hides_what_the_emulator_cannot_run() {
        let mut e = entry(1, 0);
        normalize_entry(&mut e, 0, 1, Profile::Pvm);
        for bit in [3, 13, 23, 26, 27, 28] {
            assert_eq!(e.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_eq!(e.edx & L1_EDX_HTT, 0);
        let mut e = entry(7, 0);
        normalize_entry(&mut e, 0, 1, Profile::Pvm);
        assert_eq!(e.ebx & (1 << 10), 0);
        assert_eq!(e.ebx & (1 << 5), 0);
        let mut e = entry(0x8000_0001, 0);
        normalize_entry(&mut e, 0, 1, Profile::Pvm);
        assert_eq!(e.edx & (1 << 27), 0);
        let mut e = entry(0x4000_0001, 0);
        normalize_entry(&mut e, 0, 1, Profile::Pvm);
        assert_eq!(e.eax, 0x0100_0009);
    }

    #[test]
    fn host_profile_keeps_features() {
        let mut e = entry(7, 0);
        normalize_entry(&mut e, 0, 1, Profile::Host);
        assert_eq!(e.ebx, !0);
    }

    #[test]
    fn topology_leaf_numbers_cores() {
        let mut smt = entry(0xb, 0);
        normalize_entry(&mut smt, 2, 4, Profile::Host);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let mut core = entry(0xb, 1);
        normalize_entry(&mut core, 2, 4, Profile::Host);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
        let mut core = entry(0xb, 1);
        normalize_entry(&mut core, 0, 3, Profile::Host);
        assert_eq!(core.eax, 2);
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
