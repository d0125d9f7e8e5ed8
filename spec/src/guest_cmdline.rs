//! The guest kernel command line contract: what every VMM that boots twinbox's kernel and
//! image passes (twinbox's own VMM and the QEMU peer alike), so both boot the same guest.

/// The fixed part: serial console, reset through the i8042 (`reboot=k`), reboot at once on
/// panic, quiet, read-only ext4 root on the first virtio-blk device, twinbox-init as init.
pub const BASE: &str = "console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda ro rootfstype=ext4 \
                        init=/sbin/twinbox-init";

/// Extra options a PVM host needs (see docs/vm-on-pvm.md): no speculative-execution
/// mitigations (they issue `verw`, which PVM's emulator cannot run) and CPU features PVM's
/// emulator lacks hidden.
pub const PVM_EXTRA: &str = "mitigations=off noxsave clearcpuid=popcnt,rdtscp,invpcid,smap";

/// The longest command line the guest kernel takes, with its NUL (x86 `COMMAND_LINE_SIZE`).
pub const MAX_LEN: usize = 2048;
