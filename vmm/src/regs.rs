//! Boot-time vCPU state as data: GDT, segments, control registers, identity-map page
//! tables, MSRs, FPU and LAPIC LINT pins. The values follow the two entry protocols:
//!
//! * PVH (`Documentation/x86/boot.rst`, Xen's `pvh.html`): 32-bit protected mode, flat
//!   4 GiB segments, paging off, `%ebx` = address of `hvm_start_info`.
//! * Linux 64-bit boot protocol: long mode, flat segments, paging on with an identity map
//!   of the low memory the kernel, zero page and command line live in, `%rsi` = zero page.

use crate::cpuid;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_xcr, kvm_xcrs,
    Msrs,
};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// Which entry protocol the boot vCPU starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, no paging; `%ebx` = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode with identity-mapped pages; `%rsi` = zero page.
    Linux64,
}

/// Why boot register state could not be written.
#[derive(Debug, Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT/IDT/page tables at {addr:#x}: {source}")]
    Memory {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM refused the boot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
}

// GDT access bytes and flags, packed as (flags << 12 | access) like the kernel's
// GDT_ENTRY macro: P=1, S=1, type; flags G (4 KiB granularity), D/B (32-bit), L (64-bit).
/// 64-bit code: G, L, P, DPL0, code execute/read accessed.
pub const GDT_CODE64_FLAGS: u16 = 0xa09b;
/// 32-bit code: G, D, P, DPL0, code execute/read accessed.
pub const GDT_CODE32_FLAGS: u16 = 0xc09b;
/// Data: G, B, P, DPL0, data read/write accessed.
pub const GDT_DATA_FLAGS: u16 = 0xc093;
/// TSS: G, P, 32-bit busy TSS.
pub const GDT_TSS_FLAGS: u16 = 0x808b;

/// GDT index of the code segment.
pub const CODE_INDEX: u16 = 1;
/// GDT index of the data segment.
pub const DATA_INDEX: u16 = 2;
/// GDT index of the TSS.
pub const TSS_INDEX: u16 = 3;

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (required for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
pub const RFLAGS_RESERVED: u64 = 1 << 1;

/// Page-table entry flags: present | writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry flags: present | writable | 2 MiB page.
const PDE_2M_PAGE: u64 = 0x83;

/// A GDT entry from flags, base and limit (limit in units given by the G flag).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT for a mode: null, code, data, TSS.
pub fn gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Pvh => GDT_CODE32_FLAGS,
        EntryMode::Linux64 => GDT_CODE64_FLAGS,
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(GDT_DATA_FLAGS, 0, 0xfffff),
        gdt_entry(GDT_TSS_FLAGS, 0, 0xfffff),
    ]
}

/// The KVM segment register a GDT entry at `index` describes.
pub fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages; KVM wants the byte limit.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// Special registers for `mode`, on top of what KVM_GET_SREGS returned.
pub fn boot_sregs(mode: EntryMode, mut sregs: kvm_sregs) -> kvm_sregs {
    let table = gdt(mode);
    let code = segment(table[CODE_INDEX as usize], CODE_INDEX);
    let data = segment(table[DATA_INDEX as usize], DATA_INDEX);
    let tss = segment(table[TSS_INDEX as usize], TSS_INDEX);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General registers of the boot vCPU: entry point, stack, and the protocol's pointer
/// (`%ebx` = start_info for PVH, `%rsi` = zero page for the 64-bit protocol).
pub fn boot_regs(mode: EntryMode, entry: u64, boot_info: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = boot_info,
        EntryMode::Linux64 => regs.rsi = boot_info,
    }
    regs
}

/// FPU state after reset: x87 control word 0x37f (all exceptions masked), MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR indices set at boot.
pub mod msr_index {
    /// SYSENTER CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// SYSENTER ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// SYSENTER EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// SYSCALL target segments.
    pub const STAR: u32 = 0xc000_0081;
    /// SYSCALL 64-bit target.
    pub const LSTAR: u32 = 0xc000_0082;
    /// SYSCALL compat target.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL RFLAGS mask.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// SWAPGS shadow.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// Time-stamp counter.
    pub const IA32_TSC: u32 = 0x10;
    /// Misc enables (fast strings).
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// MTRR default memory type and enable bits.
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
}

/// IA32_MISC_ENABLE.FAST_STRING: what firmware sets, so `rep movs` is fast.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;

/// IA32_MTRR_DEF_TYPE.E: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back (the MTRR/PAT encoding 6).
pub const MTRR_TYPE_WRITE_BACK: u64 = 6;

/// The boot MSR values: syscall/sysenter MSRs cleared, TSC at 0, fast strings on, and
/// MTRRs enabled with write-back as the default type, as firmware leaves them (with MTRRs
/// off Linux logs "MTRRs disabled", skips PAT and maps everything uncached-minus).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    use msr_index::*;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(IA32_SYSENTER_CS, 0),
        entry(IA32_SYSENTER_ESP, 0),
        entry(IA32_SYSENTER_EIP, 0),
        entry(STAR, 0),
        entry(CSTAR, 0),
        entry(KERNEL_GS_BASE, 0),
        entry(SYSCALL_MASK, 0),
        entry(LSTAR, 0),
        entry(IA32_TSC, 0),
        entry(IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(IA32_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITE_BACK),
    ]
}

