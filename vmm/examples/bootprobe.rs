// Scratch: boot the kernel with serial only, print console with timestamps.
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm::cpuid::Profile;
use vmm::machine::{self, BootEntry};
use vmm::vcpu::*;
use vmm_sys_util::eventfd::EventFd;

struct P {
    start: Instant,
    line: Mutex<Vec<u8>>,
    reset: EventFd,
    lsr_reads: Mutex<u64>,
}
impl IoHandler for P {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            0x3fd => {
                data[0] = 0x60;
            } // LSR: THR empty
            0x3f8..=0x3ff => data.fill(0),
            _ => data.fill(0xff),
        }
        let _ = &self.lsr_reads;
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if port == 0x3f8 {
            let mut l = self.line.lock().unwrap();
            if data[0] == b'\n' {
                let t = self.start.elapsed().as_secs_f64();
                println!("[{t:8.3}] {}", String::from_utf8_lossy(&l));
                std::io::stdout().flush().unwrap();
                l.clear();
            } else if data[0] != b'\r' {
                l.push(data[0]);
            }
        }
        if port == 0x64 && data[0] == 0xfe {
            self.reset.write(1).unwrap();
        }
        if port == 0x120 {
            println!(
                "[{:8.3}] MARKER {:x?}",
                self.start.elapsed().as_secs_f64(),
                data
            );
        }
    }
    fn mmio_read(&self, _: u64, d: &mut [u8]) {
        d.fill(0xff)
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kernel = &args[1];
    let extra = args.get(2).cloned().unwrap_or_default();
    let start = Instant::now();
    let kvm = machine::open_kvm().unwrap();
    let pvm = machine::host_is_pvm();
    let mem = vmm::memory::create(256).unwrap();
    let vm = machine::create_vm(&kvm).unwrap();
    vmm::memory::register(&vm, &mem).unwrap();
    let k = vmm::boot::load_kernel(&mem, std::path::Path::new(kernel)).unwrap();
    eprintln!("entry {:?} {:#x}", k.mode, k.rip);
    let t = vmm::mptable::build(vmm::layout::MPTABLE_START, 1);
    use vm_memory::Bytes;
    mem.write_slice(&t, vm_memory::GuestAddress(vmm::layout::MPTABLE_START))
        .unwrap();
    let line = vmm::boot::cmdline::build(&[
        "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1",
        if pvm {
            vmm::boot::cmdline::PVM_EXTRA
        } else {
            ""
        },
        &extra,
    ])
    .unwrap();
    eprintln!("cmdline {line}");
    vmm::boot::params::write_cmdline(&mem, &line).unwrap();
    let bi = vmm::boot::params::write_boot_info(&mem, &k, line.len() + 1, None, 256 << 20).unwrap();
    vmm::regs::write_boot_tables(&mem, k.mode).unwrap();
    let fds = machine::create_vcpus(
        &kvm,
        &vm,
        1,
        if pvm { Profile::Pvm } else { Profile::Host },
        BootEntry {
            mode: k.mode,
            rip: k.rip,
            boot_info: bi,
        },
    )
    .unwrap();
    let reset = EventFd::new(0).unwrap();
    let io = Arc::new(P {
        start,
        line: Mutex::new(vec![]),
        reset: reset.try_clone().unwrap(),
        lsr_reads: Mutex::new(0),
    });
    let exit = EventFd::new(0).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel();
    let th: Vec<_> = fds
        .into_iter()
        .enumerate()
        .map(|(i, fd)| {
            VcpuThread::spawn(
                fd,
                VcpuContext {
                    id: i as u32,
                    io: io.clone(),
                    memory: mem.clone(),
                    stop: stop.clone(),
                    exit_evt: exit.try_clone().unwrap(),
                    reasons: tx.clone(),
                    on_first_run: None,
                    pvm_workarounds: pvm,
                },
            )
            .unwrap()
        })
        .collect();
    let secs: i32 = std::env::var("T")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let mut fdsp = [
        libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&reset),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&exit),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let n = unsafe { libc::poll(fdsp.as_mut_ptr(), 2, secs * 1000) };
    stop.store(true, std::sync::atomic::Ordering::Release);
    eprintln!(
        "[{:8.3}] end poll={n} reset={} partial={:?}",
        start.elapsed().as_secs_f64(),
        fdsp[0].revents,
        String::from_utf8_lossy(&io.line.lock().unwrap())
    );
    for t in th {
        t.stop_and_join();
    }
    eprintln!("reasons {:?}", rx.try_iter().collect::<Vec<_>>());
}
