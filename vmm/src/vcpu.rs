//! vCPU threads: one per vCPU, each looping on KVM_RUN and sending I/O exits to the device
//! buses. A vCPU that stops (guest reset, triple fault, KVM error) reports why and wakes
//! the main thread; the main thread stops the others by setting a flag and kicking them
//! out of KVM_RUN with a signal.

use crate::memory::GuestMemoryMmap;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Where vCPUs send port and memory-mapped I/O.
pub trait IoHandler: Send + Sync {
    /// An `in` from `port`; unclaimed ports read as all ones.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// An `out` to `port`; unclaimed ports are ignored.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// A read of MMIO at `addr`; unmapped addresses read as all ones.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A write of MMIO at `addr`; unmapped addresses are ignored.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why a vCPU stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The main thread asked it to stop.
    Requested,
    /// KVM_EXIT_SHUTDOWN: a triple fault (or the guest's reset through it).
    TripleFault { vcpu: u32 },
    /// KVM_EXIT_SYSTEM_EVENT (reset or shutdown requested through the platform).
    SystemEvent { vcpu: u32, kind: u32 },
    /// KVM could not emulate something, or refused entry, or an ioctl failed: the details.
    Failed { vcpu: u32, details: String },
}

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only makes KVM_RUN return EINTR.
}

/// Installs the (empty) kick handler once per process.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        register_signal_handler(kick_signal(), on_kick).expect("SIGRTMIN is a valid signal");
    });
}

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    /// Index (= APIC ID).
    pub id: u32,
    /// Devices.
    pub io: Arc<dyn IoHandler>,
    /// Guest memory, to show the bytes at RIP when the guest dies.
    pub memory: GuestMemoryMmap,
    /// Set by the main thread to stop every vCPU.
    pub stop: Arc<AtomicBool>,
    /// Written when this vCPU stops on its own.
    pub exit_evt: EventFd,
    /// Where the reason goes.
    pub reasons: Sender<VcpuStop>,
    /// Called once before the first KVM_RUN of this vCPU (stamps guest_entry for vCPU 0).
    pub on_first_run: Option<Box<dyn FnOnce() + Send>>,
    /// Work around PVM's kernel-mode emulator: deliver an `int3` it cannot execute as
    /// the #BP exception it would have raised (see docs/vm-on-pvm.md).
    pub pvm_workarounds: bool,
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Starts the thread for `vcpu`.
    pub fn spawn(vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<Self> {
        install_kick_handler();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", ctx.id))
            .spawn(move || run_loop(vcpu, ctx))?;
        Ok(Self { handle })
    }

    /// Kicks the thread out of KVM_RUN until it has exited, then joins it.
    pub fn stop_and_join(self) {
        while !self.handle.is_finished() {
            // SAFETY: the pthread is alive (not finished and not joined: we hold the handle);
            // the signal has a handler installed, so it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(self.handle.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = self.handle.join();
    }
}

fn run_loop(mut vcpu: VcpuFd, mut ctx: VcpuContext) {
    if let Some(first) = ctx.on_first_run.take() {
        first();
    }
    let reason = loop {
        if ctx.stop.load(Ordering::Acquire) {
            break VcpuStop::Requested;
        }
        let exit = vcpu.run();
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => ctx.io.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => ctx.io.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => ctx.io.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => ctx.io.mmio_write(addr, data),
            // With the in-kernel irqchip HLT stays in the kernel; a bare exit is harmless.
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => break VcpuStop::TripleFault { vcpu: ctx.id },
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                break VcpuStop::SystemEvent { vcpu: ctx.id, kind }
            }
            Ok(VcpuExit::InternalError) => {
                if ctx.pvm_workarounds && deliver_int3(&mut vcpu, &ctx.memory) {
                    continue;
                }
                let details = internal_error_details(&mut vcpu, &ctx.memory);
                break VcpuStop::Failed { vcpu: ctx.id, details };
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break VcpuStop::Failed {
                    vcpu: ctx.id,
                    details: format!(
                        "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host cpu {cpu})"
                    ),
                }
            }
            Ok(other) => {
                break VcpuStop::Failed {
                    vcpu: ctx.id,
                    details: format!("unexpected KVM exit {other:?}"),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                break VcpuStop::Failed { vcpu: ctx.id, details: format!("KVM_RUN failed: {e}") }
            }
        }
    };
    if reason != VcpuStop::Requested {
        let _ = ctx.reasons.send(reason);
        let _ = ctx.exit_evt.write(1);
    }
}

/// The guest-physical address of the vCPU's RIP, if it is mapped.
fn rip_physical(vcpu: &VcpuFd) -> Option<(u64, u64)> {
    let regs = vcpu.get_regs().ok()?;
    let t = vcpu.translate_gva(regs.rip).ok()?;
    (t.valid != 0).then_some((regs.rip, t.physical_address))
}

/// PVM's emulator cannot execute `int3` at CPL0 (KVM_EXIT_INTERNAL_ERROR). Linux runs one
/// at boot (the alternatives int3 self-test) and relies on int3 for text patching. When the
/// failing instruction is `int3`, do what the CPU would have done: the trap leaves RIP
/// after the instruction and raises #BP, which KVM injects on the next entry.
fn deliver_int3(vcpu: &mut VcpuFd, memory: &GuestMemoryMmap) -> bool {
    let Some((_, phys)) = rip_physical(vcpu) else {
        return false;
    };
    let mut byte = [0u8; 1];
    if memory.read_slice(&mut byte, GuestAddress(phys)).is_err() || byte[0] != 0xcc {
        return false;
    }
    let (Ok(mut regs), Ok(mut events)) = (vcpu.get_regs(), vcpu.get_vcpu_events()) else {
        return false;
    };
    regs.rip += 1;
    events.exception.injected = 1;
    events.exception.nr = 3;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    vcpu.set_regs(&regs).is_ok() && vcpu.set_vcpu_events(&events).is_ok()
}

/// Describes a KVM_EXIT_INTERNAL_ERROR: suberror, KVM's data words, RIP and the
/// instruction bytes there (what PVM's emulator could not run).
fn internal_error_details(vcpu: &mut VcpuFd, memory: &GuestMemoryMmap) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: KVM filled the `internal` member of the union for KVM_EXIT_INTERNAL_ERROR.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal.data[..n]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    let suberror = match internal.suberror {
        1 => "instruction emulation failed",
        2 => "simultaneous exceptions",
        3 => "delivery event failed",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    };
    let mut text = format!(
        "KVM internal error {} ({suberror}), data [{}]",
        internal.suberror,
        data.join(", ")
    );
    if let Ok(regs) = vcpu.get_regs() {
        text.push_str(&format!(", rip {:#x}", regs.rip));
        if let Ok(t) = vcpu.translate_gva(regs.rip) {
            if t.valid != 0 {
                let mut bytes = [0u8; 15];
                if memory
                    .read_slice(&mut bytes, GuestAddress(t.physical_address))
                    .is_ok()
                {
                    text.push_str(&format!(", code {bytes:02x?}"));
                }
            }
        }
    }
    text
}