/// XCR0, the extended control register that enables XSAVE state components.
const XCR_XFEATURE_ENABLED_MASK: u32 = 0;

/// The XCRs a vCPU with `xcr0` starts with.
pub fn boot_xcrs(xcr0: u64) -> kvm_xcrs {
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0] = kvm_xcr {
        xcr: XCR_XFEATURE_ENABLED_MASK,
        value: xcr0,
        ..Default::default()
    };
    xcrs
}

/// Sets XCR0 to every XSAVE component the vCPU's CPUID (already set) advertises; see
/// [`cpuid::boot_xcr0`] for why. Nothing to do for a vCPU without XSAVE.
fn setup_xcr0(vcpu: &kvm_ioctls::VcpuFd) -> Result<(), RegsError> {
    let kvm = |what| move |source| RegsError::Kvm { what, source };
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("CPUID read"))?;
    if let Some(xcr0) = cpuid::boot_xcr0(cpuid.as_slice()) {
        vcpu.set_xcrs(&boot_xcrs(xcr0)).map_err(kvm("XCR0"))?;
    }
    Ok(())
}

/// LAPIC LVT LINT0 register offset.
pub const APIC_LVT_LINT0: usize = 0x350;
/// LAPIC LVT LINT1 register offset.
pub const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery mode ExtINT (the PIC's output goes through LINT0).
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

/// Sets a LVT register's delivery mode (bits 8..10), keeping the other bits.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LAPIC state with LINT0 = ExtINT and LINT1 = NMI, as the MP spec's virtual-wire mode
/// that Linux expects from firmware.
pub fn boot_lapic(mut state: kvm_lapic_state) -> kvm_lapic_state {
    let lint0 = lapic_reg(&state, APIC_LVT_LINT0);
    set_lapic_reg(
        &mut state,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(&state, APIC_LVT_LINT1);
    set_lapic_reg(
        &mut state,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
    state
}

/// The identity map's page tables: `PML4[0]` → PDPT, `PDPT[0]` → PD, PD = 512 × 2 MiB pages
/// covering the first 1 GiB (kernel, zero page, command line, initrd live there).
pub fn identity_page_tables() -> [(u64, Vec<u64>); 3] {
    let pd: Vec<u64> = (0..512u64).map(|i| (i << 21) | PDE_2M_PAGE).collect();
    [
        (PML4_START, vec![PDPTE_START | PTE_PRESENT_RW]),
        (PDPTE_START, vec![PDE_START | PTE_PRESENT_RW]),
        (PDE_START, pd),
    ]
}

fn write_u64s(memory: &GuestMemoryMmap, addr: u64, values: &[u64]) -> Result<(), RegsError> {
    for (i, v) in values.iter().enumerate() {
        let at = addr + 8 * i as u64;
        memory
            .write_obj(*v, GuestAddress(at))
            .map_err(|source| RegsError::Memory { addr: at, source })?;
    }
    Ok(())
}

/// Writes the GDT, an empty IDT and (for long mode) the identity page tables into guest
/// memory.
pub fn write_boot_tables(memory: &GuestMemoryMmap, mode: EntryMode) -> Result<(), RegsError> {
    write_u64s(memory, BOOT_GDT_START, &gdt(mode))?;
    write_u64s(memory, BOOT_IDT_START, &[0])?;
    if mode == EntryMode::Linux64 {
        for (addr, entries) in identity_page_tables() {
            write_u64s(memory, addr, &entries)?;
        }
    }
    Ok(())
}

/// Puts one vCPU, whose CPUID is already set, in its boot state. The boot vCPU (`entry`
/// given) gets the entry registers and segments; application processors only get MSRs,
/// XCR0, FPU and LAPIC and wait for INIT/SIPI from the boot vCPU, like on real hardware.
pub fn setup_vcpu(
    vcpu: &kvm_ioctls::VcpuFd,
    mode: EntryMode,
    entry: Option<(u64, u64)>,
) -> Result<(), RegsError> {
    let kvm = |what| move |source| RegsError::Kvm { what, source };
    let wanted = boot_msrs();
    let msrs = Msrs::from_entries(&wanted).expect("a handful of MSRs fits");
    let set = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if set != wanted.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: wanted.len(),
        });
    }
    setup_xcr0(vcpu)?;
    vcpu.set_fpu(&boot_fpu()).map_err(kvm("FPU state"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("LAPIC read"))?;
    vcpu.set_lapic(&boot_lapic(lapic)).map_err(kvm("LAPIC"))?;
    if let Some((rip, boot_info)) = entry {
        let sregs = vcpu.get_sregs().map_err(kvm("special registers read"))?;
        vcpu.set_sregs(&boot_sregs(mode, sregs))
            .map_err(kvm("special registers"))?;
        vcpu.set_regs(&boot_regs(mode, rip, boot_info))
            .map_err(kvm("registers"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_have_the_documented_encodings() {
        assert_eq!(
            gdt_entry(GDT_CODE64_FLAGS, 0, 0xfffff),
            0x00af_9b00_0000_ffff
        );
        assert_eq!(
            gdt_entry(GDT_CODE32_FLAGS, 0, 0xfffff),
            0x00cf_9b00_0000_ffff
        );
        assert_eq!(gdt_entry(GDT_DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(GDT_TSS_FLAGS, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(
            gdt_entry(0x0093, 0x1234_5678, 0xabcd),
            0x1200_9334_5678_abcd
        );
    }

    #[test]
    fn code64_segment_is_long_mode_flat() {
        let cs = segment(gdt(EntryMode::Linux64)[1], CODE_INDEX);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 0x8));
        assert_eq!((cs.type_, cs.present, cs.dpl, cs.s), (0xb, 1, 0, 1));
        assert_eq!((cs.l, cs.db, cs.g, cs.unusable), (1, 0, 1, 0));
    }

    #[test]
    fn pvh_code_segment_is_32_bit_flat() {
        let cs = segment(gdt(EntryMode::Pvh)[1], CODE_INDEX);
        assert_eq!((cs.l, cs.db, cs.limit), (0, 1, 0xffff_ffff));
        let ds = segment(gdt(EntryMode::Pvh)[2], DATA_INDEX);
        assert_eq!((ds.type_, ds.selector, ds.db), (0x3, 0x10, 1));
        let tr = segment(gdt(EntryMode::Pvh)[3], TSS_INDEX);
        assert_eq!((tr.type_, tr.selector, tr.s), (0xb, 0x18, 0));
    }

    #[test]
    fn long_mode_sregs_enable_paging_with_the_identity_map() {
        let s = boot_sregs(EntryMode::Linux64, kvm_sregs::default());
        assert_eq!(s.cr0, 0x8000_0011);
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.cr4, 0x20);
        assert_eq!(s.efer, 0x500);
        assert_eq!((s.gdt.base, s.gdt.limit), (0x500, 31));
        assert_eq!((s.idt.base, s.idt.limit), (0x520, 7));
        assert_eq!(s.ss.selector, 0x10);
    }

    #[test]
    fn pvh_sregs_are_protected_mode_without_paging() {
        let s = boot_sregs(EntryMode::Pvh, kvm_sregs::default());
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (0x11, 0, 0, 0));
    }

    #[test]
    fn regs_carry_entry_stack_and_boot_pointer() {
        let r = boot_regs(EntryMode::Pvh, 0x100_0000, 0x6000);
        assert_eq!(
            (r.rip, r.rsp, r.rbx, r.rsi, r.rflags),
            (0x100_0000, 0x8ff0, 0x6000, 0, 2)
        );
        let r = boot_regs(EntryMode::Linux64, 0x100_0200, 0x7000);
        assert_eq!((r.rbx, r.rsi), (0, 0x7000));
    }

    #[test]
    fn page_tables_identity_map_the_first_gigabyte() {
        let [(pml4, l4), (pdpt, l3), (pd, l2)] = identity_page_tables();
        assert_eq!((pml4, l4), (0x9000, vec![0xa003]));
        assert_eq!((pdpt, l3), (0xa000, vec![0xb003]));
        assert_eq!(pd, 0xb000);
        assert_eq!(l2.len(), 512);
        assert_eq!(l2[0], 0x83);
        assert_eq!(l2[1], 0x20_0083);
        assert_eq!(l2[511], 0x3fe0_0083);
    }

    #[test]
    fn lapic_lints_are_extint_and_nmi() {
        let mut state = kvm_lapic_state::default();
        set_lapic_reg(&mut state, APIC_LVT_LINT0, 0x0001_0000);
        let s = boot_lapic(state);
        assert_eq!(lapic_reg(&s, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_reg(&s, APIC_LVT_LINT1), 0x0000_0400);
    }

    #[test]
    fn fpu_and_msrs_have_reset_values() {
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
        let m = boot_msrs();
        assert_eq!(m.len(), 11);
        assert!(m.iter().any(|e| e.index == 0x1a0 && e.data == 1));
    }

    #[test]
    fn mtrrs_are_enabled_with_write_back_default() {
        let m = boot_msrs();
        let def_type = m
            .iter()
            .find(|e| e.index == 0x2ff)
            .expect("MTRRdefType set");
        assert_eq!(def_type.data, 0x806);
    }

    #[test]
    fn xcr0_is_the_only_xcr_set() {
        let x = boot_xcrs(0x207);
        assert_eq!(x.nr_xcrs, 1);
        assert_eq!((x.xcrs[0].xcr, x.xcrs[0].value), (0, 0x207));
    }
}
