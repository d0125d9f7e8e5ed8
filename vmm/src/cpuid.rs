//! The CPUID each vCPU sees, normalised as Firecracker does so that a stock distribution
//! kernel sees a coherent machine: what KVM supports, plus the TSC-deadline timer KVM
//! emulates; one socket of `count` cores with one thread each, described alike by every
//! topology leaf (1, 4, 0xB/0x1F, AMD 0x8000_0008/0x8000_001D/0x8000_001E) with APIC ID =
//! vCPU index; no PMU, WAITPKG or PDCM (the VMM does not virtualise them); an XSAVE leaf
//! whose sizes match the state components left enabled. On PVM hosts the features PVM's
//! kernel-mode emulator cannot run are hidden as well, so the guest kernel never uses them.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};
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
/// Perfmon and debug capability (IA32_PERF_CAPABILITIES): part of the PMU, hidden.
const L1_ECX_PDCM: u32 = 1 << 15;
const L1_ECX_POPCNT: u32 = 1 << 23;
/// The LAPIC timer has a TSC-deadline mode: without it Linux calibrates the LAPIC timer
/// against another clock at every boot (~100 ms).
pub const L1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const L1_ECX_XSAVE: u32 = 1 << 26;
const L1_ECX_OSXSAVE: u32 = 1 << 27;
const L1_ECX_AVX: u32 = 1 << 28;
const L1_ECX_F16C: u32 = 1 << 29;
/// Leaf 1 ECX bit 31: "running under a hypervisor".
pub const L1_ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX.
const L1_EDX_HTT: u32 = 1 << 28;
// Leaf 7 subleaf 0.
const L7_EBX_AVX2: u32 = 1 << 5;
const L7_EBX_INVPCID: u32 = 1 << 10;
const L7_EBX_MPX: u32 = 1 << 14;
const L7_EBX_AVX512F: u32 = 1 << 16;
/// AVX-512 F, DQ, IFMA, PF, ER, CD, BW, VL.
const L7_EBX_AVX512: u32 =
    (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
/// UMONITOR/UMWAIT/TPAUSE: waits the VMM does not virtualise (Firecracker hides it too).
const L7_ECX_WAITPKG: u32 = 1 << 5;
const L7_ECX_PKU: u32 = 1 << 3;
const L7_EDX_AMX_TILE: u32 = 1 << 24;
// Leaf 0x8000_0001.
/// AMD: HTT counts cores, not threads ("core multi-processing legacy mode").
const LX1_ECX_CMP_LEGACY: u32 = 1 << 1;
const LX1_ECX_ABM: u32 = 1 << 5;
/// AMD: the topology extensions (leaves 0x8000_001D and 0x8000_001E).
const LX1_ECX_TOPOEXT: u32 = 1 << 22;
/// AMD core, northbridge and last-level-cache performance counters: the PMU, hidden.
const LX1_ECX_PERFCTR: u32 = (1 << 23) | (1 << 24) | (1 << 28);
const LX1_EDX_RDTSCP: u32 = 1 << 27;
/// KVM paravirt features kept on PVM: clocksource (MSR based, no hypercall), the second
/// clocksource MSRs, and the stable-clock hint. Everything else (PV unhalt, PV TLB flush,
/// PV IPIs, async PF, steal time, PV EOI, sched yield...) is dropped.
const KVM_FEATURES_KEPT_ON_PVM: u32 = (1 << 0) | (1 << 3) | (1 << 24);

/// XSAVE state components: x87 and SSE, which every XSAVE CPU has.
const XFEATURES_LEGACY: u64 = 0b11;
/// Size of the legacy region (512) plus the XSAVE header (64): the smallest XSAVE area.
const XSAVE_LEGACY_AND_HEADER: u32 = 576;
// XSAVE state components that depend on a CPUID feature (Linux's xsave_cpuid_features).
const XFEATURE_YMM: u64 = 1 << 2;
const XFEATURES_MPX: u64 = (1 << 3) | (1 << 4);
const XFEATURES_AVX512: u64 = (1 << 5) | (1 << 6) | (1 << 7);
const XFEATURE_PKRU: u64 = 1 << 9;
const XFEATURES_AMX: u64 = (1 << 17) | (1 << 18);
// Leaf 0xD subleaf 1 EAX.
const LD1_EAX_XSAVEC: u32 = 1 << 1;
const LD1_EAX_XSAVES: u32 = 1 << 3;
/// Leaf 0xD subleaf i ECX bit 1: component i is 64-byte aligned in the compacted format.
const LDI_ECX_ALIGN64: u32 = 1 << 1;

/// The CPUID KVM supports on this host: KVM_GET_SUPPORTED_CPUID, plus the TSC-deadline
/// timer, which KVM emulates but reports through a capability instead of the table.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        for entry in cpuid.as_mut_slice() {
            if entry.function == 1 {
                entry.ecx |= L1_ECX_TSC_DEADLINE;
            }
        }
    }
    Ok(cpuid)
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
    let count = count.max(1);
    match entry.function {
        0x1 => {
            // EBX: [31:24] initial APIC ID, [23:16] logical processors per package,
            // [15:8] CLFLUSH line size in qwords (8 = 64 bytes).
            entry.ebx = (id << 24) | (count.min(255) << 16) | (8 << 8) | (entry.ebx & 0xff);
            entry.ecx |= L1_ECX_HYPERVISOR;
            entry.ecx &= !L1_ECX_PDCM;
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
            // Intel deterministic cache parameters. EAX [31:26]: cores per package - 1;
            // [25:14]: logical processors sharing this cache - 1 — a core's own caches
            // (L1, L2) serve its one thread, the last level serves the whole package.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            let cores = count.min(64) - 1;
            entry.eax = (entry.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (cores << 26);
        }
        0x7 if entry.index == 0 => {
            entry.ecx &= !L7_ECX_WAITPKG;
            if profile == Profile::Pvm {
                entry.ebx &= !(L7_EBX_AVX2 | L7_EBX_INVPCID | L7_EBX_AVX512);
                // ECX/EDX hold AVX-512 extensions, VAES, AMX...: none of them is usable.
                entry.ecx = 0;
                entry.edx = 0;
            }
        }
        0xa => {
            // Architectural performance monitoring: version 0 = no PMU.
            (entry.eax, entry.ebx, entry.ecx, entry.edx) = (0, 0, 0, 0);
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
        0x8000_0001 => {
            entry.ecx &= !LX1_ECX_PERFCTR;
            if count > 1 {
                entry.ecx |= LX1_ECX_CMP_LEGACY;
            } else {
                entry.ecx &= !LX1_ECX_CMP_LEGACY;
            }
            if profile == Profile::Pvm {
                entry.ecx &= !LX1_ECX_ABM;
                entry.edx &= !LX1_EDX_RDTSCP;
            }
        }
        0x8000_0008 => {
            // AMD ECX: [15:12] APIC ID bits that number the cores, [7:0] cores - 1.
            entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1).min(255);
        }
        0x8000_001d => {
            // AMD cache topology: EAX [25:14] logical processors sharing the cache - 1.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & !(0xfff << 14)) | ((sharing & 0xfff) << 14);
        }
        0x8000_001e => {
            // AMD extended APIC ID; EBX: [15:8] threads per core - 1, [7:0] core ID;
            // ECX: [10:8] nodes per package - 1, [7:0] node ID.
            entry.eax = id;
            entry.ebx = id & 0xff;
            entry.ecx = 0;
            entry.edx = 0;
        }
        0x8000_0022 => {
            // AMD performance monitoring v2: the PMU, hidden.
            (entry.eax, entry.ebx, entry.ecx, entry.edx) = (0, 0, 0, 0);
        }
        _ => {}
    }
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

/// The XSAVE state components the table's feature flags allow: Linux enables a component
/// only when its feature is advertised, so the XSAVE leaf must not describe any other.
fn xfeatures_allowed(entries: &[kvm_cpuid_entry2]) -> u64 {
    let leaf1_ecx = find(entries, 1, 0).map_or(0, |e| e.ecx);
    let leaf7 = find(entries, 7, 0).copied().unwrap_or_default();
    let mut allowed = XFEATURES_LEGACY;
    let mut allow = |feature: bool, components: u64| {
        if feature {
            allowed |= components;
        }
    };
    allow(leaf1_ecx & L1_ECX_AVX != 0, XFEATURE_YMM);
    allow(leaf7.ebx & L7_EBX_MPX != 0, XFEATURES_MPX);
    allow(leaf7.ebx & L7_EBX_AVX512F != 0, XFEATURES_AVX512);
    allow(leaf7.ecx & L7_ECX_PKU != 0, XFEATURE_PKRU);
    allow(leaf7.edx & L7_EDX_AMX_TILE != 0, XFEATURES_AMX);
    allowed
}

/// Makes leaf 0xD describe exactly the user state components that stay enabled: XCR0's
/// supported bits (subleaf 0 EDX:EAX) limited to the advertised features, the sizes in
/// subleaf 0 (EBX, ECX) and subleaf 1 (EBX, compacted) computed from the kept components'
/// own subleaves, and the subleaves of dropped components zeroed. Without XSAVE the leaf
/// goes entirely.
fn normalize_xsave(entries: &mut Vec<kvm_cpuid_entry2>) {
    let xsave = find(entries, 1, 0).is_some_and(|e| e.ecx & L1_ECX_XSAVE != 0);
    if !xsave {
        entries.retain(|e| e.function != 0xd);
        return;
    }
    let Some(leaf0) = find(entries, 0xd, 0) else {
        return;
    };
    let kept = (u64::from(leaf0.edx) << 32 | u64::from(leaf0.eax)) & xfeatures_allowed(entries);
    // Sizes of the kept components, in component order (the compacted format's order).
    let (mut standard, mut compacted) = (XSAVE_LEGACY_AND_HEADER, XSAVE_LEGACY_AND_HEADER);
    for bit in 2..64u32 {
        if kept & (1 << bit) == 0 {
            continue;
        }
        let Some(sub) = find(entries, 0xd, bit) else {
            continue;
        };
        standard = standard.max(sub.ebx + sub.eax);
        if sub.ecx & LDI_ECX_ALIGN64 != 0 {
            compacted = compacted.next_multiple_of(64);
        }
        compacted += sub.eax;
    }
    // Supervisor components (IA32_XSS, subleaf 1 ECX/EDX) stay as KVM reported them.
    let supervisor = find(entries, 0xd, 1).map_or(0, |e| u64::from(e.edx) << 32 | u64::from(e.ecx));
    for e in entries.iter_mut().filter(|e| e.function == 0xd) {
        match e.index {
            0 => {
                e.eax = kept as u32;
                e.edx = (kept >> 32) as u32;
                e.ebx = standard;
                e.ecx = standard;
            }
            1 if e.eax & (LD1_EAX_XSAVEC | LD1_EAX_XSAVES) != 0 => e.ebx = compacted,
            i if i < 64 && (kept | supervisor) & (1 << i) == 0 => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            _ => {}
        }
    }
}

/// Clears AMD's TOPOEXT when the leaf it promises (0x8000_001E) is missing, so the guest
/// falls back to 0x8000_0008 for its core count instead of reading zeros.
fn normalize_topoext(entries: &mut [kvm_cpuid_entry2]) {
    if find(entries, 0x8000_001e, 0).is_some() {
        return;
    }
    for e in entries.iter_mut().filter(|e| e.function == 0x8000_0001) {
        e.ecx &= !LX1_ECX_TOPOEXT;
    }
}

/// The XCR0 a vCPU with this CPUID starts with: every state component its leaf 0xD
/// advertises, as firmware that enables XSAVE leaves it. `None` without XSAVE. KVM
/// computes leaf 0xD's current size from the XCR0 it knows, so starting with the same
/// components the guest kernel will enable keeps that size right even where the guest's
/// own XSETBV never reaches KVM (nested under an emulator that does not intercept it).
pub fn boot_xcr0(cpuid: &[kvm_cpuid_entry2]) -> Option<u64> {
    if find(cpuid, 1, 0).is_none_or(|e| e.ecx & L1_ECX_XSAVE == 0) {
        return None;
    }
    let leaf0 = find(cpuid, 0xd, 0)?;
    Some((u64::from(leaf0.edx) << 32 | u64::from(leaf0.eax)) | XFEATURES_LEGACY)
}

/// The CPUID table for vCPU `id` of `count`.
pub fn for_vcpu(supported: &CpuId, id: u32, count: u32, profile: Profile) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .map(|e| {
            let mut e = *e;
            normalize_entry(&mut e, id, count, profile);
            e
        })
        .collect();
    normalize_xsave(&mut entries);
    normalize_topoext(&mut entries);
    CpuId::from_entries(&entries).expect("no more entries than KVM returned")
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

    fn regs(function: u32, index: u32, [eax, ebx, ecx, edx]: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn table(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).unwrap()
    }

    fn get(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *find(cpuid.as_slice(), function, index).expect("leaf present")
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
    fn leaf1_hides_pdcm_and_keeps_tsc_deadline() {
        let mut e = entry(1, 0);
        normalize_entry(&mut e, 0, 1, Profile::Host);
        assert_eq!(e.ecx & L1_ECX_PDCM, 0);
        assert_ne!(e.ecx & L1_ECX_TSC_DEADLINE, 0);
        assert_eq!(e.edx & L1_EDX_HTT, 0, "one vCPU: no HTT");
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
    fn pvm_table_has_no_xsave_leaf() {
        let t = table(&[entry(1, 0), entry(0xd, 0), entry(0xd, 1), entry(0xd, 2)]);
        let out = for_vcpu(&t, 0, 1, Profile::Pvm);
        assert!(out.as_slice().iter().all(|e| e.function != 0xd));
        assert_eq!(boot_xcr0(out.as_slice()), None);
    }

    #[test]
    fn host_profile_keeps_features_but_not_waitpkg() {
        let mut e = entry(7, 0);
        normalize_entry(&mut e, 0, 1, Profile::Host);
        assert_eq!(e.ebx, !0);
        assert_eq!(e.ecx, !L7_ECX_WAITPKG);
    }

    #[test]
    fn pmu_is_hidden_on_intel_and_amd() {
        let mut e = entry(0xa, 0);
        normalize_entry(&mut e, 0, 2, Profile::Host);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
        let mut e = entry(0x8000_0001, 0);
        normalize_entry(&mut e, 0, 2, Profile::Host);
        assert_eq!(e.ecx & LX1_ECX_PERFCTR, 0);
        let mut e = entry(0x8000_0022, 0);
        normalize_entry(&mut e, 0, 2, Profile::Host);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
    }

    #[test]
    fn topology_leaf_numbers_cores() {
        let mut smt = entry(0xb, 0);
        normalize_entry(&mut smt, 2, 4, Profile::Host);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let mut core = entry(0xb, 1);
        normalize_entry(&mut core, 2, 4, Profile::Host);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
        let mut core = entry(0x1f, 1);
        normalize_entry(&mut core, 0, 3, Profile::Host);
        assert_eq!(core.eax, 2);
        let mut end = entry(0xb, 2);
        normalize_entry(&mut end, 1, 2, Profile::Host);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 1));
    }

    #[test]
    fn cache_leaves_share_the_last_level_across_the_package() {
        // Intel leaf 4: L1d (type 1, level 1), L2 (level 2), L3 (level 3); the host said
        // 2 threads share each cache and 8 cores per package.
        let host = |level: u32| (7 << 26) | (1 << 14) | (level << 5) | 1;
        for (level, sharing) in [(1, 0), (2, 0), (3, 3)] {
            let mut e = regs(4, level - 1, [host(level), 0, 0, 0]);
            normalize_entry(&mut e, 1, 4, Profile::Host);
            assert_eq!((e.eax >> 14) & 0xfff, sharing, "level {level}");
            assert_eq!(e.eax >> 26, 3, "cores per package - 1");
            assert_eq!(
                e.eax & 0x3fff,
                (level << 5) | 1,
                "cache type and level kept"
            );
        }
        let mut l3 = regs(0x8000_001d, 3, [(1 << 14) | (3 << 5) | 3, 0, 0, 0]);
        normalize_entry(&mut l3, 0, 2, Profile::Host);
        assert_eq!((l3.eax >> 14) & 0xfff, 1);
        let mut l1 = regs(0x8000_001d, 0, [(1 << 14) | (1 << 5) | 1, 0, 0, 0]);
        normalize_entry(&mut l1, 0, 2, Profile::Host);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
    }

    #[test]
    fn amd_topology_leaves_agree_with_the_apic_ids() {
        let mut e = entry(0x8000_001e, 0);
        normalize_entry(&mut e, 3, 4, Profile::Host);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (3, 3, 0, 0));
        let mut e = regs(0x8000_0008, 0, [0x3030, 0, 0x7007, 0]);
        normalize_entry(&mut e, 0, 3, Profile::Host);
        assert_eq!(e.ecx & 0xf0ff, (2 << 12) | 2);
        let mut e = entry(0x8000_0001, 0);
        normalize_entry(&mut e, 0, 1, Profile::Host);
        assert_eq!(e.ecx & LX1_ECX_CMP_LEGACY, 0);
    }

    #[test]
    fn topoext_goes_without_its_leaf() {
        let t = table(&[entry(0x8000_0001, 0)]);
        let out = for_vcpu(&t, 0, 2, Profile::Host);
        assert_eq!(get(&out, 0x8000_0001, 0).ecx & LX1_ECX_TOPOEXT, 0);
        let t = table(&[entry(0x8000_0001, 0), entry(0x8000_001e, 0)]);
        let out = for_vcpu(&t, 0, 2, Profile::Host);
        assert_ne!(get(&out, 0x8000_0001, 0).ecx & LX1_ECX_TOPOEXT, 0);
    }

    /// A host with x87, SSE, AVX (256 bytes at 576), MPX (two components), AVX-512 (three)
    /// and PKRU (8 bytes at 2688), as KVM_GET_SUPPORTED_CPUID reports them.
    fn xsave_host(leaf1_ecx: u32, leaf7: [u32; 4]) -> CpuId {
        table(&[
            regs(1, 0, [0, 0, leaf1_ecx, 0]),
            regs(7, 0, leaf7),
            regs(0xd, 0, [0x2ff, 2696, 2696, 0]),
            regs(0xd, 1, [0xf, 2440, 0x100, 0]),
            regs(0xd, 2, [256, 576, 0, 0]),
            regs(0xd, 3, [64, 960, 0, 0]),
            regs(0xd, 4, [64, 1024, 0, 0]),
            regs(0xd, 5, [64, 1088, 2, 0]),
            regs(0xd, 6, [512, 1152, 2, 0]),
            regs(0xd, 7, [1024, 1664, 2, 0]),
            regs(0xd, 8, [128, 0, 1, 0]),
            regs(0xd, 9, [8, 2688, 0, 0]),
        ])
    }

    #[test]
    fn xsave_sizes_follow_the_advertised_features() {
        let pku = [0, 0, L7_ECX_PKU, 0];
        // AVX and PKU advertised, MPX and AVX-512 not: YMM and PKRU stay.
        let out = for_vcpu(
            &xsave_host(L1_ECX_XSAVE | L1_ECX_AVX, pku),
            0,
            1,
            Profile::Host,
        );
        let leaf0 = get(&out, 0xd, 0);
        assert_eq!(leaf0.eax, 0x207);
        assert_eq!((leaf0.ebx, leaf0.ecx), (2696, 2696));
        // Compacted: 576 + 256 (YMM) + 8 (PKRU) = 840.
        assert_eq!(get(&out, 0xd, 1).ebx, 840);
        assert_eq!(get(&out, 0xd, 3).eax, 0, "MPX state is not described");
        assert_eq!(get(&out, 0xd, 6).eax, 0, "AVX-512 state is not described");
        assert_eq!(
            get(&out, 0xd, 8).eax,
            128,
            "supervisor state stays as reported"
        );
        assert_eq!(boot_xcr0(out.as_slice()), Some(0x207));

        // Without AVX and PKU only x87/SSE remain: the legacy area and header.
        let out = for_vcpu(&xsave_host(L1_ECX_XSAVE, [0; 4]), 0, 1, Profile::Host);
        let leaf0 = get(&out, 0xd, 0);
        assert_eq!((leaf0.eax, leaf0.ebx, leaf0.ecx), (0x3, 576, 576));
        assert_eq!(get(&out, 0xd, 2), regs(0xd, 2, [0; 4]));

        // Everything advertised: AVX-512 components are 64-byte aligned when compacted.
        let all = [0, L7_EBX_MPX | L7_EBX_AVX512F, L7_ECX_PKU, 0];
        let out = for_vcpu(
            &xsave_host(L1_ECX_XSAVE | L1_ECX_AVX, all),
            0,
            1,
            Profile::Host,
        );
        assert_eq!(get(&out, 0xd, 0).eax, 0x2ff);
        assert_eq!(get(&out, 0xd, 0).ebx, 2696);
        assert_eq!(
            get(&out, 0xd, 1).ebx,
            576 + 256 + 64 + 64 + 64 + 512 + 1024 + 8
        );
    }

    #[test]
    fn without_xsave_there_is_no_xsave_leaf() {
        let out = for_vcpu(&xsave_host(L1_ECX_AVX, [0; 4]), 0, 1, Profile::Host);
        assert!(out.as_slice().iter().all(|e| e.function != 0xd));
        assert_eq!(boot_xcr0(out.as_slice()), None);
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
