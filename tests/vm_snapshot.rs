//! VM snapshots (issue 14): `twinbox vm snapshot` and `twinbox vm run --snapshot`.
//!
//! Bad input runs on the host (a snapshot is checked before anything is built, so no Linux
//! boot is needed): one line, exit 125, nothing left. The restore round trip boots in the
//! lab (or on a hardware host).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use vmm::snapshot::format::{self, FileIdentity, Header, VmState};

/// Runs `twinbox vm run --snapshot DIR ARGS -- /bin/true`: (status, stderr).
fn restore(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(common::twinbox())
        .args(["vm", "run", "--snapshot"])
        .arg(dir)
        .args(args)
        .args(["--", "/bin/true"])
        .output()
        .expect("run twinbox");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(dir: &Path, args: &[&str], needle: &str) {
    let (status, stderr) =
        common::leaks::check_no_leaks(&format!("a refused restore {args:?}"), || {
            restore(dir, args)
        });
    assert_eq!(status, 125, "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line, got {stderr:?}");
    assert!(
        stderr.contains(needle),
        "{stderr:?} should mention {needle:?}"
    );
}

/// A snapshot directory whose header fits `rootfs` and this build, with an empty state
/// (never restored: each case breaks one thing before the restore would start).
fn fake_snapshot(name: &str, rootfs: &Path, change: impl FnOnce(&mut Header)) -> PathBuf {
    let dir = common::fresh_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut header = Header {
        format: format::FORMAT_NAME.into(),
        format_version: format::FORMAT_VERSION,
        twinbox_version: format::TWINBOX_VERSION.into(),
        cpuid_sha256: "0".repeat(64),
        vcpus: 1,
        memory_mib: 128,
        rootfs: FileIdentity::of(rootfs).unwrap(),
        kernel: "/nonexistent/vmlinux".into(),
        initrd: None,
        paused_realtime_ns: 0,
        state_sha256: String::new(),
    };
    change(&mut header);
    let vcpu = || format::VcpuState {
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        mp_state: Default::default(),
        events: Default::default(),
        msrs: Vec::new(),
        tsc_khz: None,
    };
    let state = VmState {
        vcpus: (0..header.vcpus).map(|_| vcpu()).collect(),
        clock: Default::default(),
        pio: Default::default(),
        mmio: Default::default(),
    };
    let bytes = format::encode(header, &state).unwrap();
    format::write_state(&dir, &bytes).unwrap();
    dir
}

#[test]
fn bad_snapshots_are_one_line_and_125() {
    let rootfs = common::require_artifact(&twinbox_spec::artifacts::rootfs_image());

    // Not a snapshot at all: a missing directory, random bytes.
    let missing = common::fresh_dir("twinbox-snap-missing");
    assert_refused(&missing, &[], "no state file");
    let random = common::fresh_dir("twinbox-snap-random");
    std::fs::create_dir_all(&random).unwrap();
    let noise: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(random.join(format::STATE_FILE), &noise).unwrap();
    std::fs::write(random.join(format::MEMORY_FILE), &noise).unwrap();
    assert_refused(&random, &[], "not a twinbox snapshot");

    // Corrupt or truncated state.
    let good = fake_snapshot("twinbox-snap-corrupt", &rootfs, |_| {});
    let state = good.join(format::STATE_FILE);
    let mut bytes = std::fs::read(&state).unwrap();
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&state, &bytes).unwrap();
    assert_refused(&good, &[], "truncated or corrupt");

    // Another twinbox, another format.
    let other = fake_snapshot("twinbox-snap-version", &rootfs, |h| {
        h.twinbox_version = "0.0.0-other".into()
    });
    assert_refused(&other, &[], "twinbox 0.0.0-other");
    let other = fake_snapshot("twinbox-snap-format", &rootfs, |h| h.format_version = 77);
    assert_refused(&other, &[], "format version 77");

    // Sizes: the snapshot's 1 vCPU / 256 MiB against what is asked.
    let sized = fake_snapshot("twinbox-snap-sizes", &rootfs, |h| h.memory_mib = 256);
    assert_refused(&sized, &["--vcpus", "2"], "vCPU count is 1, asked for 2");
    assert_refused(
        &sized,
        &["--memory", "512"],
        "memory size (MiB) is 256, asked for 512",
    );

    // A changed root image.
    let changed = fake_snapshot("twinbox-snap-image", &rootfs, |h| h.rootfs.mtime_ns += 1);
    assert_refused(&changed, &["--rootfs", rootfs.to_str().unwrap()], "changed");

    // The memory file: missing, truncated; then another CPU (needs /dev/kvm).
    let memory = fake_snapshot("twinbox-snap-memory", &rootfs, |_| {});
    assert_refused(&memory, &[], "memory file cannot be opened");
    // The root image is taken from a snapshot's word only when no one else could have
    // written it: left out, a snapshot others can write is refused; given, the checks go on.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |m| std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(m));
        mode(0o777).unwrap();
        assert_refused(&memory, &[], "give --rootfs");
        assert_refused(
            &memory,
            &["--rootfs", rootfs.to_str().unwrap()],
            "memory file cannot be opened",
        );
        mode(0o755).unwrap();
    }
    std::fs::write(memory.join(format::MEMORY_FILE), [0u8; 4096]).unwrap();
    assert_refused(&memory, &[], "truncated");
    if Path::new("/dev/kvm").exists() {
        let file = std::fs::File::create(memory.join(format::MEMORY_FILE)).unwrap();
        file.set_len(128 << 20).unwrap();
        assert_refused(&memory, &[], "another CPU model");
    }

    for dir in [missing, random, good, other, sized, changed, memory] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A file with an ext4 superblock's magic, which is all a root image needs to be before a
