//! The `disk` scenario's pieces: the scratch disk every box reads, the fio command line,
//! and the numbers out of fio's JSON.
//!
//! One file serves all boxes so they read the very same bytes: native opens it by its
//! host path, containers get it bind-mounted read-only at `/mnt/disk0`, the VM gets it as
//! its second virtio-blk disk, `/dev/vdb`. It is filled with pseudo-random bytes, not
//! zeros: an ext4 file whose blocks were never written has no extents, and reads of holes
//! never reach the device.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// Where the scratch disk appears inside `box_name`.
pub fn disk_path_in(box_name: &str, host_path: &Path) -> String {
    match box_name {
        "native" => host_path.display().to_string(),
        "vm" => "/dev/vdb".into(),
        // twinbox's container and the peer runtimes (which the bench gives the same bind).
        _ => "/mnt/disk0".into(),
    }
}

/// `randread_4k_iops` and `seqread_1m_mib_s` from fio's JSON, which may be preceded or
/// followed by other output (a VM's console, fio's warnings).
pub fn parse_fio(output: &str) -> Result<BTreeMap<String, f64>, String> {
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
    let mut out = BTreeMap::new();
    out.insert(
        "randread_4k_iops".into(),
        number(&job("randread-4k")?["iops"], "randread-4k iops")?,
    );
    // fio's "bw" is KiB/s.
    let kib_s = number(&job("seqread-1m")?["bw"], "seqread-1m bw")?;
    out.insert("seqread_1m_mib_s".into(), kib_s / 1024.0);
    Ok(out)
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
mod tests {
    use super::*;

    const FIO_JSON: &str = r#"{
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
        assert_eq!(disk_path_in("vm", Path::new("/x")), "/dev/vdb");
        assert_eq!(disk_path_in("native", Path::new("/x")), "/x");
        assert_eq!(disk_path_in("runc", Path::new("/x")), "/mnt/disk0");
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
