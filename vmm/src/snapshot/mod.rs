//! VM snapshots: boot once to "init waits for its job", save, restore many times.
//!
//! [`take`] boots like a run, without a job: init opens its ports and blocks reading the
//! control port. The host sees that (the guest opened every port of the console), pauses
//! the vCPUs (each returns its `VcpuFd`), stops the event loop and writes the snapshot
//! (`format.rs`: header + state; `memory_file.rs`: sparse RAM).
//!
//! [`restore`] checks the snapshot against this host and the spec before building
//! anything (versions, CPUID, vCPUs, memory, root image, memory file), then builds the VM
//! with the same devices in the same places, maps the memory file copy-on-write, puts
//! every device back (`BusDevice::restore`: serial, IOAPIC with its routes, virtio
//! transports re-activated at their saved queue positions), creates the vCPUs with the
//! same CPUID and restores them (`vcpu_state.rs`), moves kvmclock and the TSC on by the
//! time since the pause, stamps `restored`, and runs on as a booted VM does: the job waits
//! in the control pipe and reaches init once the event loop runs.

pub mod format;
pub mod memory_file;
pub mod vcpu_state;

use crate::cpuid::Profile;
use crate::live::{self, start, wait_for_end, why_it_ended, Ended, Running};
use crate::machine::BootEntry;
use crate::vcpu::VcpuStop;
use crate::{
    devices, jail, lock, machine, marker_callback, memory, seccomp, serial_console, stdio, usage,
    Config, Error, RunOptions, PVM_DEFAULT_TIME_LIMIT, PVM_NOTE,
};
use devices::DeviceSet;
use devices_crate::bus::Bus;
use devices_crate::snapshot::BusSnapshot;
use format::{FileIdentity, FormatError, Header, VmState};
use kvm_ioctls::{Kvm, VcpuFd};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use twinbox_spec::clock::monotonic_ns;
use twinbox_spec::{MarkerLog, Phase, RunReport, RunSpec};
use vmm_sys_util::eventfd::EventFd;

extern crate devices as devices_crate;

/// How long [`take`] waits for init to be ready for its job (the lab boots in seconds).
const READY_LIMIT: Duration = Duration::from_secs(300);

