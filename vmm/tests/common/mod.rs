//! What the tiny-guest integration tests share: a minimal ELF "kernel" around a few bytes
//! of 64-bit code, and a stand-in root image that passes the VMM's ext4 check.
//!
//! The ELF has one PT_LOAD segment at 1 MiB and no PVH note, so `vmm::run` enters it in
//! long mode at `e_entry` through the 64-bit boot protocol (the VMM's GDT, identity map of
//! the first GiB, interrupts off).

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

/// The threads of a two-vCPU run that face the guest, as the VMM names them: the ones
/// the jail confines and a filter guards.
pub const GUEST_FACING_THREADS: [&str; 7] = [
    "vcpu0",
    "vcpu1",
    "vmm-events",
    "vmm-console",
    "vmm-stdout",
    "vmm-stderr",
    "vmm-control",
];

/// The thread that called `vmm::run`, as the VMM names it during the run.
pub const CALLER_THREAD: &str = "vmm-caller";

/// Writes 'x' to COM1 forever:
/// ```text
/// 66 ba f8 03   mov dx, 0x3f8
/// b0 78         mov al, 'x'
/// ee            out dx, al      <─┐
/// eb fd         jmp -3 ───────────┘
/// ```
pub const FLOOD: &[u8] = &[0x66, 0xba, 0xf8, 0x03, 0xb0, 0x78, 0xee, 0xeb, 0xfd];

/// Guest-physical address of the segment (and of the code: the entry point).
pub const LOAD: u64 = 0x10_0000;
/// File offset of the code.
const CODE: usize = 0x100;

/// An ELF64 executable whose single segment holds `code` at its entry point.
pub fn elf(code: &[u8]) -> Vec<u8> {
    let len = CODE + code.len();
    let mut f = vec![0u8; len];
    let mut put = |at: usize, v: &[u8]| f[at..at + v.len()].copy_from_slice(v);
    put(0, b"\x7fELF\x02\x01\x01");
    put(16, &2u16.to_le_bytes()); // ET_EXEC
    put(18, &62u16.to_le_bytes()); // EM_X86_64
    put(20, &1u32.to_le_bytes()); // e_version
    put(24, &(LOAD + CODE as u64).to_le_bytes()); // e_entry
    put(32, &0x40u64.to_le_bytes()); // e_phoff
    put(52, &64u16.to_le_bytes()); // e_ehsize
    put(54, &56u16.to_le_bytes()); // e_phentsize
    put(56, &1u16.to_le_bytes()); // e_phnum
    put(58, &64u16.to_le_bytes()); // e_shentsize
                                   // PT_LOAD, RWX, the whole file at LOAD.
    put(0x40, &1u32.to_le_bytes());
    put(0x44, &7u32.to_le_bytes());
    put(0x48, &0u64.to_le_bytes()); // p_offset
    put(0x50, &LOAD.to_le_bytes()); // p_vaddr
    put(0x58, &LOAD.to_le_bytes()); // p_paddr
    put(0x60, &(len as u64).to_le_bytes()); // p_filesz
    put(0x68, &(len as u64).to_le_bytes()); // p_memsz
    put(0x70, &4u64.to_le_bytes()); // p_align
    put(CODE, code);
    f
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir, named after `what`.
    pub fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "twinbox-{what}-{}-{:x}",
            std::process::id(),
            twinbox_spec::clock::monotonic_ns()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a 4 KiB file that passes the VMM's root image check (the ext2/3/4 superblock
/// magic at byte 1080) and is a valid virtio-blk backing file; no guest here reads it.
pub fn fake_root(path: &Path) {
    let mut bytes = vec![0u8; 4096];
    bytes[1080..1082].copy_from_slice(&0xef53u16.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// Panics naming /dev/kvm when this host cannot run a guest.
pub fn require_kvm() {
    kvm_ioctls::Kvm::new()
        .unwrap_or_else(|e| panic!("this test needs a usable /dev/kvm (root or kvm group): {e}"));
}

/// Names of this process's threads (from /proc/self/task/*/comm).
pub fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_owned())
        .collect()
}

/// Panics naming root when the test needs it.
pub fn require_root() {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (new namespaces, mounts, uid changes)");
    }
}

/// Writes the guest `dir/guest.elf` around `code` and a stand-in root image
/// `dir/root.img`; their paths.
pub fn guest_files(dir: &Path, code: &[u8]) -> (PathBuf, PathBuf) {
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf(code)).unwrap();
    let root = dir.join("root.img");
    fake_root(&root);
    (kernel, root)
}

/// A `RunSpec` (64 MiB) for `code` with a stand-in root image, both written into `dir`.
pub fn spec_in(dir: &Path, code: &[u8]) -> twinbox_spec::RunSpec {
    let (kernel, root) = guest_files(dir, code);
    let mut spec = twinbox_spec::RunSpec::new(&root, vec!["/bin/true".into()]);
    spec.kernel = Some(kernel);
    spec.memory_mib = 64;
    spec
}

/// The directory the parent test (`parent`) gave this child process in `env`; the child
/// runs only under its parent.
pub fn child_dir(env: &str, parent: &str) -> PathBuf {
    let Some(dir) = std::env::var_os(env).map(PathBuf::from) else {
        panic!("run only as the child of the {parent} ({env} unset)");
    };
    dir
}

/// The flooding guest on two vCPUs with its console on stdout, for 4 s (what the jail and
/// seccomp children run).
pub fn flooding_spec(dir: &Path) -> twinbox_spec::RunSpec {
    let mut spec = spec_in(dir, FLOOD);
    spec.vcpus = 2;
    spec.output = twinbox_spec::run_spec::OutputMode::Inherit;
    spec.time_limit = Some(std::time::Duration::from_secs(4));
    // The serial console goes to a file (as `--console-log`), written by the console
    // thread; see console_log_bytes.
    spec.console_log = Some(dir.join(CONSOLE_LOG));
    spec
}

/// The console log of a flooding_spec run in `dir`.
const CONSOLE_LOG: &str = "console.log";

/// How many bytes the console thread wrote to the console log of a run in `dir`.
pub fn console_log_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(CONSOLE_LOG)).map_or(0, |m| m.len())
}

/// This test binary running only its ignored test `name` (a child process of a test).
pub fn child_test(name: &str) -> std::process::Command {
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command.args(["--ignored", "--exact", name, "--nocapture"]);
    command
}

/// Reads the child's piped stdout to its end on a thread; the thread gives the byte count.
pub fn drain_stdout(child: &mut std::process::Child) -> std::thread::JoinHandle<usize> {
    let mut stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut sink);
        sink.len()
    })
}

/// All of the child's piped stderr.
pub fn read_stderr(child: &mut std::process::Child) -> String {
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    stderr
}
