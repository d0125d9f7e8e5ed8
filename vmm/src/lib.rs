//! The twinbox microVM monitor (see docs/ARCHITECTURE.md).
//!
//! [`run_with`] tells the whole story of one VM, top to bottom, in small named steps:
//!
//! 1. **config** — check the spec, the files (kernel, ext4 root, disks) and guest memory
//!    against host RAM, and compile the seccomp filters, before any VM exists, so bad input
//!    costs nothing and leaves nothing behind;
//!    1a. **cgroup** ([`run_in_own_cgroup`]) — sweep what killed runs left, then move this
//!    process into a fresh cgroup sized to guest RAM plus overhead (`cgroup.rs`), before
//!    guest memory exists; it moves back and removes the cgroup when the run ends;
//!    1b. **network** (`--net`) — lease a /30, make the tap `tbt<i>` on the host (before
//!    any thread is jailed), NAT with `--net nat`;
//!    1c. **jail** (with [`RunOptions::jail`]) — its thread starts and jails itself while
//!    steps 2–4 go on (`jail.rs`);
//! 2. **machine** — open /dev/kvm, create the VM with a split irqchip (local APICs in KVM,
//!    the IOAPIC emulated here, `ioapic.rs`; no PIC, no PIT: cheap to create and destroy);
//! 3. **memory** — map guest RAM around the 32-bit MMIO gap, 2 MiB aligned on the host so
//!    that the host's huge pages can back it, and register it with KVM, on a
//!    thread of its own while steps 4–6 go on (KVM waits for a grace period there);
//! 4. **kernel** — load vmlinux (PVH) or bzImage (64-bit protocol), initrd, MP table
//!    (ACPI tables follow the devices in step 5: they list them);
//! 5. **devices** — the IOAPIC, serial (through the console writer thread when it goes to
//!    stdout), i8042, phase marker, then through one registration each: virtio-blk root and extra
//!    disks, virtio-net over the tap (`--net`, made in step 1b), virtio-rng; their
//!    `virtio_mmio.device=` entries join the command line, which is written last, with the
//!    link's addresses in the job;
//! 6. **vCPUs** — CPUID, boot registers, one thread each; the device event loop thread;
//!    each thread installs its seccomp filter first; with [`RunOptions::jail`] they are
//!    started from the jail (`jail.rs`);
//! 7. **run** — wait for the guest to reset, a vCPU or the event loop to stop, the time
//!    limit or a stop request; phases arrive from init through the marker device meanwhile;
//! 8. **teardown** — stop and join every thread (one kick each, `immediate_exit`), close
//!    the VM, unmap memory; every thread is owned by `Running`, whose drop does the same
//!    on any early return;
//! 9. **report** — timeline and outcome from init's markers through the one interpreter
//!    both boxes share (`twinbox_spec::outcome`), usage, notes.
//!
//! Steps 6–9 are `live.rs`, which a snapshot's take and restore (`snapshot/`) share.

// Public: what the CLI, the bench and vmm/tests use (see docs/ARCHITECTURE.md).
pub mod cgroup;
pub mod cpuid;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod regs;
pub mod seccomp;
pub mod smoke;
pub mod snapshot;
pub mod vcpu;

// Internal: the details one module away from the story below.
pub(crate) mod acpi;
pub(crate) mod boot;
pub(crate) mod console;
pub(crate) mod devices;
pub(crate) mod event_loop;
pub(crate) mod ioapic;
pub(crate) mod jail;
pub(crate) mod live;
pub(crate) mod mptable;
pub(crate) mod rootfs;
pub(crate) mod stdio;
pub(crate) mod usage;

use crate::boot::cmdline::{self, KernelCmdline, VirtioMmioEntry};
use crate::cpuid::Profile;
use crate::live::{start, Running};
use crate::machine::BootEntry;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use twinbox_spec::clock::monotonic_ns;
use twinbox_spec::guest_cmdline;
use twinbox_spec::proto::{Marker, MarkerChannel, MARKER_PORT};
use twinbox_spec::{MarkerLog, Phase, RunReport, RunSpec, SpecError};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// The note every report from a PVM host carries.
pub const PVM_NOTE: &str = "host KVM is PVM: guest kernel code is emulated; VM timings are not \
                            representative of VT-x/AMD-V hosts";

/// Time limit applied on PVM hosts when the caller gave none: a Linux boot there takes
/// minutes or dies; a run must end with a message, never hang.
pub const PVM_DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(300);

