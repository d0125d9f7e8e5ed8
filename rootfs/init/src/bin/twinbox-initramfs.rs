//! `twinbox-initramfs INIT OUTPUT`: writes twinbox's initramfs — an uncompressed newc
//! cpio archive holding `INIT` as `/init`, the console node, the mount points and the
//! marker of `initramfs_layout.rs` — to `OUTPUT`. `rootfs/build-init.sh` runs it to make
//! the cached artifact the VMM boots with.
//!
//! Written here rather than with Debian's `cpio`: the archive is deterministic by
//! construction (inode numbers in order, mtime 0, owner root), the console node goes in
//! as a header field without a `mknod` in a staging tree, and the format is unit-tested
//! below without root or tools. Uncompressed, so the guest kernel needs no decompressor
//! (only `CONFIG_BLK_DEV_INITRD`); the archive is the size of init plus a few hundred bytes.
//!
//! Exit status 0 when written (atomically: a temporary file renamed over `OUTPUT`), 125
//! with one line on stderr otherwise.

// Shared with init (`initramfs.rs`), which reads the mount points this file only lists.
#[allow(dead_code)]
#[path = "../initramfs_layout.rs"]
mod initramfs_layout;

use initramfs_layout::{CONSOLE, DIRS, INIT, MARKER, MARKER_TEXT};
use std::io::Write;
use std::path::Path;

/// One member of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A directory (mode 0755).
    Dir(String),
    /// A regular file with its mode and content.
    File(String, u32, Vec<u8>),
    /// A character device node (mode 0600) with its major and minor.
    CharDev(String, u32, u32),
}

/// The archive's members in order, parents before children, for an init binary `init`.
fn entries(init: Vec<u8>) -> Vec<Entry> {
    let mut entries: Vec<Entry> = DIRS.iter().map(|d| Entry::Dir((*d).to_owned())).collect();
    let (console, major, minor) = CONSOLE;
    entries.push(Entry::CharDev(console.to_owned(), major, minor));
    entries.push(Entry::File(
        MARKER.trim_start_matches('/').to_owned(),
        0o644,
        MARKER_TEXT.as_bytes().to_vec(),
    ));
    entries.push(Entry::File(
        INIT.trim_start_matches('/').to_owned(),
        0o755,
        init,
    ));
    entries
}

