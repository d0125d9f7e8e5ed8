//! `disk`: fio reading a scratch disk, O_DIRECT — the scenario, the scratch disk every
//! box reads, the fio command line and the numbers out of fio's JSON.
//!
//! One file serves all boxes so they read the very same bytes: native opens it by its
//! host path, containers get it bind-mounted read-only at `/mnt/disk0`, the VM gets it as
//! its second virtio-blk disk, `/dev/vdb`. It is filled with pseudo-random bytes, not
//! zeros: an ext4 file whose blocks were never written has no extents, and reads of holes
//! never reach the device.

use super::{output, Context, Guard, Metrics, Scenario};
use crate::metric::{self, Metric};
use crate::runner::{Capabilities, Guest};
use std::io::Write;
use std::path::{Path, PathBuf};
use twinbox_spec::run_spec::DiskSpec;
use twinbox_spec::{RunReport, RunSpec};

/// Its name.
pub const NAME: &str = "disk";

/// The `disk` scenario.
pub struct Disk;

impl Scenario for Disk {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "fio, O_DIRECT, psync, queue depth 1: 4 KiB random reads, then 1 MiB \
         sequential reads, 2 s each, over a 256 MiB file of random bytes that the \
         bench writes once. Native reads the file, the container a read-only bind \
         mount of it (`/mnt/disk0`), the VM a read-only virtio-blk disk (`/dev/vdb`). \
         O_DIRECT skips the guest's page cache but not the host's: twinbox's \
         virtio-blk reads the file with buffered I/O (as Firecracker does by \
         default), so VM reads may be served from host memory where native and \
         container reads go to the device."
    }

    fn workload(&self) -> Vec<String> {
        fio_argv(DISK_PLACEHOLDER)
    }

    fn metrics(&self) -> &'static [Metric] {
        &[metric::RANDREAD_4K_IOPS, metric::SEQREAD_1M_MIB_S]
    }

    fn sits_out(&self, caps: &Capabilities) -> Option<&'static str> {
        if caps.guest == Guest::TinyOnly {
            Some("boots only the tiny guest, not the image")
        } else if caps.disk_at.is_none() {
            Some("takes no extra disk")
        } else {
            None
        }
    }

    fn prepare(&self, ctx: &Context) -> std::io::Result<Option<Guard>> {
        Ok(Some(Box::new(ScratchDisk::create(&ctx.disk)?)))
    }

    fn adjust(&self, spec: &mut RunSpec, ctx: &Context, caps: &Capabilities) {
        if let Some(at) = caps.disk_at {
            spec.argv = fio_argv(&at.path_inside(&ctx.disk));
        }
        spec.disks = vec![DiskSpec {
            path: ctx.disk.clone(),
            read_only: true,
        }];
    }

    fn extract(&self, report: &RunReport) -> Result<Metrics, String> {
        parse_fio(output(report))
    }
}

/// Size of the scratch disk.
pub const DISK_BYTES: u64 = 256 << 20;
/// Stands for the disk's path in the workload shown in reports.
pub const DISK_PLACEHOLDER: &str = "<disk>";
/// Seconds per fio job.
const JOB_SECONDS: u32 = 2;

/// fio reading `path`: a 4 KiB random-read job, then (`--stonewall`: after it, alone) a
/// 1 MiB sequential-read job; O_DIRECT, synchronous reads (queue depth 1), JSON output.
/// `--readonly` makes fio refuse any write, whatever else the command line says.
pub fn fio_argv(path: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        "fio",
        "--output-format=json",
        "--readonly",
        "--direct=1",
        "--ioengine=psync",
        "--time_based",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("--runtime={JOB_SECONDS}"));
    v.push(format!("--size={DISK_BYTES}"));
    v.push(format!("--filename={path}"));
    for (name, rw, bs) in [
        ("randread-4k", "randread", "4k"),
        ("seqread-1m", "read", "1M"),
    ] {
        v.push(format!("--name={name}"));
        v.push(format!("--rw={rw}"));
        v.push(format!("--bs={bs}"));
        v.push("--stonewall".into());
    }
    v
}

/// `randread_4k_iops` and `seqread_1m_mib_s` from fio's JSON, which may be preceded or
/// followed by other output (a VM's console, fio's warnings).
pub fn parse_fio(output: &str) -> Result<Metrics, String> {
    let start = output
        .find("{\n")
        .or_else(|| output.find('{'))
        .ok_or_else(|| format!("no fio JSON in output: {}", short(output)))?;
    let json: serde_json::Value = serde_json::Deserializer::from_str(&output[start..])
        .into_iter()
        .next()
        .ok_or("empty fio output")?
        .map_err(|e| format!("fio JSON: {e}"))?;
    let job = |name: &str| {
        json["jobs"]
            .as_array()
            .and_then(|jobs| jobs.iter().find(|j| j["jobname"] == name))
            .map(|j| &j["read"])
            .ok_or_else(|| format!("fio JSON has no job {name}"))
    };
    let number = |v: &serde_json::Value, what: &str| {
        v.as_f64()
            .filter(|x| *x > 0.0)
            .ok_or_else(|| format!("fio JSON: {what} missing or zero"))
    };
    let iops = number(&job("randread-4k")?["iops"], "randread-4k iops")?;
    // fio's "bw" is KiB/s.
    let kib_s = number(&job("seqread-1m")?["bw"], "seqread-1m bw")?;
    Ok(Metrics::from([
        (metric::RANDREAD_4K_IOPS.key.into(), iops),
        (metric::SEQREAD_1M_MIB_S.key.into(), kib_s / 1024.0),
    ]))
}

