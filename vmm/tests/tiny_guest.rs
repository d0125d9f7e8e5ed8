//! Tiny freestanding guests booted through the VMM's own boot path (GDT, segments, long
//! mode page tables, MSRs, LAPIC, CPUID, vCPU thread and its exit handling).
//!
//! NEEDS /dev/kvm (any flavour: PVM is fine, no Linux guest involved). Without it these
//! tests fail with a message saying so.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress};
use vmm::cpuid::Profile;
use vmm::machine::{self, BootEntry};
use vmm::regs::{self, EntryMode};
use vmm::seccomp::{Filters, Mode};
use vmm::vcpu::{IoHandler, VcpuContext, VcpuStop, VcpuThread};
use vmm_sys_util::eventfd::EventFd;

/// Records everything the guest does on the buses.
#[derive(Default)]
struct Recorder {
    serial: Mutex<Vec<u8>>,
    markers: Mutex<Vec<u32>>,
    mmio: Mutex<Vec<(u64, bool)>>,
    reset: Mutex<Option<EventFd>>,
}

impl IoHandler for Recorder {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        match port {
            0x3f8 => self.serial.lock().unwrap().extend_from_slice(data),
            0x120 if data.len() == 4 => self
                .markers
                .lock()
                .unwrap()
                .push(u32::from_le_bytes(data.try_into().unwrap())),
            0x64 if data == [0xfe] => {
                self.reset
                    .lock()
                    .unwrap()
                    .as_ref()
                    .unwrap()
                    .write(1)
                    .unwrap();
            }
            _ => {}
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio.lock().unwrap().push((addr, false));
        data.fill(0xff);
    }
    fn mmio_write(&self, addr: u64, _data: &[u8]) {
        self.mmio.lock().unwrap().push((addr, true));
    }
}

/// 64-bit guest code, entered in long mode through the Linux 64-bit protocol state:
///
/// ```text
/// 66 ba f8 03              mov dx, 0x3f8        ; COM1
/// b0 48 ee                 mov al, 'H' ; out dx, al
/// b0 69 ee                 mov al, 'i' ; out dx, al
/// 8b 04 25 00 00 00 30     mov eax, [0x30000000] ; wild MMIO read (no RAM, no device)
/// ee                       out dx, al           ; what it read (expect 0xff)
/// 89 04 25 00 00 00 30     mov [0x30000000], eax ; wild MMIO write
/// 66 ba 20 01              mov dx, 0x120        ; marker port
/// b8 03 07 00 00 ef        mov eax, 0x703 ; out dx, eax  ; WorkloadExited(7)
/// b0 fe e6 64              mov al, 0xfe ; out 0x64, al   ; i8042 reset
/// f4 eb fd                 hlt ; jmp hlt
/// ```
const GUEST: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x48, 0xee, 0xb0, 0x69, 0xee, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x00,
    0x30, 0xee, 0x89, 0x04, 0x25, 0x00, 0x00, 0x00, 0x30, 0x66, 0xba, 0x20, 0x01, 0xb8, 0x03, 0x07,
    0x00, 0x00, 0xef, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd,
];

/// Guest code that triple-faults: loads an empty IDT limit and divides by zero.
/// ```text
/// 31 c9      xor ecx, ecx
/// f7 f1      div ecx        ; #DE with an empty IDT → #GP → #DF → triple fault
/// ```
const TRIPLE_FAULT: &[u8] = &[0x31, 0xc9, 0xf7, 0xf1];

/// Reports CPUID leaf 1 as the guest sees it: ECX then EBX to the marker port.
/// ```text
/// b8 01 00 00 00   mov eax, 1
/// 0f a2            cpuid
/// 66 ba 20 01      mov dx, 0x120
/// 89 c8 ef         mov eax, ecx ; out dx, eax
/// 89 d8 ef         mov eax, ebx ; out dx, eax
/// b0 fe e6 64      mov al, 0xfe ; out 0x64, al
/// f4 eb fd         hlt ; jmp hlt
/// ```
const CPUID_LEAF1: &[u8] = &[
    0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0xa2, 0x66, 0xba, 0x20, 0x01, 0x89, 0xc8, 0xef, 0x89, 0xd8,
    0xef, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd,
];

const ENTRY: u64 = 0x10_0000;

fn require_kvm() -> kvm_ioctls::Kvm {
    machine::open_kvm().unwrap_or_else(|e| panic!("this test needs /dev/kvm: {e}"))
}

