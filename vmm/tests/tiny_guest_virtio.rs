//! A virtqueue round trip through a tiny freestanding guest on the host's KVM (PVM
//! included): no Linux, no guest driver, just a few dozen hand-assembled instructions that
//! drive the virtio-mmio transport of the VMM's second virtio-blk device.
//!
//! The guest is booted through the library's whole run path, `vmm::run`: the test writes
//! an ELF "kernel" without a PVH note, so the VMM loads it at 1 MiB and enters it in long
//! mode at `e_entry` through the 64-bit boot protocol (its GDT, identity map of the first
//! GiB, boot stack). The ELF's one loadable segment carries the code *and* what the host
//! prepares before boot: a split virtqueue (descriptor table, avail ring already holding
//! one virtio-blk IN request for sector 0 of 512 bytes, an empty used ring), the request
//! header, a status byte preset to 0xff, the 512 bytes the guest must find, and a page
//! directory the guest hooks into the VMM's PDPT to map the virtio windows at 0xd000_0000
//! (the VMM identity-maps only the first GiB).
//!
//! The disks: the real root image (`twinbox_spec::artifacts::rootfs_image()`, device 0,
//! read-only, because the VMM checks that the root is ext4) and a scratch file whose
//! sector 0 holds a known pattern (`spec.disks[0]`, device 1 at
//! `VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE`, read-write).
//!
//! The guest's notification travels the real path: its QueueNotify write is an MMIO exit
//! the VMM turns into an ioeventfd signal, the event loop runs the block device, which
//! reads the file into guest memory, fills the used ring and signals the irqfd. The guest
//! then checks the used ring, the status byte, the data and the InterruptStatus register
//! itself and reports the verdict as the workload exit code on the marker port, which is
//! what the test asserts (`vmm::run` gives no access to guest memory afterwards).
//!
//! NEEDS /dev/kvm and the root image artifact; without them the test fails saying so.

use std::path::PathBuf;
use twinbox_spec::proto::{ExitCode, Marker, MARKER_PORT};
use twinbox_spec::{DiskSpec, Outcome, RunSpec};
use vmm::layout::{MMIO_GAP_START, PDPTE_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};

/// Guest-physical address the ELF's single segment is loaded at.
const LOAD: u32 = 0x10_0000;
/// File offset of the program headers.
const PHDR: usize = 0x40;
/// File offset of the code (the entry point).
const CODE: usize = 0x100;
/// Virtqueue pieces, as offsets in the segment (16-byte descriptors, 2-byte ring words).
const DESC: usize = 0x1000;
const AVAIL: usize = 0x1100;
const USED: usize = 0x1200;
const HEADER: usize = 0x1300;
const STATUS: usize = 0x1400;
/// The 512 bytes the guest expects to read (a copy of the disk's sector 0).
const EXPECTED: usize = 0x1800;
/// Where the device puts sector 0.
const DATA: usize = 0x2000;
/// Page directory for the GiB at 0xc000_0000 (page-aligned).
const PD: usize = 0x3000;
const SEGMENT_LEN: usize = PD + 0x1000;
/// Queue size the guest configures (a power of two, below any sane QueueNumMax).
const QUEUE_SIZE: u16 = 4;
/// Spin bound while waiting for the used ring (each round is ~4 emulated instructions).
const SPIN_ROUNDS: u32 = 2_000_000;

/// The extra disk's transport: device 1, right after the root disk's window.
const BASE: u64 = VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

/// Exit codes the guest reports: which check failed.
const OK: u8 = 0;
const E_TIMEOUT: u8 = 1;
const E_STATUS: u8 = 2;
const E_DATA: u8 = 3;
const E_NO_INTERRUPT: u8 = 4;

fn addr(offset: usize) -> u32 {
    LOAD + offset as u32
}

fn marker(code: u8) -> u32 {
    Marker::WorkloadExited(ExitCode::Exited(code)).encode()
}