fn short(text: &str) -> String {
    text.trim()
        .chars()
        .take(300)
        .collect::<String>()
        .replace('\n', " | ")
}

/// The scratch disk file; removed when dropped.
#[derive(Debug)]
pub struct ScratchDisk {
    path: PathBuf,
}

impl ScratchDisk {
    /// Writes [`DISK_BYTES`] of pseudo-random bytes to `path` and syncs them, then drops
    /// them from the host page cache so the first reads find them on the device, as the
    /// later O_DIRECT reads will.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let disk = Self { path: path.into() };
        let mut file = std::fs::File::create(path)?;
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..DISK_BYTES / chunk.len() as u64 {
            for word in chunk.chunks_exact_mut(8) {
                // xorshift64: cheap bytes no filesystem or device can compress away.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
        use std::os::fd::AsRawFd;
        // SAFETY: advisory call on an open descriptor; no memory is passed.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        Ok(disk)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::runner;
    use crate::scenario::tests::ctx;

    pub(crate) const FIO_JSON: &str = r#"{
  "fio version" : "fio-3.33",
  "jobs" : [
    { "jobname" : "randread-4k", "read" : { "iops" : 5123.5, "bw" : 20494 } },
    { "jobname" : "seqread-1m", "read" : { "iops" : 410.0, "bw" : 419840 } }
  ]
}"#;

    #[test]
    fn numbers_come_from_the_named_jobs() {
        let noisy = format!("fio: some warning\n{FIO_JSON}\ntwinbox-init: bye\n");
        let m = parse_fio(&noisy).unwrap();
        assert_eq!(m["randread_4k_iops"], 5123.5);
        assert_eq!(m["seqread_1m_mib_s"], 410.0);
    }

    #[test]
    fn broken_output_is_an_error() {
        assert!(parse_fio("fio: cannot open /dev/vdb").is_err());
        assert!(parse_fio("{ \"jobs\": [] }")
            .unwrap_err()
            .contains("randread-4k"));
        let zero = FIO_JSON.replace("5123.5", "0");
        assert!(parse_fio(&zero).unwrap_err().contains("zero"));
    }

    #[test]
    fn argv_reads_only_the_given_path() {
        let v = fio_argv("/dev/vdb");
        assert!(v.contains(&"--filename=/dev/vdb".to_string()));
        assert!(v.contains(&"--readonly".to_string()));
        assert!(v.contains(&"--direct=1".to_string()));
        assert_eq!(v.iter().filter(|a| a.starts_with("--name=")).count(), 2);
    }

    #[test]
    fn each_box_reads_the_disk_where_it_has_it() {
        let c = ctx();
        let filename = |caps: &Capabilities| {
            let spec = Disk.spec(&c, caps);
            assert_eq!(spec.disks.len(), 1);
            assert!(spec.disks[0].read_only);
            assert_eq!(spec.disks[0].path, c.disk);
            spec.argv
                .into_iter()
                .find_map(|a| a.strip_prefix("--filename=").map(String::from))
                .unwrap()
        };
        assert_eq!(filename(&runner::native::CAPABILITIES), "/scratch.img");
        assert_eq!(filename(&runner::vm::CAPABILITIES), "/dev/vdb");
        assert_eq!(filename(&runner::container::CAPABILITIES), "/mnt/disk0");
        assert_eq!(filename(&runner::PEER_RUNTIME), "/mnt/disk0");
        assert_eq!(filename(&runner::peer_qemu::CAPABILITIES), "/dev/vdb");
    }

    #[test]
    fn scratch_disk_is_full_size_random_and_removed() {
        let path = std::env::temp_dir().join(format!("twinbox-scratch-{}", std::process::id()));
        {
            let disk = ScratchDisk::create(&path).unwrap();
            let meta = std::fs::metadata(disk.path()).unwrap();
            assert_eq!(meta.len(), DISK_BYTES);
            let mut head = [0u8; 4096];
            use std::io::Read;
            std::fs::File::open(disk.path())
                .unwrap()
                .read_exact(&mut head)
                .unwrap();
            assert!(head[..4096].iter().filter(|b| **b == 0).count() < 64);
        }
        assert!(!path.exists());
    }
}