/// Why a VM could not be run. Each message is one line a user can act on.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{0}")]
    MissingArtifact(String),
    #[error(transparent)]
    File(#[from] rootfs::FileError),
    #[error(transparent)]
    Image(#[from] twinbox_spec::image::ImageError),
    #[error(transparent)]
    Machine(#[from] machine::MachineError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cmdline(#[from] cmdline::CmdlineError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Devices(#[from] devices::DeviceError),
    #[error("cannot write the MP table at {addr:#x}: {source}")]
    MpTable {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("-t: the caller's terminal: {0}")]
    Terminal(std::io::Error),
    #[error("--console-log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("job for twinbox-init: {0}")]
    Job(String),
    #[error("cannot start a VMM thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Net(#[from] hostnet::Error),
    #[error("--net needs CAP_NET_ADMIN (it makes a tap and a host address), which this process lacks — run as root with it")]
    NoNetAdmin,
    #[error("cannot open /proc/self/status or /proc/self/smaps to measure the run: {0}")]
    Usage(std::io::Error),
    #[error("{0}")]
    Snapshot(String),
}

/// How the caller wants a run done, beyond the spec.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Put the caller's thread under the `Caller` seccomp filter once the VM runs. Only
    /// for a caller that, after the run, just prints the report and exits (the CLI): the
    /// filter stays on the thread for good.
    pub lock_caller_thread: bool,
    /// Start the guest-facing threads in the jail (`jail.rs`): empty root, new mount/IPC/
    /// network namespaces, no capabilities, uid/gid 65534. Needs root.
    pub jail: bool,
    /// What a system call outside a thread's seccomp list does; `None`: what
    /// `TWINBOX_VMM_SECCOMP` says, else kill the process (see `seccomp.rs`).
    pub seccomp: Option<seccomp::Mode>,
}

/// Runs `spec` in a microVM and reports how it went.
pub fn run(spec: &RunSpec) -> Result<RunReport, Error> {
    run_until::<EventFd>(spec, None)
}

/// Like [`run`], but also stops (cleanly) when `stop` becomes readable — e.g. the fd of
/// `twinbox_spec::interrupt::Interrupt`.
///
/// `stop` is any pollable fd: an `EventFd`, or the `BorrowedFd` of
/// `twinbox_spec::interrupt::Interrupt::fd`.
pub fn run_until<S: AsRawFd + ?Sized>(
    spec: &RunSpec,
    stop: Option<&S>,
) -> Result<RunReport, Error> {
    run_with(spec, stop, RunOptions::default())
}

/// Like [`run_until`], with [`RunOptions`].
pub fn run_with<S: AsRawFd + ?Sized>(
    spec: &RunSpec,
    stop: Option<&S>,
    options: RunOptions,
) -> Result<RunReport, Error> {
    run_inner(spec, stop, options, false)
}

/// Like [`run_with`], with this whole process moved into a cgroup of its own for the run
/// (`cgroup.rs`): memory limited to guest RAM plus [`cgroup::overhead_mib`], no swap, a few
/// tasks; moved back and the cgroup removed at the end, on every path; a killed run's
/// cgroup is swept by the next run of either box. Only for a caller that is the VMM alone
/// (the CLI), never a bench or a test running VMs in-process: it is its own entry point,
/// not a [`RunOptions`] field a default could set, so that such a caller cannot move
/// itself by accident. Needs root and the memory and pids controllers.
pub fn run_in_own_cgroup<S: AsRawFd + ?Sized>(
    spec: &RunSpec,
    stop: Option<&S>,
    options: RunOptions,
) -> Result<RunReport, Error> {
    run_inner(spec, stop, options, true)
}

/// With `-t`, the Interrupt that raw mode lives under: SIGINT/SIGTERM then end the run
/// normally and the caller's terminal is restored on every path.
pub(crate) fn tty_interrupt(
    spec: &RunSpec,
) -> Result<Option<twinbox_spec::interrupt::Interrupt>, Error> {
    spec.tty
        .then(twinbox_spec::interrupt::Interrupt::install)
        .transpose()
        .map_err(Error::Thread)
}

/// The caller's terminal in raw mode, the watcher of its resizes and the fd that wakes on
/// one: what [`caller_terminal`] sets up for `-t`.
pub(crate) type CallerTerminal<'a> = (
    Option<twinbox_spec::terminal::RawMode<'a>>,
    Option<twinbox_spec::terminal::ResizeWatcher>,
    Option<std::os::fd::OwnedFd>,
);