/// Why a snapshot could not be taken or restored. One line each.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("snapshot: {0}")]
    Device(#[from] devices_crate::snapshot::SnapshotError),
    #[error("snapshot: {0}")]
    Vcpu(#[from] vcpu_state::VcpuStateError),
    #[error("snapshot: KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("snapshot: {0} is not supported with snapshots yet")]
    Unsupported(&'static str),
    #[error("{option} cannot be used with --snapshot: {why}")]
    Refused { option: String, why: String },
    #[error("snapshot: the guest did not get ready for its job: {0}")]
    NotReady(String),
    #[error("snapshot: {dir} {why}")]
    NotPrivate { dir: PathBuf, why: String },
    #[error("snapshot: the device at {addr:#x} {why}")]
    Layout { addr: u64, why: &'static str },
    #[error("snapshot: {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl From<SnapshotError> for Error {
    fn from(e: SnapshotError) -> Self {
        Error::Snapshot(e.to_string())
    }
}

/// What [`take`] wrote.
#[derive(Clone, Debug)]
pub struct Taken {
    pub dir: PathBuf,
    pub header: Header,
    /// Bytes of guest RAM written (the non-zero pages).
    pub memory_written: u64,
    /// Host CLOCK_MONOTONIC ns: spawn, ready (init waits for its job), written.
    pub spawn_ns: u64,
    pub ready_ns: u64,
    pub written_ns: u64,
}

fn unsupported(spec: &RunSpec) -> Result<(), SnapshotError> {
    if spec.net.is_some() {
        return Err(SnapshotError::Unsupported("--net"));
    }
    if spec.tty {
        return Err(SnapshotError::Unsupported("-t"));
    }
    if !spec.disks.is_empty() {
        return Err(SnapshotError::Unsupported("--disk"));
    }
    Ok(())
}

/// What a restore of `header`'s snapshot cannot honour in `spec`, refused before anything
/// is built: the guest resumes with the machine it was saved with (its devices, its booted
/// kernel), and a resumed Linux looks for no new device. What init takes with the job
/// (command, env, workdir, hostname, user, stdin and output, `-t`) works as after a boot.
fn refused_for_restore(spec: &RunSpec, header: &Header) -> Result<(), SnapshotError> {
    let refuse = |option: String, why: String| Err(SnapshotError::Refused { option, why });
    if let Some(net) = spec.net {
        return refuse(
            format!("--net {net}"),
            "the snapshot's VM was saved without a network card, and a resumed guest \
             does not look for new devices"
                .into(),
        );
    }
    if let Some(disk) = spec.disks.first() {
        return refuse(
            format!("--disk {}", disk.path.display()),
            "the snapshot's VM was saved with its root disk alone, and a resumed guest \
             does not look for new devices"
                .into(),
        );
    }
    if let Some(kernel) = spec.kernel.as_ref().filter(|k| **k != header.kernel) {
        return refuse(
            format!("--kernel {}", kernel.display()),
            format!(
                "the snapshot's guest is already running the kernel it booted ({}); give \
                 --kernel to `twinbox vm snapshot`",
                header.kernel.display()
            ),
        );
    }
    if let Some(initrd) = spec
        .initrd
        .as_ref()
        .filter(|i| Some(*i) != header.initrd.as_ref())
    {
        return refuse(
            format!("--initrd {}", initrd.display()),
            "the snapshot's guest booted long ago, from the initramfs it was taken with".into(),
        );
    }
    if let Some(extra) = &spec.cmdline_extra {
        return refuse(
            format!("--cmdline-extra {extra:?}"),
            "the snapshot's kernel has already booted with the command line it was taken \
             with"
                .into(),
        );
    }
    Ok(())
}

fn profile(config: &Config) -> Profile {
    if config.pvm {
        Profile::Pvm
    } else {
        Profile::Host
    }
}

/// SHA-256 over the CPUID vCPU 0 gets (every vCPU's differs only by its APIC ID).
fn cpuid_digest(kvm: &Kvm, vcpus: u32, profile: Profile) -> Result<String, Error> {
    let supported = crate::cpuid::supported(kvm).map_err(machine::MachineError::from)?;
    let cpuid = crate::cpuid::for_vcpu(&supported, 0, vcpus, profile);
    let text: String = cpuid
        .as_slice()
        .iter()
        .map(|e| {
            format!(
                "{:x}.{:x}.{:x}:{:x},{:x},{:x},{:x};",
                e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx
            )
        })
        .collect();
    Ok(format::sha256_hex(text.as_bytes()))
}

fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Every device of `bus` that has state.
fn save_bus(bus: &Bus) -> Result<BusSnapshot, SnapshotError> {
    let mut devices = Vec::new();
    for (base, device) in bus.devices() {
        let device = device.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = device.save()? {
            devices.push((base, state));
        }
    }
    Ok(BusSnapshot { devices })
}

/// Puts `saved` into the freshly built `bus`: the same devices must be at the same
/// addresses, each taking its own kind of state.
fn restore_bus(bus: &Bus, saved: &BusSnapshot) -> Result<(), SnapshotError> {
    let mut expected = 0;
    for (base, device) in bus.devices() {
        let mut device = device.lock().unwrap_or_else(|p| p.into_inner());
        let has_state = device.save()?.is_some();
        let entry = saved.devices.iter().find(|(addr, _)| *addr == base);
        match (has_state, entry) {
            (true, Some((_, state))) => {
                device.restore(state)?;
                expected += 1;
            }
            (true, None) => {
                return Err(SnapshotError::Layout {
                    addr: base,
                    why: "has no saved state (the snapshot has other devices)",
                })
            }
            (false, Some(_)) => {
                return Err(SnapshotError::Layout {
                    addr: base,
                    why: "has state saved for another device",
                })
            }
            (false, None) => {}
        }
    }
    if expected != saved.devices.len() {
        return Err(SnapshotError::Layout {
            addr: saved.devices.first().map_or(0, |d| d.0),
            why: "and others were saved where this VM has none",
        });
    }
    Ok(())
}

/// Whether init has opened every console port (and so reads the control port next).
fn guest_ready(devices: &DeviceSet) -> bool {
    let console = devices.console.lock().unwrap_or_else(|p| p.into_inner());
    (0..console.port_count()).all(|port| console.guest_connected(port))
}

/// Boots `spec`'s kernel and image to "init waits for its job" and writes the snapshot
/// into `out` (created; must be empty or missing). `spec.argv` is ignored.
pub fn take(spec: &RunSpec, out: &Path, options: RunOptions) -> Result<Taken, Error> {
    unsupported(spec)?;
    let config = Config::check(spec, options, false)?;
    let io = |what: &str| {
        let what = format!("{what} {}", out.display());
        move |source| SnapshotError::Io { what, source }
    };
    // Made private (0700), or an existing one must already be: another user able to
    // write it could plant a symlink where the memory file goes, or change the state a
    // later restore trusts.
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("cannot create the parent of"))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("cannot create")(e).into()),
    }
    private_to_this_user(out)?;
    if std::fs::read_dir(out)
        .map_err(io("cannot read"))?
        .next()
        .is_some()
    {
        return Err(SnapshotError::Io {
            what: format!("--out {}", out.display()),
            source: std::io::Error::other("not empty"),
        }
        .into());
    }
    let rootfs = FileIdentity::of(&spec.rootfs).map_err(io("root image"))?;

    let kvm = machine::open_kvm()?;
    machine::check_vcpus(&kvm, spec.vcpus)?;
    let msr_list = kvm
        .get_msr_index_list()
        .map_err(|source| SnapshotError::Kvm {
            what: "MSR index list",
            source,
        })?
        .as_slice()
        .to_vec();
    let cpuid_sha256 = cpuid_digest(&kvm, spec.vcpus, profile(&config))?;
    // Booted as `vm run` boots: guest RAM 2 MiB aligned on the host (see
    // `memory::create_aligned`); `ram_mappings`, declared first, is unmapped last.
    let (ram_mappings, guest_memory) = memory::create_aligned(spec.memory_mib)?;
    let vm = Arc::new(machine::create_vm(&kvm)?);
    let registration = memory::Registration::start(vm.clone(), guest_memory.clone())?;
    let kernel = crate::boot::load_kernel(&guest_memory, &config.kernel)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|p| crate::boot::load_initrd(&guest_memory, p))
        .transpose()?;
    crate::write_mptable(&guest_memory, spec.vcpus)?;

    let markers = Arc::new(Mutex::new(MarkerLog::new(spec.spawn_ns)));
    let mut running = Running::default();
    let jail = options.jail.then(jail::Jail::enter).transpose()?;
    let console_out = serial_console(spec, jail.as_ref(), &config.seccomp, &mut running)?;
    // Without a job: init waits for one, and its stdin sees no end of input
    // (`GuestStdio::start_with`) until the snapshot is written.
    let (guest_stdio, stdio_ends) = {
        let (spec, filters) = (spec.clone(), config.seccomp.clone());
        start(jail.as_ref(), move || {
            stdio::GuestStdio::start_with(
                &spec,
                None,
                None,
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
    let devices = attach(spec, &vm, &guest_memory, console_out, &markers, stdio_ends)?;
    crate::acpi::write(&guest_memory, spec.vcpus, &devices.cmdline_entries)?;
    let line = crate::kernel_cmdline(spec, &config, &devices.cmdline_entries)?;
    crate::boot::params::write_cmdline(&guest_memory, &line)?;
    let ram = memory::total_size(&guest_memory);
    let boot_info =
        crate::boot::params::write_boot_info(&guest_memory, &kernel, line.len() + 1, initrd, ram)?;
    crate::regs::write_boot_tables(&guest_memory, kernel.mode)?;
    let entry = BootEntry {
        mode: kernel.mode,
        rip: kernel.rip,
        boot_info,
    };
    let vcpu_fds = machine::create_vcpus(&kvm, &vm, spec.vcpus, profile(&config), entry)?;
    registration.wait()?;
    drop(kvm);

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
    drop(jail);

    // Ready: every port open. Anything else that ends the boot first is the error.
    let limit = spec.time_limit.unwrap_or(READY_LIMIT);
    let started = Instant::now();
    while !guest_ready(&devices) {
        if started.elapsed() > limit {
            return Err(SnapshotError::NotReady(format!(
                "no job request after {:.0} s",
                limit.as_secs_f64()
            ))
            .into());
        }
        let ended = wait_for_end::<EventFd>(
            &devices.reset_evt,
            &exit_evt,
            None,
            Some(Duration::from_millis(2)),
        );
        if ended != Ended::TimeLimit {
            let stopped: Vec<VcpuStop> = reasons.try_iter().collect();
            return Err(SnapshotError::NotReady(why_it_ended(ended, &stopped, None, None)).into());
        }
    }
    let ready_ns = monotonic_ns();

    // Pause: the vCPUs give their fds back; the event loop stops; nothing moves.
    let mut vcpus: Vec<VcpuFd> = Vec::new();
    for thread in std::mem::take(&mut running.vcpus) {
        match thread.pause() {
            Some(fd) => vcpus.push(fd),
            None => return Err(SnapshotError::NotReady("a vCPU stopped on its own".into()).into()),
        }
    }
    running.events.take();
    let paused_realtime_ns = realtime_ns();
    let mut states = Vec::with_capacity(vcpus.len());
    for (id, fd) in vcpus.iter_mut().enumerate() {
        states.push(vcpu_state::save(fd, id as u32, &msr_list).map_err(SnapshotError::from)?);
    }
    let clock = vm.get_clock().map_err(|source| SnapshotError::Kvm {
        what: "kvmclock",
        source,
    })?;
    let state = VmState {
        vcpus: states,
        clock,
        pio: save_bus(&devices.io.pio)?,
        mmio: save_bus(&devices.io.mmio)?,
    };
    let header = Header {
        format: format::FORMAT_NAME.into(),
        format_version: format::FORMAT_VERSION,
        twinbox_version: format::TWINBOX_VERSION.into(),
        cpuid_sha256,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        rootfs,
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        paused_realtime_ns,
        state_sha256: String::new(),
    };
    let memory_written = memory_file::save(&guest_memory, &out.join(format::MEMORY_FILE))
        .map_err(io("cannot write the memory file into"))?;
    let bytes = format::encode(header.clone(), &state).map_err(|e| SnapshotError::Io {
        what: "cannot encode the state".into(),
        source: std::io::Error::other(e),
    })?;
    format::write_state(out, &bytes).map_err(SnapshotError::from)?;
    let written_ns = monotonic_ns();
    drop(vcpus);
    drop(running);
    drop(vm);
    drop(devices);
    drop(guest_memory);
    drop(ram_mappings);
    Ok(Taken {
        dir: out.to_owned(),
        header,
        memory_written,
        spawn_ns: spec.spawn_ns,
        ready_ns,
        written_ns,
    })
}

/// The devices, as every VM of twinbox has them (the same places before and after).
fn attach(
    spec: &RunSpec,
    vm: &Arc<kvm_ioctls::VmFd>,
    guest_memory: &memory::GuestMemoryMmap,
    console_out: Box<dyn std::io::Write + Send>,
    markers: &Arc<Mutex<MarkerLog>>,
    stdio: stdio::DeviceEnds,
) -> Result<DeviceSet, Error> {
    Ok(devices::attach(
        vm,
        guest_memory,
        devices::DeviceConfig {
            ioapic_id: spec.vcpus as u8,
            rootfs: &spec.rootfs,
            disks: &spec.disks,
            console: console_out,
            on_marker: marker_callback(markers.clone()),
            net: None,
            stdio,
        },
    )?)
}

/// A snapshot directory whose state file has been read and checked (format, versions,
/// checksum) — once: the caller takes its defaults from [`Snapshot::header`] and hands it
/// to [`restore`].
pub struct Snapshot {
    dir: PathBuf,
    header: Header,
    state: VmState,
}

impl Snapshot {
    /// Reads and checks `dir`'s state file.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let (header, state) = format::read_state(dir).map_err(SnapshotError::from)?;
        Ok(Self {
            dir: dir.to_owned(),
            header,
            state,
        })
    }

    /// What the snapshot is and needs (vCPUs, memory, root image, kernel).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether its word may be taken for which root image to attach: its directory is
    /// this user's own and no one else can write it (as `take` makes it). A snapshot from
    /// anyone else is guest memory and device state they wrote: restored with the root
    /// image it names, its guest could read that file and print it to us.
    pub fn is_private(&self) -> Result<(), Error> {
        Ok(private_to_this_user(&self.dir)?)
    }
}

/// `dir` is a directory owned by this process's user that no group or other can write.
fn private_to_this_user(dir: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| SnapshotError::NotPrivate {
        dir: dir.to_owned(),
        why,
    };
    let meta = std::fs::metadata(dir).map_err(|source| SnapshotError::Io {
        what: format!("cannot look at {}", dir.display()),
        source,
    })?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() {
        Err(refuse("is not a directory".into()))
    } else if meta.uid() != me {
        Err(refuse(format!(
            "is owned by uid {}, not by this user (uid {me})",
            meta.uid()
        )))
    } else if meta.mode() & 0o022 != 0 {
        Err(refuse(format!(
            "can be written by other users (mode {:o}): chmod go-w it",
            meta.mode() & 0o7777
        )))
    } else {
        Ok(())
    }
}

/// What a restore checks before building anything: the snapshot's state, its memory
/// file, and that it fits this host and `spec`.
pub struct Checked {
    header: Header,
    state: VmState,
    memory: std::fs::File,
}

/// Checks `snapshot` against `spec` (vCPUs, memory, root image) and this host's CPUID.
/// Nothing is built yet, so a refusal leaves nothing behind.
pub fn check(spec: &RunSpec, snapshot: Snapshot, pvm: bool) -> Result<Checked, Error> {
    let Snapshot { dir, header, state } = snapshot;
    let dir = dir.as_path();
    let mismatch = |what, flag, saved, asked| {
        Error::from(SnapshotError::from(FormatError::Size {
            dir: dir.to_owned(),
            what,
            flag,
            saved,
            asked,
        }))
    };
    if header.vcpus != spec.vcpus {
        return Err(mismatch(
            "the vCPU count",
            "vcpus",
            header.vcpus,
            spec.vcpus,
        ));
    }
    if header.memory_mib != spec.memory_mib {
        return Err(mismatch(
            "the memory size (MiB)",
            "memory",
            header.memory_mib,
            spec.memory_mib,
        ));
    }
    let changed = |why: String| {
        Error::from(SnapshotError::from(FormatError::ImageChanged {
            dir: dir.to_owned(),
            image: spec.rootfs.clone(),
            why,
        }))
    };
    let now = FileIdentity::of(&spec.rootfs).map_err(|e| changed(e.to_string()))?;
    if let Some(why) = header.rootfs.difference(&now) {
        return Err(changed(why));
    }
    let memory_error = |why: String| {
        Error::from(SnapshotError::from(FormatError::Memory {
            dir: dir.to_owned(),
            why,
        }))
    };
    let memory = std::fs::File::open(dir.join(format::MEMORY_FILE))
        .map_err(|e| memory_error(format!("cannot be opened: {e}")))?;
    let len = memory
        .metadata()
        .map_err(|e| memory_error(e.to_string()))?
        .len();
    if len != u64::from(header.memory_mib) << 20 {
        return Err(memory_error(format!(
            "is {len} bytes, not the {} MiB of guest memory (truncated?)",
            header.memory_mib
        )));
    }
    let kvm = machine::open_kvm()?;
    let profile = if pvm { Profile::Pvm } else { Profile::Host };
    if cpuid_digest(&kvm, header.vcpus, profile)? != header.cpuid_sha256 {
        return Err(SnapshotError::from(FormatError::Cpuid {
            dir: dir.to_owned(),
        })
        .into());
    }
    Ok(Checked {
        header,
        state,
        memory,
    })
}

/// Runs `spec`'s job in a VM restored from `snapshot` and reports how it went; `restored`
/// stands where a boot's kernel start would.
pub fn restore<S: AsRawFd + ?Sized>(
    spec: &RunSpec,
    snapshot: Snapshot,
    stop: Option<&S>,
    options: RunOptions,
    own_cgroup: bool,
) -> Result<RunReport, Error> {
    refused_for_restore(spec, snapshot.header())?;
    let config = Config::check(spec, options, own_cgroup)?;
    let checked = check(spec, snapshot, config.pvm)?;
    let probe = usage::Probe::open().map_err(Error::Usage)?;
    let mut notes = Vec::new();
    if config.pvm {
        notes.push(PVM_NOTE.to_owned());
    }
    let cpu_before = usage::cpu_times_us();
    // -t, as a boot does it (lib.rs): the caller's terminal is raw for the run under an
    // Interrupt of its own (restored on every path), and resizes are forwarded. Init
    // allocates the guest's pty when it gets the job, after the resume.
    let tty_interrupt = crate::tty_interrupt(spec)?;
    let (_raw_terminal, _resizes, resized) = crate::caller_terminal(spec, &tty_interrupt)?;
    let _cgroup = own_cgroup
        .then(|| {
            crate::cgroup::VmmCgroup::enter(crate::cgroup::Limits::for_vm(
                spec.memory_mib,
                spec.vcpus,
            ))
        })
        .transpose()?;

    let kvm = machine::open_kvm()?;
    machine::check_vcpus(&kvm, spec.vcpus)?;
    let guest_memory =
        memory_file::map(&checked.memory, spec.memory_mib).map_err(|e| SnapshotError::Io {
            what: "cannot map the memory file".into(),
            source: e,
        })?;
    let vm = Arc::new(machine::create_vm(&kvm)?);
    let registration = memory::Registration::start(vm.clone(), guest_memory.clone())?;

    let markers = Arc::new(Mutex::new(MarkerLog::new(spec.spawn_ns)));
    let mut running = Running::default();
    let jail = options.jail.then(jail::Jail::enter).transpose()?;
    let console_out = serial_console(spec, jail.as_ref(), &config.seccomp, &mut running)?;
    // The job goes into the control pipe now and reaches init once the event loop runs,
    // after the restore.
    let job = crate::guest_job(spec, None)?;
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
    let devices = attach(spec, &vm, &guest_memory, console_out, &markers, stdio_ends)?;
    restore_bus(&devices.io.pio, &checked.state.pio)?;
    restore_bus(&devices.io.mmio, &checked.state.mmio)?;

    // The vCPUs get the CPUID they were snapshotted with (its digest matched); the boot
    // registers set here are replaced by the saved ones.
    let entry = BootEntry {
        mode: crate::regs::EntryMode::Linux64,
        rip: 0,
        boot_info: 0,
    };
    let vcpu_fds = machine::create_vcpus(&kvm, &vm, spec.vcpus, profile(&config), entry)?;
    registration.wait()?;
    drop(kvm);
    let ahead_ns = realtime_ns().saturating_sub(checked.header.paused_realtime_ns);
    for (id, (fd, state)) in vcpu_fds.iter().zip(&checked.state.vcpus).enumerate() {
        vcpu_state::restore(fd, id as u32, state, ahead_ns).map_err(SnapshotError::from)?;
    }
    let mut clock = checked.state.clock;
    clock.clock = clock.clock.wrapping_add(ahead_ns);
    clock.flags = 0;
    vm.set_clock(&clock).map_err(|source| SnapshotError::Kvm {
        what: "kvmclock",
        source,
    })?;
    {
        let mut log = lock(&markers);
        log.timeline_mut().record_now(Phase::SandboxReady);
        log.timeline_mut().record_now(Phase::Restored);
    }

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
    drop(jail);
    if options.lock_caller_thread {
        config.seccomp.apply(seccomp::ThreadKind::Caller)?;
    }
    // Run, tear down and report as after a boot (`live.rs`).
    let ending = live::Ending {
        vm,
        devices,
        guest_memory,
        ram_mappings: None,
        running,
        markers,
        exit_evt,
        reasons,
        network: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_a_directory_of_this_users_own_that_no_one_else_writes_is_private() {
        let base =
            std::env::temp_dir().join(format!("twinbox-snap-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join("snap");
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        assert!(private_to_this_user(&dir).is_ok());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            private_to_this_user(&dir).is_ok(),
            "readable by others is fine"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private_to_this_user(&dir).unwrap_err().to_string();
        assert!(err.contains("written by other users"), "{err}");
        let file = base.join("file");
        std::fs::write(&file, "").unwrap();
        let err = private_to_this_user(&file).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
