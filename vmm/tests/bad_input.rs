//! Input the VMM refuses before any VM exists, each with one line a user can act on.
//!
//! NEEDS nothing but a readable /proc/meminfo: no guest is booted.

mod common;

use common::{elf, fake_root, TempDir};
use twinbox_spec::RunSpec;

#[test]
fn guest_memory_above_host_ram_is_refused() {
    let dir = TempDir::new("bad-input-memory");
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf(&[0xf4])).unwrap();
    let root = dir.join("root.img");
    fake_root(&root);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let host_mib = twinbox_spec::host::status_field_kib(&meminfo, "MemTotal").unwrap() >> 10;
    let mut spec = RunSpec::new(&root, vec!["/bin/true".into()]);
    spec.kernel = Some(kernel);
    spec.memory_mib = u32::try_from(host_mib + 1).unwrap();
    let err = vmm::run(&spec).expect_err("a guest bigger than the host must be refused");
    let text = err.to_string();
    assert!(
        text.contains("more than this host's") && text.contains(&format!("at most {host_mib}")),
        "{text}"
    );
    assert!(!text.contains('\n'), "one line: {text}");
}