/// With `-t`, the caller's terminal made raw under `interrupt`, the watcher of its
/// resizes and the fd that wakes on one (for the stdio pumps); all `None` without `-t`.
pub(crate) fn caller_terminal<'a>(
    spec: &RunSpec,
    interrupt: &'a Option<twinbox_spec::interrupt::Interrupt>,
) -> Result<CallerTerminal<'a>, Error> {
    let raw = match interrupt {
        Some(interrupt) => twinbox_spec::terminal::RawMode::enable(
            twinbox_spec::terminal::caller_stdio()[0],
            interrupt,
        )
        .map_err(Error::Terminal)?,
        None => None,
    };
    let resizes = spec
        .tty
        .then(twinbox_spec::terminal::ResizeWatcher::install)
        .transpose()
        .map_err(Error::Terminal)?;
    let resized = resizes
        .as_ref()
        .map(|w| w.fd().try_clone_to_owned())
        .transpose()
        .map_err(Error::Terminal)?;
    Ok((raw, resizes, resized))
}

/// [`run_with`], in the VMM's own cgroup when `own_cgroup`.
fn run_inner<S: AsRawFd + ?Sized>(
    spec: &RunSpec,
    stop: Option<&S>,
    options: RunOptions,
    own_cgroup: bool,
) -> Result<RunReport, Error> {
    let config = Config::check(spec, options, own_cgroup)?;
    let probe = usage::Probe::open().map_err(Error::Usage)?;
    let mut notes = Vec::new();
    if config.pvm {
        notes.push(PVM_NOTE.to_owned());
    }
    let cpu_before = usage::cpu_times_us();

    // -t: the caller's terminal is raw for the run (Ctrl-C becomes a byte for the guest's
    //     pty, not our SIGINT) and resizes are forwarded (declared in this order, the
    //     terminal is restored before the Interrupt goes, on every path).
    let tty_interrupt = tty_interrupt(spec)?;
    let (_raw_terminal, _resizes, resized) = caller_terminal(spec, &tty_interrupt)?;

    // 1a. The VMM's cgroup, before guest memory exists, so that all of it is charged
    //     there. Declared first among the run's resources, it drops last: the process
    //     leaves the cgroup once everything else is gone, on every path.
    let _cgroup = own_cgroup
        .then(|| cgroup::VmmCgroup::enter(cgroup::Limits::for_vm(spec.memory_mib, spec.vcpus)))
        .transpose()?;

    // 1b. The network link (`--net`), in the host's network namespace and before any thread
    //     is jailed (the jail has a network namespace of its own). The tap and its lease
    //     are owned here and by the device's fd, so they vanish with the VMM, SIGKILL too.
    let network = spec.net.map(Network::create).transpose()?;
    if let Some(reason) = network.as_ref().and_then(|n| n.resolver_missing.clone()) {
        notes.push(format!("network: no resolver in the box: {reason}"));
    }

    // The guest-facing threads are started from the jail when asked (this thread, which
    // opens every file, stays outside). Its thread jails itself while this one builds the
    // VM below (on another CPU where there is one), born inside the cgroup, after the
    // host-side link exists; it is waited for before the first jailed thread starts.
    let pending_jail = options.jail.then(jail::Jail::start).transpose()?;

    // 2–3. The machine and its memory.
    let kvm = machine::open_kvm()?;
    machine::check_vcpus(&kvm, spec.vcpus)?;
    // Memory before the VM, so that on an early return (locals drop in reverse) the VM
    // goes first and never outlives the memory registered with it. Its host mappings are
    // 2 MiB aligned (see `memory::create_aligned`); `ram_mappings` unmaps them last.
    let (ram_mappings, guest_memory) = memory::create_aligned(spec.memory_mib)?;
    // Shared with the IOAPIC, which changes the VM's interrupt routes; the last reference
    // is dropped at teardown (step 8), and that destroys the VM.
    let vm = Arc::new(machine::create_vm(&kvm)?);
    // KVM takes the memory while the kernel is loaded and the devices are built; waited
    // for before the vCPUs start (and by its drop on an early return).
    let registration = memory::Registration::start(vm.clone(), guest_memory.clone())?;

    // 4. Kernel, initrd, platform tables.
    let kernel = boot::load_kernel(&guest_memory, &config.kernel)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|p| boot::load_initrd(&guest_memory, p))
        .transpose()?;
    write_mptable(&guest_memory, spec.vcpus)?;

    // 5. Devices; the marker callback stamps phases on the vCPU thread that wrote them.
    let markers = Arc::new(Mutex::new(MarkerLog::new(spec.spawn_ns)));
    // Owns every thread besides this one from here on: any early return stops and joins
    // them (see `Running`).
    let mut running = Running::default();
    let jail = pending_jail.map(jail::PendingJail::ready).transpose()?;
    let console_out = serial_console(spec, jail.as_ref(), &config.seccomp, &mut running)?;
    // The workload's stdio and the job travel over the console device's ports (see
    // stdio.rs); the pumps run jailed like the other guest-facing threads.
    let job = guest_job(spec, network.as_ref().map(|n| n.config))?;
    let (guest_stdio, stdio_ends) = {
        let (spec, job, filters) = (spec.clone(), job.clone(), config.seccomp.clone());
        start(jail.as_ref(), move || {
            stdio::GuestStdio::start(
                &spec,
                &job,
                resized,
                Arc::new(move || {
                    filters
                        .apply(seccomp::ThreadKind::Console)
                        .map_err(|e| e.to_string())
                }),
            )
        })?
        .map_err(Error::Thread)?
    };
    running.stdio = Some(guest_stdio);
    let devices = devices::attach(
        &vm,
        &guest_memory,
        devices::DeviceConfig {
            // The MP table gives the IOAPIC the first APIC ID after the vCPUs'.
            ioapic_id: spec.vcpus as u8,
            rootfs: &spec.rootfs,
            disks: &spec.disks,
            console: console_out,
            on_marker: marker_callback(markers.clone()),
            net: network.as_ref().map(Network::device_link).transpose()?,
            stdio: stdio_ends,
        },
    )?;

    // ACPI tables (for kernels with ACPI; the MP table above serves the others) list the
    // devices too.
    acpi::write(&guest_memory, spec.vcpus, &devices.cmdline_entries)?;
    // The command line comes last: it lists the devices.
    let line = kernel_cmdline(spec, &config, &devices.cmdline_entries)?;
    boot::params::write_cmdline(&guest_memory, &line)?;
    let ram = memory::total_size(&guest_memory);
    let boot_info =
        boot::params::write_boot_info(&guest_memory, &kernel, line.len() + 1, initrd, ram)?;
    regs::write_boot_tables(&guest_memory, kernel.mode)?;

    // 6. vCPUs and the event loop.
    let profile = if config.pvm {
        Profile::Pvm
    } else {
        Profile::Host
    };
    let entry = BootEntry {
        mode: kernel.mode,
        rip: kernel.rip,
        boot_info,
    };
    let vcpu_fds = machine::create_vcpus(&kvm, &vm, spec.vcpus, profile, entry)?;
    registration.wait()?;
    // /dev/kvm itself is not needed any more: close it before any guest-facing thread
    // shares this fd table.
    drop(kvm);
    lock(&markers)
        .timeline_mut()
        .record_now(Phase::SandboxReady);

    // A vCPU that stops on its own, or a dead event loop, ends the run through this.
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Thread)?;
    let stop_flag = Arc::new(AtomicBool::new(false));
    let (reasons_tx, reasons) = channel();
    live::start_guest_threads(
        &config,
        jail.as_ref(),
        &devices,
        &guest_memory,
        vcpu_fds,
        &exit_evt,
        &stop_flag,
        &reasons_tx,
        &markers,
        &mut running,
    )?;
    drop(jail); // its thread ends; the threads it started stay jailed

    // 7. Run until something ends it. With `--net` the caller's thread stays unfiltered:
    //    after the VM it removes the tap and frees the lease (netlink, unlink, flock), which
    //    the caller's list does not hold; the guest-facing threads are filtered either way.
    if options.lock_caller_thread && network.is_none() {
        config.seccomp.apply(seccomp::ThreadKind::Caller)?;
    }
    // 8–9. Teardown and report (`live.rs`, as after a restore).
    let ending = live::Ending {
        vm,
        devices,
        guest_memory,
        ram_mappings: Some(ram_mappings),
        running,
        markers,
        exit_evt,
        reasons,
        network,
    };
    let limit = spec
        .time_limit
        .or(config.pvm.then_some(PVM_DEFAULT_TIME_LIMIT));
    Ok(ending.finish(
        stop,
        live::Accounting {
            probe: &probe,
            notes,
            cpu_before,
            limit,
        },
    ))
}