fn run_guest(code: &[u8], vcpus: u32) -> (Arc<Recorder>, VcpuStop) {
    let kvm = require_kvm();
    let profile = if twinbox_spec::host::is_pvm() {
        Profile::Pvm
    } else {
        Profile::Host
    };
    let memory = vmm::memory::create(64).unwrap();
    let vm = machine::create_vm(&kvm).unwrap();
    vmm::memory::register(&vm, &memory).unwrap();
    regs::write_boot_tables(&memory, EntryMode::Linux64).unwrap();
    memory.write_slice(code, GuestAddress(ENTRY)).unwrap();
    let entry = BootEntry {
        mode: EntryMode::Linux64,
        rip: ENTRY,
        boot_info: 0x7000,
    };
    let fds = machine::create_vcpus(&kvm, &vm, vcpus, profile, entry).unwrap();

    let io = Arc::new(Recorder::default());
    let reset = EventFd::new(0).unwrap();
    *io.reset.lock().unwrap() = Some(reset.try_clone().unwrap());
    let exit_evt = EventFd::new(0).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel();
    let threads: Vec<VcpuThread> = fds
        .into_iter()
        .enumerate()
        .map(|(id, fd)| {
            let ctx = VcpuContext {
                id: id as u32,
                io: io.clone(),
                memory: memory.clone(),
                stop: stop.clone(),
                exit_evt: exit_evt.try_clone().unwrap(),
                reasons: tx.clone(),
                on_first_run: None,
                pvm_workarounds: false,
                // The real vCPU filter: these guests exercise it too.
                seccomp: Filters::new(Mode::Kill).unwrap(),
            };
            VcpuThread::spawn(fd, ctx).unwrap()
        })
        .collect();
    // Wait for either the reset (guest wrote 0xfe to the i8042) or a vCPU stopping.
    let mut fds = [
        libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&reset),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&exit_evt),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: fds is a valid array of two pollfds for the call's duration.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 60_000) };
    assert!(n > 0, "guest neither reset nor stopped within 60 s");
    stop.store(true, std::sync::atomic::Ordering::Release);
    for t in threads {
        t.stop_and_join();
    }
    let reason = rx.try_recv().unwrap_or(VcpuStop::Requested);
    (io, reason)
}

#[test]
fn tiny_guest_talks_to_serial_marker_and_survives_wild_mmio() {
    let (io, reason) = run_guest(GUEST, 1);
    assert_eq!(
        reason,
        VcpuStop::Requested,
        "the guest reset through the i8042, no vCPU failed"
    );
    assert_eq!(io.serial.lock().unwrap().as_slice(), b"Hi\xff");
    assert_eq!(io.markers.lock().unwrap().as_slice(), &[0x703]);
    assert_eq!(
        io.mmio.lock().unwrap().as_slice(),
        &[(0x3000_0000, false), (0x3000_0000, true)]
    );
}

#[test]
fn tiny_guest_with_application_processors_boots_only_the_bsp() {
    // vCPUs 1..3 wait for INIT/SIPI in the in-kernel LAPIC; the BSP runs the program.
    let (io, reason) = run_guest(GUEST, 2);
    assert_eq!(reason, VcpuStop::Requested);
    assert_eq!(io.markers.lock().unwrap().as_slice(), &[0x703]);
}

#[test]
fn triple_fault_is_reported() {
    let (_, reason) = run_guest(TRIPLE_FAULT, 1);
    assert_eq!(reason, VcpuStop::TripleFault { vcpu: 0 });
}

#[test]
fn guest_sees_the_cpuid_we_set() {
    let (io, reason) = run_guest(CPUID_LEAF1, 2);
    assert_eq!(reason, VcpuStop::Requested);
    let words = io.markers.lock().unwrap().clone();
    assert_eq!(words.len(), 2, "guest reported ecx and ebx");
    let (ecx, ebx) = (words[0], words[1]);
    assert_ne!(ecx & (1 << 31), 0, "hypervisor bit");
    assert_eq!(ebx >> 24, 0, "boot vCPU has APIC ID 0");
    assert_eq!((ebx >> 16) & 0xff, 2, "two logical processors");
    if twinbox_spec::host::is_pvm() {
        // PVM lets the VMM hide these; it forces the host's XSAVE/POPCNT/AVX/FMA/F16C bits
        // back in whatever the table says, which is why the PVM command line adds
        // `noxsave clearcpuid=...` (docs/vm-on-pvm.md).
        assert_eq!(ecx & (1 << 13), 0, "CX16 hidden on PVM (ecx {ecx:#x})");
        assert_eq!(ecx & (1 << 3), 0, "MONITOR hidden on PVM (ecx {ecx:#x})");
    }
}
