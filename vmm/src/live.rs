//! The life of a built VM, the same whichever way it began (a boot in `lib.rs`, a snapshot
//! taken or restored in `snapshot/`): its threads started ([`start_guest_threads`], owned
//! by [`Running`]), the wait for its end ([`wait_for_end`]), and the teardown into a
//! report ([`Ending::finish`]).

use crate::devices::DeviceSet;
use crate::vcpu::{VcpuContext, VcpuStop, VcpuThread};
use crate::{
    console, event_loop, jail, lock, memory, seccomp, stdio, usage, Config, Error, Network,
};
use kvm_ioctls::{VcpuFd, VmFd};
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use twinbox_spec::{BoxKind, MarkerLog, Phase, RunReport, Usage};
use vmm_sys_util::eventfd::EventFd;

/// The threads of a run besides the caller's: the console writer, the vCPUs and the device
/// event loop. Dropping it stops and joins them all, on every path out of a run.
#[derive(Default)]
pub(crate) struct Running {
    /// The serial console's writers (the `--console-log` file, stderr with `--verbose`).
    pub(crate) console: Vec<console::StdoutWriter>,
    pub(crate) vcpus: Vec<VcpuThread>,
    pub(crate) events: Option<event_loop::EventLoop>,
    /// The stdio pumps; taken out before the drop on the normal path (see [`Ending::finish`]).
    pub(crate) stdio: Option<stdio::GuestStdio>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The console first: a vCPU waiting for room in its queue goes on, and reaches
        // the KVM_RUN its kick makes return.
        self.console.iter().for_each(console::StdoutWriter::close);
        // Kick all, then join each: the vCPUs stop in parallel.
        self.vcpus.iter().for_each(VcpuThread::kick);
        self.vcpus.clear();
        self.events.take();
        // Then what the stopped vCPUs queued is flushed (bounded, see console.rs).
        self.console.clear();
        self.stdio.take();
    }
}

/// Runs `start` (which starts a thread) on the jail's thread when there is a jail, so the
/// new thread is jailed too; else here.
pub(crate) fn start<T: Send + 'static>(
    jail: Option<&jail::Jail>,
    start: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    match jail {
        Some(jail) => Ok(jail.run(start)?),
        None => Ok(start()),
    }
}

/// Starts the device event loop and one thread per vCPU (jailed when there is a jail);
/// the first vCPU stamps `guest_entry` as it first enters the guest.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_guest_threads(
    config: &Config,
    jail: Option<&jail::Jail>,
    devices: &DeviceSet,
    guest_memory: &memory::GuestMemoryMmap,
    vcpu_fds: Vec<VcpuFd>,
    exit_evt: &EventFd,
    stop_flag: &Arc<AtomicBool>,
    reasons_tx: &std::sync::mpsc::Sender<VcpuStop>,
    markers: &Arc<Mutex<MarkerLog>>,
    running: &mut Running,
) -> Result<(), Error> {
    let (subscribers, failed) = (
        devices.subscribers.clone(),
        exit_evt.try_clone().map_err(Error::Thread)?,
    );
    let filters = config.seccomp.clone();
    running.events = Some(
        start(jail, move || {
            event_loop::EventLoop::start(subscribers, failed, move || {
                filters
                    .apply(seccomp::ThreadKind::EventLoop)
                    .map_err(|e| e.to_string())
            })
        })?
        .map_err(Error::Thread)?,
    );
    for (id, fd) in vcpu_fds.into_iter().enumerate() {
        let first_run: Option<Box<dyn FnOnce() + Send>> = (id == 0).then(|| {
            let markers = markers.clone();
            Box::new(move || lock(&markers).timeline_mut().record_now(Phase::GuestEntry))
                as Box<dyn FnOnce() + Send>
        });
        let ctx = VcpuContext {
            id: id as u32,
            io: devices.io.clone(),
            memory: guest_memory.clone(),
            stop: stop_flag.clone(),
            exit_evt: exit_evt.try_clone().map_err(Error::Thread)?,
            reasons: reasons_tx.clone(),
            on_first_run: first_run,
            pvm_workarounds: config.pvm,
            seccomp: config.seccomp.clone(),
        };
        running
            .vcpus
            .push(start(jail, move || VcpuThread::spawn(fd, ctx))?.map_err(Error::Thread)?);
    }
    Ok(())
}

/// What ended the run, seen from the main thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The guest reset the machine through the i8042 (init's power-off with `reboot=k`).
    Reset,
    /// A vCPU stopped on its own (triple fault, KVM error).
    VcpuStopped,
    /// The caller asked to stop.
    Stopped,
    /// The time limit passed.
    TimeLimit,
}