/// Pads `out` with NULs to a multiple of four bytes, as newc aligns names and data.
fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Appends one newc header, name and data (`ino` unique per member, `nlink` as a
/// filesystem would count it).
fn member(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1, // with its NUL
        0,                     // check (newc: unused)
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// The whole archive, trailer included.
fn archive(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match entry {
            Entry::Dir(name) => member(&mut out, ino, 0o040_755, 2, (0, 0), name, &[]),
            Entry::File(name, mode, data) => {
                member(&mut out, ino, 0o100_000 | mode, 1, (0, 0), name, data)
            }
            Entry::CharDev(name, major, minor) => {
                member(&mut out, ino, 0o020_600, 1, (*major, *minor), name, &[])
            }
        }
    }
    member(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
    out
}

/// Reads `init`, builds the archive and writes it to `output` through a temporary file.
fn write(init: &Path, output: &Path) -> Result<(), String> {
    let binary = std::fs::read(init).map_err(|e| format!("read {}: {e}", init.display()))?;
    if !binary.starts_with(b"\x7fELF") {
        return Err(format!("{} is not an ELF binary", init.display()));
    }
    let bytes = archive(&entries(binary));
    let tmp = output.with_extension("tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, output));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("write {}: {e}", output.display())
    })
}

fn main() {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let result = match args.as_slice() {
        [init, output] => write(Path::new(init), Path::new(output)),
        _ => Err("usage: twinbox-initramfs INIT OUTPUT".to_owned()),
    };
    if let Err(message) = result {
        eprintln!("twinbox-initramfs: {message}");
        std::process::exit(125);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member read back: (name, mode, nlink, rdev, data).
    type Parsed = (String, u32, u32, (u32, u32), Vec<u8>);

    /// A minimal newc reader, the way the kernel's `init/initramfs.c` walks the archive.
    fn parse(mut bytes: &[u8]) -> Vec<Parsed> {
        let total = bytes.len();
        let mut out = Vec::new();
        loop {
            assert!(
                (total - bytes.len()).is_multiple_of(4),
                "header not aligned"
            );
            assert_eq!(&bytes[..6], b"070701");
            let field = |i: usize| {
                let text = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(text, 16).unwrap()
            };
            let (mode, nlink, size, namesize) = (field(1), field(4), field(6), field(11));
            let rdev = (field(9), field(10));
            assert_eq!(field(5), 0, "mtime");
            assert_eq!((field(2), field(3)), (0, 0), "owner");
            let name_end = 110 + namesize as usize;
            assert_eq!(bytes[name_end - 1], 0, "name without NUL");
            let name = std::str::from_utf8(&bytes[110..name_end - 1])
                .unwrap()
                .to_owned();
            let data_start = name_end.next_multiple_of(4);
            let data = bytes[data_start..data_start + size as usize].to_vec();
            bytes = &bytes[(data_start + size as usize).next_multiple_of(4)..];
            if name == "TRAILER!!!" {
                assert!(bytes.is_empty(), "bytes after the trailer");
                return out;
            }
            out.push((name, mode, nlink, rdev, data));
        }
    }

    #[test]
    fn the_archive_holds_init_the_console_the_marker_and_the_mount_points() {
        let init = b"\x7fELF not really, three bytes odd".to_vec();
        let parsed = parse(&archive(&entries(init.clone())));
        let find = |name: &str| {
            parsed
                .iter()
                .find(|m| m.0 == name)
                .unwrap_or_else(|| panic!("{name} not in {parsed:?}"))
        };
        let init_member = find("init");
        assert_eq!((init_member.1, init_member.4.clone()), (0o100_755, init));
        let console = find("dev/console");
        assert_eq!((console.1, console.3), (0o020_600, (5, 1)));
        assert_eq!(find("twinbox-initramfs").4, MARKER_TEXT.as_bytes());
        for dir in [
            "dev",
            "proc",
            "sys",
            "twinbox/image",
            "twinbox/layer",
            "twinbox/root",
        ] {
            assert_eq!((find(dir).1, find(dir).2), (0o040_755, 2), "{dir}");
        }
        // Parents come before their children, or the kernel cannot create them.
        for (i, member) in parsed.iter().enumerate() {
            if let Some((parent, _)) = member.0.rsplit_once('/') {
                assert!(parsed[..i].iter().any(|m| m.0 == parent), "{}", member.0);
            }
        }
    }

    #[test]
    fn the_archive_is_deterministic_and_has_unique_inodes() {
        let a = archive(&entries(b"\x7fELF1".to_vec()));
        assert_eq!(a, archive(&entries(b"\x7fELF1".to_vec())));
        assert!(a.len().is_multiple_of(4));
        let inodes: Vec<&[u8]> = a
            .windows(6)
            .enumerate()
            .filter(|(_, w)| *w == b"070701")
            .map(|(at, _)| &a[at + 6..at + 14])
            .collect();
        let mut unique = inodes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), inodes.len(), "an inode number twice");
    }

    #[test]
    fn a_bad_init_or_output_is_one_line_and_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("twinbox-initramfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let not_elf = dir.join("script");
        std::fs::write(&not_elf, b"#!/bin/sh\n").unwrap();
        let out = dir.join("initramfs.cpio");
        let err = write(&not_elf, &out).unwrap_err();
        assert!(err.ends_with("is not an ELF binary"), "{err}");
        assert!(write(&dir.join("missing"), &out)
            .unwrap_err()
            .starts_with("read "));
        let elf = dir.join("init");
        std::fs::write(&elf, b"\x7fELF").unwrap();
        let err = write(&elf, &dir.join("no/such/dir/out.cpio")).unwrap_err();
        assert!(err.starts_with("write "), "{err}");
        write(&elf, &out).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["init", "initramfs.cpio", "script"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
