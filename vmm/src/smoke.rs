//! The KVM smoke guest: the smallest proof that this host's KVM runs a guest and hands
//! its port I/O to us. Used by `twinbox doctor` and by the lab test.
//!
//! The guest is twelve bytes of 16-bit real-mode code at [`CODE_ADDR`], so it needs no
//! GDT, page tables or boot protocol:
//!
//! ```text
//! ba 20 01            mov  dx, 0x0120      ; the marker port
//! 66 b8 01 00 00 00   mov  eax, 0x00000001 ; Marker::InitStarted
//! 66 ef               out  dx, eax
//! f4                  hlt
//! ```

use kvm_ioctls::{Kvm, VcpuExit};
use std::time::Instant;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest-physical address of the code.
pub const CODE_ADDR: u64 = 0x1000;
const MEMORY_SIZE: usize = 0x10000;
/// The value the guest writes (the encoding of `Marker::InitStarted`).
pub const SMOKE_VALUE: u32 = 1;

fn smoke_code() -> Vec<u8> {
    let port = twinbox_spec::proto::MARKER_PORT.to_le_bytes();
    let value = SMOKE_VALUE.to_le_bytes();
    let mut code = vec![0xba, port[0], port[1], 0x66, 0xb8];
    code.extend_from_slice(&value);
    code.extend_from_slice(&[0x66, 0xef, 0xf4]);
    code
}

/// Why the smoke guest did not run.
#[derive(Debug, Error)]
pub enum SmokeError {
    #[error("/dev/kvm: {0}")]
    OpenKvm(String),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("unexpected exit from the smoke guest: {0}")]
    UnexpectedExit(String),
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SmokeError {
    move |source| SmokeError::Kvm { what, source }
}

/// What the smoke guest did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmokeReport {
    /// The port of the I/O exit.
    pub port: u16,
    /// The 32-bit value written.
    pub value: u32,
    /// The guest then halted.
    pub halted: bool,
    /// Microseconds from opening /dev/kvm to the VM with memory and a vCPU ready.
    pub setup_us: u64,
    /// Microseconds from the first KVM_RUN to the I/O exit.
    pub first_exit_us: u64,
}

/// Runs the smoke guest on this host's KVM.
pub fn run() -> Result<SmokeReport, SmokeError> {
    let started = Instant::now();
    let kvm = Kvm::new().map_err(|e| {
        SmokeError::OpenKvm(match e.errno() {
            libc::ENOENT => "not found — enable VT-x/AMD-V and load kvm_intel or kvm_amd".into(),
            libc::EACCES => {
                "permission denied — run as root or add yourself to the kvm group".into()
            }
            _ => e.to_string(),
        })
    })?;
    let vm = kvm.create_vm().map_err(kvm_error("create a VM"))?;
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)])
        .map_err(|e| SmokeError::Memory(e.to_string()))?;
    memory
        .write_slice(&smoke_code(), GuestAddress(CODE_ADDR))
        .map_err(|e| SmokeError::Memory(e.to_string()))?;
    let host_address = memory
        .get_host_address(GuestAddress(0))
        .map_err(|e| SmokeError::Memory(e.to_string()))?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEMORY_SIZE as u64,
        userspace_addr: host_address as u64,
        flags: 0,
    };
    // SAFETY: the region is `memory`'s own mapping, of exactly MEMORY_SIZE bytes, and
    // `memory` lives until after the VM is dropped (explicit drops at the end).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_error("map guest memory"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm_error("create a vCPU"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(kvm_error("read segment registers"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(kvm_error("set segment registers"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_error("set registers"))?;
    let setup_us = started.elapsed().as_micros() as u64;

    let run_started = Instant::now();
    let (port, value) = match vcpu.run().map_err(kvm_error("run the vCPU"))? {
        VcpuExit::IoOut(port, data) if data.len() == 4 => (
            port,
            u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
        ),
        other => return Err(SmokeError::UnexpectedExit(format!("{other:?}"))),
    };
    let first_exit_us = run_started.elapsed().as_micros() as u64;
    let halted = match vcpu.run().map_err(kvm_error("run the vCPU"))? {
        VcpuExit::Hlt => true,
        other => {
            return Err(SmokeError::UnexpectedExit(format!(
                "{other:?} instead of hlt"
            )))
        }
    };
    drop(vcpu);
    drop(vm);
    drop(memory);
    Ok(SmokeReport {
        port,
        value,
        halted,
        setup_us,
        first_exit_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_the_documented_bytes() {
        assert_eq!(
            smoke_code(),
            [0xba, 0x20, 0x01, 0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x66, 0xef, 0xf4]
        );
    }

    /// Needs nothing but a usable /dev/kvm (any flavour: real mode is emulated fine by
    /// PVM); fails naming what is missing otherwise.
    #[test]
    fn runs_on_this_hosts_kvm() {
        let report = run().unwrap_or_else(|e| {
            panic!("the smoke guest needs a usable /dev/kvm (root or the kvm group): {e}")
        });
        assert_eq!(report.port, twinbox_spec::proto::MARKER_PORT);
        assert_eq!(report.value, SMOKE_VALUE);
        assert!(report.halted);
    }
}