/// snapshot's checks look at it (nothing here ever boots it).
fn ext4_lookalike(dir: &Path) -> PathBuf {
    let path = dir.join("other-root.ext4");
    let mut bytes = vec![0u8; 4096];
    bytes[0x438..0x43a].copy_from_slice(&0xef53u16.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    path
}

/// What a restored guest cannot take (it resumes with the devices and the booted kernel
/// it was saved with) is refused before anything is built, naming the option and why; the
/// root image left out is the snapshot's own, not the default one.
#[test]
fn options_a_restore_cannot_honour_are_one_line_and_125() {
    let rootfs = common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    let snapshot = fake_snapshot("twinbox-snap-options", &rootfs, |_| {});
    let disk = snapshot.join("extra.img");
    std::fs::write(&disk, [0u8; 4096]).unwrap();
    let why_devices = "a resumed guest does not look for new devices";
    assert_refused(
        &snapshot,
        &["--net"],
        "--net link cannot be used with --snapshot",
    );
    assert_refused(&snapshot, &["--net", "nat"], why_devices);
    assert_refused(
        &snapshot,
        &["--disk", disk.to_str().unwrap()],
        "cannot be used with --snapshot: the snapshot's VM was saved with its root disk alone",
    );
    assert_refused(
        &snapshot,
        &["--kernel", "/boot/another-vmlinux"],
        "--kernel /boot/another-vmlinux cannot be used with --snapshot: the snapshot's guest \
         is already running the kernel it booted (/nonexistent/vmlinux)",
    );
    assert_refused(
        &snapshot,
        &["--initrd", disk.to_str().unwrap()],
        "from the initramfs it was taken with",
    );
    assert_refused(
        &snapshot,
        &["--cmdline-extra", "quiet"],
        "--cmdline-extra \"quiet\" cannot be used with --snapshot",
    );

    // Another root than the snapshot's, given or built from an image, is another file.
    let other_root = ext4_lookalike(&snapshot);
    assert_refused(
        &snapshot,
        &["--rootfs", other_root.to_str().unwrap()],
        "changed since the snapshot (another file)",
    );
    // Left out, the root is the snapshot's: a snapshot of the look-alike gets past the
    // image check (to its missing memory file) with no --rootfs at all.
    let elsewhere = fake_snapshot("twinbox-snap-own-root", &other_root, |_| {});
    assert_refused(&elsewhere, &[], "memory file cannot be opened");

    for dir in [snapshot, elsewhere] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// What each restore of the round trip runs: a different command, a different status
/// (the first six each use another part of the guest; the rest are told apart by what
/// they print and the status they end with).
const RESTORED_JOBS: [(&str, i32, &str); 6] = [
    ("/bin/true", 0, ""),
    ("/bin/false", 1, ""),
    ("/bin/sh -c 'echo first; exit 3'", 3, "first"),
    (
        "/bin/sh -c 'cat /proc/sys/kernel/ostype; exit 42'",
        42,
        "Linux",
    ),
    ("/bin/sh -c 'test -e /no-such-file || exit 5'", 5, ""),
    ("/bin/sh -c 'echo $((6 * 7)); exit 200'", 200, "42"),
];

/// How many restores run in a row (the issue's proof: 20).
const IN_A_ROW: usize = 20;

/// The job of restore `i`: the hand-written ones first, then one whose output (its index
/// and its square, computed in the guest) and status (`100 + i`) name that run alone.
fn restored_job(i: usize) -> (String, i32, String) {
    match RESTORED_JOBS.get(i) {
        Some((command, status, stdout)) => (command.to_string(), *status, stdout.to_string()),
        None => (
            format!("/bin/sh -c 'echo run-{i} $(({i} * {i})); exit {}'", 100 + i),
            100 + i as i32,
            format!("run-{i} {}", i * i),
        ),
    }
}

/// How many restored VMs run at once, each writing its own file to its root.
const AT_ONCE: usize = 4;

/// In the lab (or on a hardware host): one snapshot restored 20 times in a row, each run a
/// different command with a different status; `--vcpus 2` restored runs `nproc` = 2; the
/// guest's clock is not behind the host's; several restored at once each see only the
/// file they wrote to their root.
#[test]
fn a_snapshot_restores_again_and_again() {
    let mut script = String::from(
        r#"
set -u
twinbox vm snapshot --out /tmp/snap1 || { echo SNAP1=failed; exit 10; }
twinbox vm snapshot --out /tmp/snap2 --vcpus 2 || { echo SNAP2=failed; exit 11; }
"#,
    );
    // Each restore has a time limit, so one that hangs is named with its console instead
    // of holding the lab until its own limit.
    for i in 0..IN_A_ROW {
        let (command, status, _) = restored_job(i);
        script.push_str(&format!(
            "got=$(twinbox vm run --timeout 120 --console-log /tmp/restore-{i}.log \
             --snapshot /tmp/snap1 -- {command} 2>/tmp/restore-{i}.err); st=$?\n\
             echo \"RUN{i}=$st:$(echo $got)\"\n\
             [ $st = {status} ] || {{ tail -n 3 /tmp/restore-{i}.err; \
             echo '-- its console:'; tail -n 30 /tmp/restore-{i}.log; }}\n"
        ));
    }
    script.push_str(&format!(
        r#"
echo "NPROC=$(twinbox vm run --snapshot /tmp/snap2 -- nproc)"
before=$(date +%s)
guest=$(twinbox vm run --snapshot /tmp/snap1 -- date +%s)
echo "CLOCK=$before:$guest:$(date +%s)"
for i in $(seq 1 {AT_ONCE}); do
  twinbox vm run --snapshot /tmp/snap1 -- /bin/sh -c \
    "echo vm-$i > /mine-$i && sync && sleep 1 && echo \$(ls / | grep '^mine-'):\$(cat /mine-$i)" \
    > /tmp/at-once-$i 2>&1 &
done
wait
for i in $(seq 1 {AT_ONCE}); do echo "ATONCE$i=$(cat /tmp/at-once-$i)"; done
"#
    ));
    let out = common::run_where_linux_boots(&script, |lab| lab.mem_mib(2048).timeout_s(1500));
    assert!(
        out.value("SNAP1").is_none() && out.value("SNAP2").is_none(),
        "a snapshot could not be taken:\n{}",
        out.output
    );
    for i in 0..IN_A_ROW {
        let (command, status, stdout) = restored_job(i);
        assert_eq!(
            out.expect_value(&format!("RUN{i}")),
            format!("{status}:{stdout}"),
            "restore {i} of {IN_A_ROW} in a row, running {command}"
        );
    }
    assert_eq!(
        out.expect_value("NPROC"),
        "2",
        "nproc in a --vcpus 2 restore"
    );
    let clock = out.expect_value("CLOCK");
    let times: Vec<u64> = clock
        .split(':')
        .map(|t| t.parse().unwrap_or_else(|_| panic!("CLOCK={clock}")))
        .collect();
    let [before, guest, after] = times[..] else {
        panic!("CLOCK={clock}");
    };
    assert!(
        (before..=after).contains(&guest),
        "the restored guest's clock {guest} is outside the host's {before}..={after}"
    );
    for i in 1..=AT_ONCE {
        assert_eq!(
            out.expect_value(&format!("ATONCE{i}")),
            format!("mine-{i}:vm-{i}"),
            "restored VM {i} of {AT_ONCE} at once should see only its own file"
        );
    }
}

/// The script of [`a_restored_vm_streams_stdio_and_runs_a_terminal`].
const RESTORED_STDIO: &str = r#"
set -u
twinbox vm snapshot --out /tmp/snap || { echo SNAP=failed; exit 10; }
restore() { twinbox vm run --timeout 120 --snapshot /tmp/snap "$@"; }
head -c 1048576 /dev/urandom > /tmp/blob
echo BLOB_SUM=$(sha256sum < /tmp/blob | cut -d' ' -f1)

restore -- /bin/sh -c 'cat; echo err-line >&2; exit 7' < /tmp/blob > /tmp/out 2> /tmp/err
echo CAT_STATUS=$?
echo OUT_SUM=$(sha256sum < /tmp/out | cut -d' ' -f1)
echo ERR_TEXT=$(base64 -w0 < /tmp/err)
echo STDIN_COUNT=$(restore -- wc -c < /tmp/blob | tr -d ' ')
echo CLOSED_STDIN_BYTES=$(restore -- cat < /dev/null | wc -c)
echo JOB=$(restore --hostname restored-box -e GREETING=hi --workdir /tmp -- \
  /bin/sh -c 'echo $(hostname):$GREETING:$(pwd)')

# A terminal: `script` plays the user's (the lab's /dev has no devpts of its own).
if [ ! -e /dev/pts/ptmx ]; then
    mkdir -p /dev/pts && mount -t devpts -o ptmxmode=0666 devpts /dev/pts
fi
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mkfifo /tmp/typed
script -qfec "twinbox vm run --timeout 300 --snapshot /tmp/snap -it -- /bin/sh" \
  /tmp/typescript < /tmp/typed > /dev/null 2>&1 &
term=$!
exec 3<> /tmp/typed
waitfor() { for i in $(seq 1 600); do grep -q "$1" /tmp/typescript 2>/dev/null && return 0; sleep 0.5; done; return 1; }
printf 'echo ANSWER$((6*7)) $(tty)\r' >&3
waitfor ANSWER42 && echo "TTY_ANSWER=$(grep -o 'ANSWER42 [^ ]*' /tmp/typescript | head -1 | tr -d '\r')"
printf 'exit 3\r' >&3
wait $term
echo TTY_STATUS=$?
exec 3>&-
"#;

/// In the lab (or on a hardware host): a restored VM's job gets the caller's stdio over
/// the same ports as after a boot — 1 MiB of random piped stdin comes back byte-exact on
/// stdout while stderr carries only the workload's line, `wc -c` counts it, a closed stdin
/// is end of input, the status is the workload's; the job's hostname, env and workdir
/// are honoured; `-it` gives an interactive shell on a pty of the guest.
#[test]
fn a_restored_vm_streams_stdio_and_runs_a_terminal() {
    let out = common::run_where_linux_boots(RESTORED_STDIO, |lab| {
        lab.bin("/usr/bin/script").mem_mib(1536).timeout_s(1200)
    });
    assert!(
        out.value("SNAP").is_none(),
        "the snapshot could not be taken:\n{}",
        out.output
    );
    let v = |key: &str| out.expect_value(key);
    assert_eq!(
        v("CAT_STATUS"),
        "7",
        "the workload's status:\n{}",
        out.output
    );
    assert_eq!(
        v("OUT_SUM"),
        v("BLOB_SUM"),
        "1 MiB piped into a restored VM and back out on stdout:\n{}",
        out.output
    );
    assert_eq!(
        v("ERR_TEXT"),
        "ZXJyLWxpbmUK",
        "stderr holds exactly the workload's `err-line\\n`"
    );
    assert_eq!(v("STDIN_COUNT"), "1048576", "wc -c of 1 MiB of stdin");
    assert_eq!(
        v("CLOSED_STDIN_BYTES"),
        "0",
        "a closed stdin is end of input"
    );
    assert_eq!(v("JOB"), "restored-box:hi:/tmp", "hostname, env, workdir");
    let answer = v("TTY_ANSWER");
    assert!(
        answer.starts_with("ANSWER42 /dev/pts/"),
        "the restored shell answers on a pty: {answer:?}\n{}",
        out.output
    );
    assert_eq!(v("TTY_STATUS"), "3", "exit 3 ends the -it run with 3");
}

/// In the lab (or on a hardware host): `twinbox bench` with the `vm-snapshot` box beside
/// `vm` — both measure `startup` and `memory`, every vm-snapshot run is a restore (its
/// timeline has `restored`, the boot's has not), both measure `density` (3 restores of one
/// snapshot alive at once, each adding less to the host than a booted VM), no snapshot
/// is left behind, and
/// `vmm` (the tiny guest) is sat out by the restoring box with its reason.
#[test]
fn the_bench_restores_a_snapshot_in_its_vm_snapshot_box() {
    let out = common::run_where_linux_boots(
        r#"
set -u
twinbox bench startup memory density vmm --boxes vm,vm-snapshot --runs 2 --warmup 0 \
  --density-instances 3 --vm-timeout 120 --out /tmp/bench-snap > /tmp/bench-snap.log 2>&1
echo "BENCH=$?"
tail -5 /tmp/bench-snap.log
echo "RESULTS=$(tr -d '\n' < /tmp/bench-snap/results.json)"
echo "LEFT=$(ls -d "${TMPDIR:-/tmp}"/twinbox-bench-snapshot-* 2>/dev/null | wc -l)"
"#,
        |lab| lab.mem_mib(1536).timeout_s(1500),
    );
    assert_eq!(out.expect_value("BENCH"), "0", "{}", out.output);
    let results: bench::results::Results =
        serde_json::from_str(&out.expect_value("RESULTS")).expect("results.json parses");
    for name in ["startup", "memory"] {
        let s = results.scenario(name).expect(name);
        assert_eq!(s.boxes, ["vm", "vm-snapshot"], "{name}");
        for b in ["vm", "vm-snapshot"] {
            assert_eq!(
                s.values(b, &s.metrics[0].key).len(),
                2,
                "{name}: {b} should measure twice: {:?}",
                s.failures(b)
            );
        }
        for run in &s.runs {
            let report = run.report.as_ref().expect("every run has its report");
            let restored = report.timeline.get(twinbox_spec::Phase::Restored).is_some();
            assert_eq!(
                restored,
                run.box_name == "vm-snapshot",
                "{name}: {} run {} restored={restored}",
                run.box_name,
                run.round
            );
        }
    }
    let density = results.scenario("density").expect("density");
    assert_eq!(density.boxes, ["vm", "vm-snapshot"]);
    let per_instance = |b: &str| {
        density
            .summary(b, "memfree_mib_per_instance")
            .unwrap_or_else(|| panic!("density: {b} measured nothing: {:?}", density.failures(b)))
            .median
    };
    let (booted, restored) = (per_instance("vm"), per_instance("vm-snapshot"));
    // Printed for the reader; a restore's pages come from the shared memory file (only
    // what the guest writes is its own), a boot's are all its own.
    println!("density MemFree MiB per instance: vm {booted:.1}, vm-snapshot {restored:.1}");
    assert!(
        restored < booted,
        "a restored VM should add less host memory than a booted one (it shares the \
         snapshot's memory file): vm-snapshot {restored:.1} MiB vs vm {booted:.1} MiB"
    );
    let vmm = results.scenario("vmm").expect("vmm");
    assert_eq!(vmm.boxes, ["vm"]);
    assert!(
        vmm.sat_out
            .iter()
            .any(|o| o.box_name == "vm-snapshot" && o.reason.contains("resumes")),
        "{:?}",
        vmm.sat_out
    );
    assert_eq!(
        out.expect_value("LEFT"),
        "0",
        "the bench's snapshot is removed"
    );
}