/// A very small x86-64 assembler: each method emits one documented instruction; jumps are
/// rel32 to labels patched at the end.
#[derive(Default)]
struct Asm {
    bytes: Vec<u8>,
    labels: Vec<(&'static str, usize)>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn emit(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }
    fn emit32(&mut self, v: u32) {
        self.emit(&v.to_le_bytes());
    }
    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.bytes.len()));
    }
    /// `48 b8 <imm64>`: mov rax, imm64.
    fn rax(&mut self, value: u64) {
        self.emit(&[0x48, 0xb8]);
        self.emit(&value.to_le_bytes());
    }
    /// `c7 04 25 <disp32> <imm32>`: mov dword [disp32], imm32 (absolute, below 2 GiB).
    fn store32_low(&mut self, at: u32, value: u32) {
        assert!(at < 0x8000_0000, "disp32 is sign-extended");
        self.emit(&[0xc7, 0x04, 0x25]);
        self.emit32(at);
        self.emit32(value);
    }
    /// `48 b8 <imm64>; c7 00 <imm32>`: mov rax, BASE + reg; mov dword [rax], imm32 (an
    /// aligned 4-byte MMIO write; the window is above 2 GiB, out of disp32's reach).
    fn mmio(&mut self, reg: u64, value: u32) {
        self.rax(BASE + reg);
        self.emit(&[0xc7, 0x00]);
        self.emit32(value);
    }
    /// `0f b7 04 25 <disp32>`: movzx eax, word [disp32].
    fn load16(&mut self, at: u32) {
        self.emit(&[0x0f, 0xb7, 0x04, 0x25]);
        self.emit32(at);
    }
    /// `0f b6 04 25 <disp32>`: movzx eax, byte [disp32].
    fn load8(&mut self, at: u32) {
        self.emit(&[0x0f, 0xb6, 0x04, 0x25]);
        self.emit32(at);
    }
    /// `48 b8 <imm64>; 8b 00`: mov rax, BASE + reg; mov eax, [rax] (an aligned 4-byte MMIO
    /// read).
    fn mmio_read(&mut self, reg: u64) {
        self.rax(BASE + reg);
        self.emit(&[0x8b, 0x00]);
    }
    /// `e9 <rel32>` (jmp) or `0f 8x <rel32>` (jcc, `cc` = the condition nibble).
    fn jump(&mut self, cc: Option<u8>, to: &'static str) {
        match cc {
            None => self.emit(&[0xe9]),
            Some(cc) => self.emit(&[0x0f, 0x80 | cc]),
        }
        self.fixups.push((self.bytes.len(), to));
        self.emit32(0);
    }
    /// `b8 <imm32>; e9 <rel32>`: mov eax, marker(code); jmp report.
    fn fail(&mut self, name: &'static str, code: u8) {
        self.label(name);
        self.emit(&[0xb8]);
        self.emit32(marker(code));
        self.jump(None, "report");
    }
    fn finish(mut self) -> Vec<u8> {
        for (at, to) in &self.fixups {
            let target = self.labels.iter().find(|(n, _)| n == to).unwrap().1;
            let rel = target as i64 - (*at as i64 + 4);
            self.bytes[*at..*at + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        self.bytes
    }
}

const JE: u8 = 0x4;
const JNE: u8 = 0x5;

/// The guest program (64-bit, the Linux 64-bit boot protocol's entry state: long mode,
/// the VMM's identity map of the first GiB, interrupts off).
fn code() -> Vec<u8> {
    let mut a = Asm::default();
    // Map the virtio window: PDPT[3] (the GiB at 0xc000_0000) → the page directory the host
    // put in the segment, whose entry for 0xd000_0000 is an uncached 2 MiB page.
    a.store32_low(PDPTE_START as u32 + 3 * 8, addr(PD) | 0x3); // present, writable
    a.store32_low(PDPTE_START as u32 + 3 * 8 + 4, 0);
    a.emit(&[0x0f, 0x20, 0xd8]); // 0f 20 d8: mov rax, cr3
    a.emit(&[0x0f, 0x22, 0xd8]); // 0f 22 d8: mov cr3, rax (flush the TLB)
                                 // Handshake, in the order the transport enforces.
    a.mmio(REG_STATUS, 0); // reset
    a.mmio(REG_STATUS, ACKNOWLEDGE);
    a.mmio(REG_STATUS, ACKNOWLEDGE | DRIVER);
    a.mmio(REG_DRIVER_FEATURES_SEL, 1); // feature word 1 (bits 32..63)
    a.mmio(REG_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1 (bit 32)
    a.mmio(REG_DRIVER_FEATURES_SEL, 0);
    a.mmio(REG_DRIVER_FEATURES, 0); // nothing from bits 0..31
    a.mmio(REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    // Queue 0: size, the three rings the host prepared, ready.
    a.mmio(REG_QUEUE_SEL, 0);
    a.mmio(REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
    a.mmio(REG_QUEUE_DESC_LOW, addr(DESC));
    a.mmio(REG_QUEUE_DESC_HIGH, 0);
    a.mmio(REG_QUEUE_DRIVER_LOW, addr(AVAIL));
    a.mmio(REG_QUEUE_DRIVER_HIGH, 0);
    a.mmio(REG_QUEUE_DEVICE_LOW, addr(USED));
    a.mmio(REG_QUEUE_DEVICE_HIGH, 0);
    a.mmio(REG_QUEUE_READY, 1);
    a.mmio(REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    // Kick queue 0: the VMM's ioeventfd for this window fires, the event loop runs the device.
    a.mmio(REG_QUEUE_NOTIFY, 0);
    // Bounded spin on used.idx (offset 2 of the used ring) until it becomes 1.
    a.emit(&[0xb9]); // b9 <imm32>: mov ecx, SPIN_ROUNDS
    a.emit32(SPIN_ROUNDS);
    a.label("spin");
    a.load16(addr(USED + 2)); // movzx eax, word [used.idx]
    a.emit(&[0x83, 0xf8, 0x01]); // 83 f8 01: cmp eax, 1
    a.jump(Some(JE), "completed"); // 0f 84: je completed
    a.emit(&[0xff, 0xc9]); // ff c9: dec ecx
    a.jump(Some(JNE), "spin"); // 0f 85: jnz spin
    a.jump(None, "timeout"); // e9: jmp timeout
    a.label("completed");
    // The status byte the device wrote must be VIRTIO_BLK_S_OK (0).
    a.load8(addr(STATUS)); // movzx eax, byte [status]
    a.emit(&[0x85, 0xc0]); // 85 c0: test eax, eax
    a.jump(Some(JNE), "bad_status"); // 0f 85: jnz bad_status
                                     // The 512 bytes read must equal the host's copy of sector 0.
    a.emit(&[0xfc]); // fc: cld
    a.emit(&[0xbe]); // be <imm32>: mov esi, EXPECTED
    a.emit32(addr(EXPECTED));
    a.emit(&[0xbf]); // bf <imm32>: mov edi, DATA
    a.emit32(addr(DATA));
    a.emit(&[0xb9]); // b9 <imm32>: mov ecx, 128 (dwords)
    a.emit32(128);
    a.emit(&[0xf3, 0xa7]); // f3 a7: repe cmpsd
    a.jump(Some(JNE), "bad_data"); // 0f 85: jne bad_data
                                   // The device must have raised its used-buffer interrupt (InterruptStatus bit 0).
    a.mmio_read(REG_INTERRUPT_STATUS); // mov rax, &InterruptStatus; mov eax, [rax]
    a.emit(&[0xa8, 0x01]); // a8 01: test al, 1
    a.jump(Some(JE), "no_interrupt"); // 0f 84: jz no_interrupt
    a.emit(&[0xb8]); // b8 <imm32>: mov eax, marker(OK)
    a.emit32(marker(OK));
    a.label("report");
    a.emit(&[0x66, 0xba]); // 66 ba <imm16>: mov dx, MARKER_PORT
    a.emit(&MARKER_PORT.to_le_bytes());
    a.emit(&[0xef]); // ef: out dx, eax
    a.emit(&[0xb0, 0xfe, 0xe6, 0x64]); // b0 fe e6 64: mov al, 0xfe; out 0x64, al (reset)
    a.emit(&[0xf4, 0xeb, 0xfd]); // f4 eb fd: hlt; jmp hlt
    a.fail("timeout", E_TIMEOUT);
    a.fail("bad_status", E_STATUS);
    a.fail("bad_data", E_DATA);
    a.fail("no_interrupt", E_NO_INTERRUPT);
    a.finish()
}

/// Sector 0 of the test disk: a position-dependent pattern.
fn pattern() -> Vec<u8> {
    (0..512u32)
        .map(|i| (i.wrapping_mul(31) ^ 0xa5) as u8)
        .collect()
}

fn put(f: &mut [u8], at: usize, v: &[u8]) {
    f[at..at + v.len()].copy_from_slice(v);
}

/// One 16-byte split-ring descriptor.
fn descriptor(f: &mut [u8], index: usize, addr: u32, len: u32, flags: u16, next: u16) {
    let at = DESC + 16 * index;
    put(f, at, &u64::from(addr).to_le_bytes());
    put(f, at + 8, &len.to_le_bytes());
    put(f, at + 12, &flags.to_le_bytes());
    put(f, at + 14, &next.to_le_bytes());
}

/// The whole ELF: headers, code, virtqueue, expected data, page directory.
fn elf() -> Vec<u8> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let code = code();
    assert!(
        CODE + code.len() <= DESC,
        "code overlaps the descriptor table"
    );
    let mut f = vec![0u8; SEGMENT_LEN];
    let entry = addr(CODE);
    // ELF64 header.
    put(&mut f, 0, b"\x7fELF\x02\x01\x01");
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut f, 20, &1u32.to_le_bytes()); // e_version
    put(&mut f, 24, &u64::from(entry).to_le_bytes());
    put(&mut f, 32, &(PHDR as u64).to_le_bytes()); // e_phoff
    put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut f, 56, &1u16.to_le_bytes()); // e_phnum
    put(&mut f, 58, &64u16.to_le_bytes()); // e_shentsize

    // One program header: PT_LOAD, the whole file, RWX. No PVH note, so the VMM enters
    // at e_entry through the 64-bit boot protocol.
    for (i, (kind, flags, offset, size)) in
        [(1u32, 7u32, 0usize, SEGMENT_LEN)].into_iter().enumerate()
    {
        let at = PHDR + 56 * i;
        put(&mut f, at, &kind.to_le_bytes());
        put(&mut f, at + 4, &flags.to_le_bytes());
        put(&mut f, at + 8, &(offset as u64).to_le_bytes());
        put(&mut f, at + 16, &u64::from(addr(offset)).to_le_bytes()); // p_vaddr
        put(&mut f, at + 24, &u64::from(addr(offset)).to_le_bytes()); // p_paddr
        put(&mut f, at + 32, &(size as u64).to_le_bytes()); // p_filesz
        put(&mut f, at + 40, &(size as u64).to_le_bytes()); // p_memsz
        put(&mut f, at + 48, &4u64.to_le_bytes()); // p_align
    }
    // The page directory entry mapping the 2 MiB page holding the virtio windows:
    // present, writable, PWT|PCD (uncached), PS (2 MiB).
    let window = VIRTIO_MMIO_START & !0x1f_ffff;
    let index = ((window - MMIO_GAP_START) >> 21) as usize;
    put(&mut f, PD + 8 * index, &(window | 0x9b).to_le_bytes());
    put(&mut f, CODE, &code);
    // The request: header (device-readable), data (device-writable), status
    // (device-writable, its own descriptor).
    descriptor(&mut f, 0, addr(HEADER), 16, NEXT, 1);
    descriptor(&mut f, 1, addr(DATA), 512, NEXT | WRITE, 2);
    descriptor(&mut f, 2, addr(STATUS), 1, WRITE, 0);
    // virtio_blk_outhdr: type VIRTIO_BLK_T_IN (0), reserved, sector 0.
    put(&mut f, HEADER, &0u32.to_le_bytes());
    put(&mut f, HEADER + 8, &0u64.to_le_bytes());
    f[STATUS] = 0xff; // anything but VIRTIO_BLK_S_OK until the device writes it
                      // Avail ring: flags 0, idx 1, ring[0] = descriptor 0.
    put(&mut f, AVAIL + 2, &1u16.to_le_bytes());
    put(&mut f, AVAIL + 4, &0u16.to_le_bytes());
    // Used ring: all zero (idx 0). Data buffer: zero, so a skipped read cannot match.
    put(&mut f, EXPECTED, &pattern());
    f
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Boots the guest with `sector0` as the extra disk's first sector and returns the exit
/// code it reported (panics if it reported none).
fn run_with_sector0(sector0: &[u8]) -> i32 {
    vmm::machine::open_kvm().unwrap_or_else(|e| panic!("this test needs /dev/kvm: {e}"));
    let rootfs = twinbox_spec::artifacts::rootfs_image();
    assert!(
        rootfs.is_file(),
        "this test needs the root image artifact at {} (build it, or set TWINBOX_CACHE)",
        rootfs.display()
    );
    let dir = TempDir(std::env::temp_dir().join(format!(
        "twinbox-tiny-virtio-{}-{:x}",
        std::process::id(),
        twinbox_spec::clock::monotonic_ns()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let kernel = dir.0.join("guest.elf");
    std::fs::write(&kernel, elf()).unwrap();
    // Sector 1 onwards holds something else, so reading the wrong sector fails too.
    let disk = dir.0.join("disk.img");
    let mut image = sector0.to_vec();
    image.extend(std::iter::repeat_n(0x5a, 4096 - 512));
    std::fs::write(&disk, &image).unwrap();

    let mut spec = RunSpec::new(&rootfs, vec!["/bin/true".into()]);
    spec.kernel = Some(kernel);
    spec.memory_mib = 64;
    spec.disks = vec![DiskSpec {
        path: disk,
        read_only: false,
    }];
    spec.time_limit = Some(std::time::Duration::from_secs(120));
    let started = std::time::Instant::now();
    let report = vmm::run(&spec).expect("vmm::run");
    eprintln!(
        "run took {:?}; outcome {:?}",
        started.elapsed(),
        report.outcome
    );
    match report.outcome {
        Outcome::Exited(code) => code,
        other => panic!("guest did not report an exit marker: {other:?}"),
    }
}

fn meaning(code: i32) -> &'static str {
    match u8::try_from(code) {
        Ok(OK) => "ok",
        Ok(E_TIMEOUT) => "used ring idx never became 1 (timeout)",
        Ok(E_STATUS) => "status byte is not VIRTIO_BLK_S_OK",
        Ok(E_DATA) => "data buffer differs from sector 0's pattern",
        Ok(E_NO_INTERRUPT) => "InterruptStatus bit 0 (used buffer) not set",
        _ => "unknown code",
    }
}

#[test]
fn tiny_guest_reads_a_sector_through_a_virtqueue_round_trip() {
    let code = run_with_sector0(&pattern());
    assert_eq!(
        code,
        i32::from(OK),
        "guest reported failure: {}",
        meaning(code)
    );
}

/// The control: the same guest with a disk whose sector 0 differs from what it expects
/// must complete the request and then report a data mismatch, so the success above comes
/// from the bytes the device really read.
#[test]
fn tiny_guest_notices_a_sector_that_differs() {
    let mut other = pattern();
    other[511] ^= 0xff;
    let code = run_with_sector0(&other);
    assert_eq!(
        code,
        i32::from(E_DATA),
        "guest should report a data mismatch, got: {}",
        meaning(code)
    );
}
