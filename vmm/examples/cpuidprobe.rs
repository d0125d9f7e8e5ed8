use kvm_bindings::CpuId;
use vm_memory::{Bytes, GuestAddress};
fn main() {
    let kvm = vmm::machine::open_kvm().unwrap();
    let sup = vmm::cpuid::supported(&kvm).unwrap();
    for e in sup.as_slice().iter().filter(|e| e.function == 1) {
        eprintln!("supported leaf1 ecx {:#x} edx {:#x}", e.ecx, e.edx);
    }
    let mem = vmm::memory::create(64).unwrap();
    let vm = vmm::machine::create_vm(&kvm).unwrap();
    vmm::memory::register(&vm, &mem).unwrap();
    vmm::regs::write_boot_tables(&mem, vmm::regs::EntryMode::Linux64).unwrap();
    let code: &[u8] = &[
        0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0xa2, 0x66, 0xba, 0x20, 0x01, 0x89, 0xc8, 0xef, 0x89,
        0xd8, 0xef, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd,
    ];
    mem.write_slice(code, GuestAddress(0x100000)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut entries: Vec<_> = sup.as_slice().to_vec();
    let mask: u32 = std::env::args()
        .nth(1)
        .map(|s| u32::from_str_radix(&s, 16).unwrap())
        .unwrap_or(0);
    for e in entries.iter_mut() {
        if e.function == 1 {
            e.ecx = mask;
        }
    }
    vcpu.set_cpuid2(&CpuId::from_entries(&entries).unwrap())
        .unwrap();
    let back = vcpu.get_cpuid2(80).unwrap();
    for e in back.as_slice().iter().filter(|e| e.function == 1) {
        eprintln!("get_cpuid2 leaf1 ecx {:#x}", e.ecx);
    }
    vmm::regs::setup_vcpu(&vcpu, vmm::regs::EntryMode::Linux64, Some((0x100000, 0))).unwrap();
    loop {
        match vcpu.run().unwrap() {
            kvm_ioctls::VcpuExit::IoOut(p, d) => {
                if p == 0x64 {
                    break;
                }
                eprintln!(
                    "out {p:#x} {:#x}",
                    u32::from_le_bytes(d.try_into().unwrap())
                );
            }
            e => {
                eprintln!("{e:?}");
                break;
            }
        }
    }
}
