//! Which initial ramdisk a guest gets: without `--initrd`, twinbox's initramfs goes only to
//! a Linux kernel; any other kernel (here a freestanding guest, like the bench's tiny
//! guest) boots with none, and one given explicitly is always loaded. What the guest sees
//! is checked: it reads `ramdisk_size` from the zero page the 64-bit boot protocol hands it
//! (in `rsi`) and reports 0 (no ramdisk) or 1 as its exit code on the marker port.
//!
//! NEEDS /dev/kvm (any flavour: PVM is fine, no Linux guest involved).

mod common;

use twinbox_spec::proto::{ExitCode, Marker, MARKER_PORT};
use twinbox_spec::Outcome;

/// Offset of `hdr.ramdisk_size` in the zero page (Documentation/arch/x86/zero-page.rst).
const RAMDISK_SIZE: u32 = 0x21c;

fn exit_marker(code: u8) -> [u8; 4] {
    Marker::WorkloadExited(ExitCode::Exited(code))
        .encode()
        .to_le_bytes()
}

/// Exits 0 when the zero page shows no ramdisk, 1 when it shows one; then resets.
fn ramdisk_probe() -> Vec<u8> {
    let mut code = vec![0x8b, 0x86]; // mov eax, [rsi + RAMDISK_SIZE]
    code.extend(RAMDISK_SIZE.to_le_bytes());
    code.extend([0x85, 0xc0]); // test eax, eax
    code.extend([0x66, 0xba]); // mov dx, MARKER_PORT
    code.extend(MARKER_PORT.to_le_bytes());
    code.push(0xb8); // mov eax, exit 0 (flags untouched)
    code.extend(exit_marker(0));
    code.extend([0x74, 0x05]); // jz +5
    code.push(0xb8); // mov eax, exit 1
    code.extend(exit_marker(1));
    code.push(0xef); // out dx, eax
    code.extend([0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al (reset)
    code.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    code
}

fn exit_code(spec: &twinbox_spec::RunSpec) -> i32 {
    let report = vmm::run(spec).unwrap();
    match report.outcome {
        Outcome::Exited(code) => code,
        other => panic!("the probe guest did not report: {other:?}"),
    }
}

#[test]
fn a_kernel_that_is_not_linux_boots_without_an_initramfs_unless_given_one() {
    common::require_kvm();
    let dir = common::TempDir::new("initrd");
    let mut spec = common::spec_in(&dir.0, &ramdisk_probe());
    spec.time_limit = Some(std::time::Duration::from_secs(60));
    assert_eq!(
        exit_code(&spec),
        0,
        "the guest found a ramdisk it was not given"
    );
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, vec![0x5a; 3000]).unwrap();
    spec.initrd = Some(initrd);
    assert_eq!(
        exit_code(&spec),
        1,
        "the guest did not find the ramdisk it was given"
    );
}