/// Whether this process has CAP_NET_ADMIN in its effective set, as the kernel shows it;
/// unreadable counts as "yes", so the kernel's own refusal (one line from hostnet) stays
/// the last word.
fn has_net_admin() -> bool {
    /// Its bit number (linux/capability.h).
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_none_or(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// 1b. The run's link with the host (`--net`): a leased /30, the tap `tbt<i>` addressed
///     and up on the host, NAT with `--net nat`, and what init needs to configure eth0.
struct Network {
    /// Owns the interface (its fd) and the lease; dropped after the VM.
    tap: hostnet::Tap,
    /// eth0's address, gateway and resolver, for the job.
    config: twinbox_spec::proto::NetConfig,
    /// The link, for the report.
    info: twinbox_spec::LinkInfo,
    /// Why the box has no name server, if it has none.
    resolver_missing: Option<String>,
}

impl Network {
    fn create(mode: twinbox_spec::run_spec::NetMode) -> Result<Self, Error> {
        // Checked first, so the user hears about the capability, not about the lease
        // directory an unprivileged process cannot write.
        if !has_net_admin() {
            return Err(Error::NoNetAdmin);
        }
        let lease = hostnet::Lease::acquire(mode)?;
        let resolver = hostnet::host_resolver();
        let config = lease.net_config(resolver.address());
        let tap = hostnet::Tap::create(lease)?;
        let nat = mode == twinbox_spec::run_spec::NetMode::Nat;
        if nat {
            hostnet::nat::apply()?;
        }
        Ok(Self {
            info: tap.link_info(nat),
            config,
            resolver_missing: resolver.reason().map(str::to_owned),
            tap,
        })
    }

    /// A second fd of the tap for the virtio-net device (the interface lives while either
    /// is open).
    fn device_link(&self) -> Result<devices::NetLink, Error> {
        Ok(devices::NetLink {
            tap: self
                .tap
                .file()
                .try_clone()
                .map_err(|e| {
                    Error::Net(hostnet::Error::Tap {
                        call: "dup",
                        interface: self.tap.name().to_owned(),
                        source: e,
                    })
                })?
                .into(),
            name: self.tap.name().to_owned(),
            mac: self.tap.mac(),
        })
    }
}

/// 1. What a run needs, checked before any VM exists.
struct Config {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    pvm: bool,
    /// The VMM threads' system call filters, compiled before any VM exists.
    seccomp: seccomp::Filters,
}

impl Config {
    fn check(spec: &RunSpec, options: RunOptions, own_cgroup: bool) -> Result<Self, Error> {
        spec.validate()?;
        memory::check_size(spec.memory_mib, memory::host_total_kib()?)?;
        let kernel = match &spec.kernel {
            Some(path) => path.clone(),
            None => twinbox_spec::artifacts::require(
                &twinbox_spec::artifacts::kernel_vmlinux(),
                "guest kernel",
            )
            .map_err(Error::MissingArtifact)?,
        };
        rootfs::check_openable("kernel", &kernel, false)?;
        boot::detect_format(&kernel)?;
        rootfs::check_openable("root filesystem", &spec.rootfs, false)?;
        twinbox_spec::image::check_ext4(&spec.rootfs)?;
        for disk in &spec.disks {
            rootfs::check_openable("disk", &disk.path, !disk.read_only)?;
        }
        // Without --initrd, a Linux kernel gets twinbox's initramfs: its /init (the
        // kernel's default rdinit, so the command line needs nothing) mounts root= under an
        // overlay and switches to it, so the image need not carry twinbox-init
        // (rootfs/init/src/initramfs.rs). Any other kernel (the bench's tiny guest) gets
        // none: ~1.4 MiB read and copied into guest RAM by every VM, for nothing.
        let initrd = match &spec.initrd {
            Some(path) => Some(path.clone()),
            None if boot::is_linux(&kernel)? => Some(
                twinbox_spec::artifacts::require(
                    &twinbox_spec::artifacts::initramfs(),
                    "twinbox's initramfs",
                )
                .map_err(Error::MissingArtifact)?,
            ),
            None => None,
        };
        if let Some(initrd) = &initrd {
            rootfs::check_openable("initrd", initrd, false)?;
        }
        let mode = match options.seccomp {
            Some(mode) => mode,
            None => seccomp::Mode::from_env()?,
        };
        let mut filters = seccomp::Filters::new(mode)?;
        if own_cgroup && options.lock_caller_thread {
            filters = filters.caller_removes_cgroup(mode)?;
        }
        Ok(Self {
            kernel,
            initrd,
            pvm: twinbox_spec::host::is_pvm(),
            seccomp: filters,
        })
    }
}

/// Locks the marker log; a panic elsewhere does not make its stamps unreadable.
fn lock(markers: &Mutex<MarkerLog>) -> std::sync::MutexGuard<'_, MarkerLog> {
    markers.lock().unwrap_or_else(|p| p.into_inner())
}

/// The marker device's callback: on the vCPU thread that wrote the marker, stamps it with
/// the host clock into the run's one marker interpreter (`twinbox_spec::outcome`).
fn marker_callback(
    markers: Arc<Mutex<MarkerLog>>,
) -> Box<dyn FnMut(Result<Marker, twinbox_spec::proto::MarkerError>) + Send> {
    Box::new(move |marker| {
        let now = monotonic_ns();
        if let Err(e) = &marker {
            tracing::warn!("guest wrote a bad phase marker: {e}");
        }
        lock(&markers).record(marker, now);
    })
}

/// The kernel command line: base, PVM options, devices, the caller's extra, job token.
/// The job init runs, as the VMM hands it over on the control port.
fn guest_job(
    spec: &RunSpec,
    net: Option<twinbox_spec::proto::NetConfig>,
) -> Result<twinbox_spec::proto::Job, Error> {
    let mut job = spec.job();
    job.net = net;
    job.marker = MarkerChannel::Port(MARKER_PORT);
    job.overlay_root = true;
    job.power_off = true;
    job.validate().map_err(|e| Error::Job(e.to_string()))?;
    Ok(job)
}

/// The kernel command line: base options, the devices, the caller's extra words, and the
/// flag that tells init its job comes over the control port (so the job's size is not
/// capped by the command line's 2 KiB).
fn kernel_cmdline(
    spec: &RunSpec,
    config: &Config,
    devices: &[VirtioMmioEntry],
) -> Result<String, Error> {
    let mut line = KernelCmdline::new();
    line.push(guest_cmdline::BASE)?;
    if spec.console_log.is_some() || spec.verbose {
        // Someone reads the console: the kernel's informational messages too, not only
        // `quiet`'s warnings (a later loglevel= wins). It costs boot time (each byte is a
        // port exit), which is why it is not the default.
        line.push("loglevel=7")?;
    }
    if config.pvm {
        line.push(guest_cmdline::PVM_EXTRA)?;
    }
    for device in devices {
        line.push_virtio_mmio(*device)?;
    }
    line.push(spec.cmdline_extra.as_deref().unwrap_or_default())?;
    line.push(twinbox_spec::proto::stdio::PORTS_CMDLINE_FLAG)?;
    Ok(line.into_string()?)
}

/// Where the serial console (kernel log, init's own lines) goes: the `--console-log`
/// file, stderr with `--verbose`, both, or nowhere. Never the workload's stdout. Each
/// destination gets a writer thread (see console.rs), so a vCPU never blocks on it.
fn serial_console(
    spec: &RunSpec,
    jail: Option<&jail::Jail>,
    filters: &seccomp::Filters,
    running: &mut Running,
) -> Result<Box<dyn std::io::Write + Send>, Error> {
    let mut targets = Vec::new();
    if let Some(path) = &spec.console_log {
        let file = std::fs::File::create(path).map_err(|source| Error::ConsoleLog {
            path: path.clone(),
            source,
        })?;
        targets.push(std::os::fd::OwnedFd::from(file));
    }
    if spec.verbose {
        targets.push(
            std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .map_err(Error::Thread)?,
        );
    }
    let mut sinks = console::Tee::default();
    for target in targets {
        let filters = filters.clone();
        let (sink, writer) = start(jail, move || {
            console::StdoutWriter::start_on(target, move || {
                filters
                    .apply(seccomp::ThreadKind::Console)
                    .map_err(|e| e.to_string())
            })
        })?
        .map_err(Error::Thread)?;
        running.console.push(writer);
        sinks.push(sink);
    }
    Ok(Box::new(console::Console::new(sinks)))
}

fn write_mptable(memory: &memory::GuestMemoryMmap, vcpus: u32) -> Result<(), Error> {
    let table = mptable::build(layout::MPTABLE_START, vcpus as u8);
    memory
        .write_slice(&table, GuestAddress(layout::MPTABLE_START))
        .map_err(|source| Error::MpTable {
            addr: layout::MPTABLE_START,
            source,
        })
}
