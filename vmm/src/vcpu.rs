//! vCPU threads: one per vCPU, each looping on KVM_RUN and sending I/O exits to the device
//! buses. A vCPU that stops (guest reset, triple fault, KVM error) reports why and wakes
//! the main thread.
//!
//! Stopping a vCPU from another thread takes one signal, never a retry loop: the stop flag
//! is set first, then the thread gets one kick signal whose handler sets `immediate_exit`
//! in the vCPU's own `kvm_run`. Wherever the signal lands, the thread stops at once:
//! - inside KVM_RUN: the ioctl returns EINTR;
//! - between the flag check and the next KVM_RUN: KVM sees `immediate_exit` and returns
//!   EINTR without entering the guest (the race a bare signal loses, which is why the old
//!   code re-sent it every 200 µs);
//! - inside device code: the next KVM_RUN returns at once, as above.
//!
//! After EINTR the loop clears `immediate_exit` *before* reading the stop flag, so a kick
//! that lands after the clear is still seen by the next KVM_RUN.
//!
//! [`VcpuThread`] stops and joins its thread when dropped, so no early return of the VMM
//! leaves a vCPU running.

use crate::memory::GuestMemoryMmap;
use crate::seccomp::{Filters, ThreadKind};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{compiler_fence, AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
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
    /// The guest ended a level-triggered interrupt with `vector` (KVM_EXIT_IOAPIC_EOI,
    /// split irqchip): the IOAPIC's business.
    fn ioapic_eoi(&self, _vector: u8) {}
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

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, while its vCPU is alive (null otherwise).
    /// Only the owning thread reads it: from its own kick handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with`: a kick delivered while the thread-local is being torn down does nothing.
    let _ = IMMEDIATE_EXIT.try_with(|ptr| {
        let ptr = ptr.get();
        if !ptr.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by `run_loop`
            // while its VcpuFd is alive and cleared before that VcpuFd is dropped; a
            // volatile byte store is async-signal-safe, and KVM reads the byte on entry.
            unsafe { ptr.write_volatile(1) };
        }
    });
}

/// Installs the kick handler once per process.
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
    /// The seccomp filters of the run; the thread installs the vCPU one before its first
    /// KVM_RUN.
    pub seccomp: Filters,
}

/// A running vCPU thread; dropping it stops and joins the thread.
pub struct VcpuThread {
    /// Gives the vCPU back when it stopped on request (for a snapshot).
    handle: Option<JoinHandle<Option<VcpuFd>>>,
    stop: Arc<AtomicBool>,
}

impl VcpuThread {
    /// Starts the thread for `vcpu`.
    pub fn spawn(vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<Self> {
        install_kick_handler();
        let stop = ctx.stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", ctx.id))
            .spawn(move || run_loop(vcpu, ctx))?;
        Ok(Self {
            handle: Some(handle),
            stop,
        })
    }

    /// Sets the (shared) stop flag and kicks this thread once; does not wait.
    pub fn kick(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = &self.handle {
            if !handle.is_finished() {
                // SAFETY: the pthread has not been joined (we hold its handle), so the id
                // is valid; the signal's handler only sets immediate_exit.
                unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
            }
        }
    }

    /// Stops the thread (one kick) and waits for it to end.
    pub fn stop_and_join(mut self) {
        self.join();
    }

    /// Stops the thread (one kick), waits for it to end and returns its vCPU, paused,
    /// unless it had stopped on its own (then it is gone, and the reason was sent).
    pub fn pause(mut self) -> Option<VcpuFd> {
        self.join()
    }

    fn join(&mut self) -> Option<VcpuFd> {
        self.kick();
        match self.handle.take()?.join() {
            Ok(vcpu) => vcpu,
            Err(_) => {
                tracing::error!("a vCPU thread panicked");
                None
            }
        }
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        self.join();
    }
}

/// Returns the vCPU when it stopped on request, so a snapshot can read its state.
fn run_loop(mut vcpu: VcpuFd, mut ctx: VcpuContext) -> Option<VcpuFd> {
    let immediate_exit: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
    let reason = match ctx.seccomp.apply(ThreadKind::Vcpu) {
        Ok(()) => {
            if let Some(first) = ctx.on_first_run.take() {
                first();
            }
            vcpu_loop(&mut vcpu, &mut ctx)
        }
        Err(e) => VcpuStop::Failed {
            vcpu: ctx.id,
            details: e.to_string(),
        },
    };
    // The kvm_run mapping leaves this thread with `vcpu`: the kick handler must not
    // touch it after.
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    if reason == VcpuStop::Requested {
        return Some(vcpu);
    }
    drop(vcpu);
    let _ = ctx.reasons.send(reason);
    let _ = ctx.exit_evt.write(1);
    None
}

fn vcpu_loop(vcpu: &mut VcpuFd, ctx: &mut VcpuContext) -> VcpuStop {
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            return VcpuStop::Requested;
        }
        let exit = vcpu.run();
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => ctx.io.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => ctx.io.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => ctx.io.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => ctx.io.mmio_write(addr, data),
            Ok(VcpuExit::IoapicEoi(vector)) => ctx.io.ioapic_eoi(vector),
            // With the local APIC in the kernel HLT stays there; a bare exit is harmless.
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => return VcpuStop::TripleFault { vcpu: ctx.id },
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return VcpuStop::SystemEvent { vcpu: ctx.id, kind }
            }
            Ok(VcpuExit::InternalError) => {
                if ctx.pvm_workarounds && deliver_int3(vcpu, &ctx.memory) {
                    continue;
                }
                let details = internal_error_details(vcpu, &ctx.memory);
                return VcpuStop::Failed { vcpu: ctx.id, details };
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VcpuStop::Failed {
                    vcpu: ctx.id,
                    details: format!(
                        "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host cpu {cpu})"
                    ),
                }
            }
            Ok(other) => {
                return VcpuStop::Failed {
                    vcpu: ctx.id,
                    details: format!("unexpected KVM exit {other:?}"),
                }
            }
            // A kick: clear immediate_exit before the flag is read again (module docs).
            Err(e) if e.errno() == libc::EINTR => {
                vcpu.set_kvm_immediate_exit(0);
                // Keep the clear before the flag load (a kick's handler runs on this
                // thread, between any two instructions).
                compiler_fence(Ordering::SeqCst);
            }
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => {
                return VcpuStop::Failed { vcpu: ctx.id, details: format!("KVM_RUN failed: {e}") }
            }
        }
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