/// Waits for the first of: guest reset, vCPU stop, caller's stop, time limit.
pub(crate) fn wait_for_end<S: AsRawFd + ?Sized>(
    reset: &EventFd,
    vcpu_exit: &EventFd,
    stop: Option<&S>,
    limit: Option<Duration>,
) -> Ended {
    let started = Instant::now();
    let mut fds = vec![
        libc::pollfd {
            fd: reset.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: vcpu_exit.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    if let Some(stop) = stop {
        fds.push(libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    loop {
        let timeout_ms = match limit {
            Some(limit) => match limit.checked_sub(started.elapsed()) {
                Some(left) => left.as_millis().min(i32::MAX as u128) as i32,
                None => return Ended::TimeLimit,
            },
            None => -1,
        };
        // SAFETY: `fds` is a valid pollfd array for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            continue; // EINTR (a signal): look again.
        }
        if fds[0].revents != 0 {
            return Ended::Reset;
        }
        if fds[1].revents != 0 {
            return Ended::VcpuStopped;
        }
        if fds.get(2).is_some_and(|f| f.revents != 0) {
            return Ended::Stopped;
        }
    }
}

/// Why the box ended, for the outcome when the workload reported no exit (the marker
/// log appends the last phase reached).
pub(crate) fn why_it_ended(
    ended: Ended,
    stopped: &[VcpuStop],
    event_loop_failure: Option<String>,
    limit: Option<Duration>,
) -> String {
    match ended {
        Ended::Reset => "the guest reset before the workload reported its exit".to_owned(),
        Ended::Stopped => "stopped by a signal".to_owned(),
        Ended::TimeLimit => format!(
            "time limit of {:.1} s reached",
            limit.unwrap_or_default().as_secs_f64()
        ),
        Ended::VcpuStopped => match (stopped.first(), event_loop_failure) {
            (Some(VcpuStop::TripleFault { vcpu }), _) => {
                format!("guest triple-faulted (vCPU {vcpu}): the kernel crashed early")
            }
            (Some(VcpuStop::SystemEvent { vcpu, kind }), _) => {
                format!("guest asked for system event {kind} (vCPU {vcpu})")
            }
            (Some(VcpuStop::Failed { vcpu, details }), _) => format!("vCPU {vcpu}: {details}"),
            (_, Some(failure)) => failure,
            (Some(VcpuStop::Requested) | None, None) => "a vCPU stopped".to_owned(),
        },
    }
}

/// Everything a run holds once its guest runs. The order in which these go at the end is
/// the teardown's whole point, so [`Ending::finish`] writes it once for a boot and a
/// restore.
pub(crate) struct Ending {
    pub vm: Arc<VmFd>,
    pub devices: DeviceSet,
    pub guest_memory: memory::GuestMemoryMmap,
    /// A boot's 2 MiB aligned host mappings of guest RAM, unmapped last; a restore maps
    /// its memory file instead.
    pub ram_mappings: Option<memory::RamMappings>,
    pub running: Running,
    pub markers: Arc<Mutex<MarkerLog>>,
    pub exit_evt: EventFd,
    pub reasons: Receiver<VcpuStop>,
    /// The run's tap and lease (`--net`), released after the VM.
    pub network: Option<Network>,
}

/// What the report counts besides the run's own parts.
pub(crate) struct Accounting<'a> {
    pub probe: &'a usage::Probe,
    pub notes: Vec<String>,
    pub cpu_before: (u64, u64),
    /// The run's time limit, if any.
    pub limit: Option<Duration>,
}

impl Ending {
    /// 7–9. Runs until something ends the VM (guest reset, a vCPU or the event loop
    /// stopping, `stop`, the time limit), tears it down and reports.
    pub fn finish<S: AsRawFd + ?Sized>(
        self,
        stop: Option<&S>,
        accounting: Accounting<'_>,
    ) -> RunReport {
        let Ending {
            vm,
            devices,
            guest_memory,
            ram_mappings,
            mut running,
            markers,
            exit_evt,
            reasons,
            network,
        } = self;
        let Accounting {
            probe,
            mut notes,
            cpu_before,
            limit,
        } = accounting;
        let ended = wait_for_end(&devices.reset_evt, &exit_evt, stop, limit);

        // 8. Teardown: threads first, then the guest's memory is measured, then everything
        //    is dropped (VM fd before the memory it maps).
        let event_loop_failure = running.events.as_ref().and_then(|e| e.failure());
        let guest_stdio = running.stdio.take();
        drop(running);
        // What the workload wrote just before the end and the device had not moved yet.
        notes.extend(devices.flush_output());
        let guest_rss = probe.resident_kib_of(
            &memory::host_ranges(&guest_memory)
                .iter()
                .map(|r| r.0)
                .collect::<Vec<_>>(),
        );
        let peak = probe.peak_rss_kib();
        // The vCPUs' references to the VM went with their threads and the IOAPIC's is
        // weak, so this is the last: the VM is destroyed here, with every irqfd and
        // ioeventfd at once (the devices' eventfds closed one by one first would each be
        // retired on their own).
        if Arc::into_inner(vm).is_none() {
            tracing::error!("the VM outlives its teardown: a reference to it is still held");
        }
        drop(devices);
        drop(guest_memory);
        drop(ram_mappings);
        // The device's pipe ends are closed now: the pumps drain what is left and end.
        let captured = guest_stdio.and_then(stdio::GuestStdio::finish);
        // The device's tap fd went with the devices; this closes the last one (the
        // interface goes) and then frees the lease.
        let network = network.map(|n| n.info);
        let log = Arc::try_unwrap(markers)
            .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or_else(|shared| lock(&shared).clone());
        let stopped: Vec<VcpuStop> = reasons.try_iter().collect();
        let mut finished = log.finish(|| why_it_ended(ended, &stopped, event_loop_failure, limit));
        finished.timeline.record_now(Phase::TornDown);
        notes.extend(finished.notes);
        let cpu_after = usage::cpu_times_us();

        // 9. The report.
        RunReport {
            box_kind: BoxKind::Vm,
            outcome: finished.outcome,
            timeline: finished.timeline,
            output: captured,
            usage: Usage {
                runtime_peak_rss_kib: peak.zip(guest_rss).map(|(p, g)| p.saturating_sub(g)),
                guest_memory_touched_kib: guest_rss,
                cpu_user_us: Some(cpu_after.0.saturating_sub(cpu_before.0)),
                cpu_system_us: Some(cpu_after.1.saturating_sub(cpu_before.1)),
                ..Usage::default()
            },
            notes,
            network,
        }
    }
}
