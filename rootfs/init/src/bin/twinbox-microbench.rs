//! `twinbox-microbench`: the cost of the three kernel entry points a box taxes most —
//! a system call, a fork, an exec — measured from inside the box.
//!
//! It is a static binary in the image (`/usr/bin/twinbox-microbench`), and the very same
//! file sits next to the image in the cache for the bench's native runs, so all boxes
//! run identical code.
//!
//! Each measurement repeats its operation in batches until at least [`MIN_TIME`] has
//! passed, then prints one `key: value` line with the mean cost per operation:
//!
//! - `syscall_ns`: `syscall(SYS_getppid)` — a real kernel entry and exit every time (no
//!   vDSO, nothing cached by libc), the floor of every system call's cost.
//! - `fork_us`: `fork()` of this small process, the child `_exit(0)`s at once, the parent
//!   `waitpid`s — process creation and teardown (page tables, a pid in the namespace).
//! - `exec_us`: the same, but the child `execve`s this binary again with `--exit`, which
//!   returns 0 at once — adds loading a static ELF from the box's root filesystem.
//!
//! Usage: `twinbox-microbench [syscall|fork|exec]...` (default: all three, in that order).
//!
//! A second mode measures TCP request/response latency between two machines, or between
//! a host and a box (the bench's `net` scenario): one connection, `TCP_NODELAY`, the
//! client writes 1 byte and waits for the server's 1-byte answer, again and again.
//!
//! - `twinbox-microbench --tcp-rr-server PORT [--announce HOST:PORT TOKEN] [--wait S]`:
//!   listens on `0.0.0.0:PORT`; with `--announce`, once listening it connects to
//!   `HOST:PORT` (`gateway` = this network namespace's default gateway, from
//!   `/proc/net/route`) and writes `TOKEN\n`, so whoever waits there learns that the server
//!   is ready and, from the connection's source, where it is. It then serves one client
//!   (echoing each byte) until that client closes, prints `tcp_rr_served: N` and exits 0;
//!   no client within `--wait` seconds (default 60) is an error.
//! - `twinbox-microbench --tcp-rr-client HOST:PORT [--seconds N]`: connects (retrying a
//!   refused connection for up to 10 s: the server may still be starting), runs
//!   transactions for N seconds (default 5) and prints `tcp_rr_per_s`, `tcp_rr_p50_us`,
//!   `tcp_rr_p99_us` (round trip as the client's clock saw it).

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Each measurement runs at least this long.
const MIN_TIME: Duration = Duration::from_millis(500);
/// Argument that makes the binary exit 0 at once (the exec target).
const EXIT_ARG: &str = "--exit";

/// One measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Measure {
    Syscall,
    Fork,
    Exec,
}

impl Measure {
    const ALL: [Measure; 3] = [Measure::Syscall, Measure::Fork, Measure::Exec];

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    fn name(self) -> &'static str {
        match self {
            Measure::Syscall => "syscall",
            Measure::Fork => "fork",
            Measure::Exec => "exec",
        }
    }

    /// Output key and the unit the mean is printed in (nanoseconds per unit).
    fn key(self) -> (&'static str, f64) {
        match self {
            Measure::Syscall => ("syscall_ns", 1.0),
            Measure::Fork => ("fork_us", 1_000.0),
            Measure::Exec => ("exec_us", 1_000.0),
        }
    }

    /// Operations per batch: a clock read per batch must not weigh on the result.
    fn batch(self) -> u64 {
        match self {
            Measure::Syscall => 10_000,
            Measure::Fork | Measure::Exec => 10,
        }
    }
}

/// The measurements asked for on the command line.
fn parse_args(args: &[String]) -> Result<Vec<Measure>, String> {
    if args.is_empty() {
        return Ok(Measure::ALL.to_vec());
    }
    args.iter()
        .map(|a| {
            Measure::parse(a)
                .ok_or_else(|| format!("unknown measurement {a:?}: use syscall, fork, exec"))
        })
        .collect()
}

/// The line printed for a measurement.
fn format_line(m: Measure, ops: u64, elapsed: Duration) -> String {
    let (key, unit_ns) = m.key();
    let per_op = elapsed.as_nanos() as f64 / ops as f64 / unit_ns;
    format!(
        "{key}: {per_op:.3} ({ops} ops in {:.3} s)",
        elapsed.as_secs_f64()
    )
}

/// Waits for `pid`; `Err` unless it exited 0.
fn reap(pid: libc::pid_t) -> Result<(), String> {
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("waitpid: {e}"));
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(format!("child ended with wait status {status:#x}"))
    }
}

/// What one operation of `m` needs prepared before timing starts.
struct Exec {
    path: CString,
    argv: [*const libc::c_char; 3],
    env: [*const libc::c_char; 1],
    arg: CString,
}

impl Exec {
    fn new() -> Result<Box<Self>, String> {
        let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
        let path = CString::new(exe.into_os_string().into_encoded_bytes())
            .map_err(|_| "this binary's path has a NUL byte".to_string())?;
        let arg = CString::new(EXIT_ARG).expect("no NUL");
        let mut e = Box::new(Self {
            argv: [std::ptr::null(); 3],
            env: [std::ptr::null()],
            path,
            arg,
        });
        e.argv = [e.path.as_ptr(), e.arg.as_ptr(), std::ptr::null()];
        Ok(e)
    }
}

/// One fork, and in the child either `_exit(0)` or the exec.
fn fork_once(exec: Option<&Exec>) -> Result<(), String> {
    // SAFETY: the child only calls async-signal-safe functions (execve, _exit) on data
    // prepared before the fork.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            if let Some(e) = exec {
                // SAFETY: path, argv and env are NUL-terminated and live (owned by `e`).
                unsafe { libc::execve(e.path.as_ptr(), e.argv.as_ptr(), e.env.as_ptr()) };
                // SAFETY: leaving the child without running the parent's destructors.
                unsafe { libc::_exit(127) };
            }
            // SAFETY: as above.
            unsafe { libc::_exit(0) }
        }
        pid => reap(pid),
    }
}

/// Runs `m` in batches for at least [`MIN_TIME`]; returns (ops, elapsed).
fn measure(m: Measure) -> Result<(u64, Duration), String> {
    let exec = match m {
        Measure::Exec => Some(Exec::new()?),
        _ => None,
    };
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < MIN_TIME {
        for _ in 0..m.batch() {
            match m {
                Measure::Syscall => {
                    // SAFETY: getppid takes no arguments and cannot fail.
                    let ppid = unsafe { libc::syscall(libc::SYS_getppid) };
                    std::hint::black_box(ppid);
                }
                Measure::Fork => fork_once(None)?,
                Measure::Exec => fork_once(exec.as_deref())?,
            }
        }
        ops += m.batch();
    }
    Ok((ops, start.elapsed()))
}

/// The request/response mode asked for on the command line.
#[derive(Clone, Debug, PartialEq)]
enum Rr {
    /// Serve one client on this port, after announcing readiness to `announce`.
    Server {
        port: u16,
        announce: Option<(String, String)>,
        wait: Duration,
    },
    /// Run transactions against `target` for `seconds`.
    Client { target: String, seconds: f64 },
}

/// Default time a server waits for its client.
const RR_WAIT: Duration = Duration::from_secs(60);
/// Default length of a client run.
const RR_SECONDS: f64 = 5.0;
/// How long a client retries a refused connection.
const RR_CONNECT_RETRY: Duration = Duration::from_secs(10);

/// `Some` when `args` ask for the request/response mode (see the module docs).
fn parse_rr(args: &[String]) -> Option<Result<Rr, String>> {
    let first = args.first()?.as_str();
    if first != "--tcp-rr-server" && first != "--tcp-rr-client" {
        return None;
    }
    Some(parse_rr_args(first, &args[1..]))
}

fn parse_rr_args(mode: &str, rest: &[String]) -> Result<Rr, String> {
    let value = rest
        .first()
        .ok_or_else(|| format!("{mode} needs a value"))?
        .clone();
    let mut announce = None;
    let mut wait = RR_WAIT;
    let mut seconds = RR_SECONDS;
    let mut i = 1;
    while i < rest.len() {
        let arg = rest[i].as_str();
        let next = |n: usize| {
            rest.get(i + n)
                .cloned()
                .ok_or_else(|| format!("{arg} needs a value"))
        };
        match (mode, arg) {
            ("--tcp-rr-server", "--announce") => {
                announce = Some((next(1)?, next(2)?));
                i += 3;
            }
            ("--tcp-rr-server", "--wait") => {
                let s: f64 = next(1)?
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or("--wait needs a positive number of seconds")?;
                wait = Duration::from_secs_f64(s);
                i += 2;
            }
            ("--tcp-rr-client", "--seconds") => {
                seconds = next(1)?
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or("--seconds needs a positive number")?;
                i += 2;
            }
            _ => return Err(format!("{mode}: unexpected argument {arg:?}")),
        }
    }
    if mode == "--tcp-rr-server" {
        let port = value
            .parse()
            .map_err(|_| format!("--tcp-rr-server: {value:?} is not a port"))?;
        Ok(Rr::Server {
            port,
            announce,
            wait,
        })
    } else {
        if !value.contains(':') {
            return Err(format!("--tcp-rr-client: {value:?} is not HOST:PORT"));
        }
        Ok(Rr::Client {
            target: value,
            seconds,
        })
    }
}

/// The default gateway in `/proc/net/route`'s text (the kernel prints addresses as
/// native-endian hex).
fn default_gateway(route_table: &str) -> Option<Ipv4Addr> {
    route_table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[1] != "00000000" {
            return None;
        }
        let gw = u32::from_str_radix(f[2], 16).ok().filter(|g| *g != 0)?;
        // Read back as a native u32, the bytes are in network order again.
        Some(Ipv4Addr::from(gw.to_ne_bytes()))
    })
}

/// `HOST:PORT` resolved, with `gateway` standing for the default gateway.
fn resolve(target: &str) -> Result<SocketAddr, String> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("{target:?} is not HOST:PORT"))?;
    if host == "gateway" {
        let table = std::fs::read_to_string("/proc/net/route")
            .map_err(|e| format!("/proc/net/route: {e}"))?;
        let gw = default_gateway(&table).ok_or("no default gateway in /proc/net/route")?;
        let port = port.parse().map_err(|_| format!("{target:?}: bad port"))?;
        return Ok(SocketAddr::V4(SocketAddrV4::new(gw, port)));
    }
    target
        .to_socket_addrs()
        .map_err(|e| format!("{target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target}: no address"))
}

/// Waits until `fd` is readable, at most `limit`; false on timeout.
fn readable_within(fd: i32, limit: Duration) -> Result<bool, String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, count 1.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(true);
        }
        if r == 0 {
            return Ok(false);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("poll: {e}"));
        }
    }
}

/// The server: listen, announce, serve one client, print how many transactions it saw.
fn rr_server(port: u16, announce: Option<(String, String)>, wait: Duration) -> Result<(), String> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .map_err(|e| format!("listening on port {port}: {e}"))?;
    if let Some((target, token)) = announce {
        let addr = resolve(&target)?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("announcing to {addr}: {e}"))?;
        s.write_all(format!("{token}\n").as_bytes())
            .map_err(|e| format!("announcing to {addr}: {e}"))?;
    }
    if !readable_within(listener.as_raw_fd(), wait)? {
        return Err(format!(
            "no client on port {port} within {:.0} s",
            wait.as_secs_f64()
        ));
    }
    let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    conn.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    // A client that vanishes without closing must not hold the box forever.
    conn.set_read_timeout(Some(wait))
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    let mut served = 0u64;
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => {
                conn.write_all(&byte)
                    .map_err(|e| format!("answering: {e}"))?;
                served += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading a request: {e}")),
        }
    }
    println!("tcp_rr_served: {served}");
    Ok(())
}

/// Connects to `addr`, retrying a refused connection for [`RR_CONNECT_RETRY`].
fn connect_retrying(addr: SocketAddr) -> Result<TcpStream, String> {
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && start.elapsed() < RR_CONNECT_RETRY =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("connecting to {addr}: {e}")),
        }
    }
}

/// Round trips for `seconds`, in ns.
fn rr_transactions(conn: &mut TcpStream, seconds: f64) -> Result<Vec<u64>, String> {
    let run = Duration::from_secs_f64(seconds);
    let mut rtts = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let mut byte = [b'x'];
    while start.elapsed() < run {
        let t = Instant::now();
        conn.write_all(&byte).map_err(|e| format!("sending: {e}"))?;
        conn.read_exact(&mut byte)
            .map_err(|e| format!("waiting for the answer: {e}"))?;
        rtts.push(t.elapsed().as_nanos() as u64);
    }
    Ok(rtts)
}

/// The client's three lines: transactions/s over `elapsed`, p50 and p99 round trip, µs.
fn rr_lines(mut rtts: Vec<u64>, elapsed: Duration) -> Result<String, String> {
    if rtts.is_empty() {
        return Err("no transaction completed".into());
    }
    rtts.sort_unstable();
    // Nearest rank: the smallest value with at least q of the samples at or below it.
    let pct = |q: f64| {
        let rank = ((q * rtts.len() as f64).ceil() as usize).clamp(1, rtts.len());
        rtts[rank - 1] as f64 / 1_000.0
    };
    Ok(format!(
        "tcp_rr_per_s: {:.1} ({} transactions in {:.3} s)\ntcp_rr_p50_us: {:.1}\ntcp_rr_p99_us: {:.1}",
        rtts.len() as f64 / elapsed.as_secs_f64(),
        rtts.len(),
        elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99)
    ))
}

/// The client: connect, run transactions, print the numbers, close (ending the server).
fn rr_client(target: &str, seconds: f64) -> Result<(), String> {
    let addr = resolve(target)?;
    let mut conn = connect_retrying(addr)?;
    conn.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    let start = Instant::now();
    let rtts = rr_transactions(&mut conn, seconds)?;
    let elapsed = start.elapsed();
    println!("{}", rr_lines(rtts, elapsed)?);
    Ok(())
}

fn run_rr(rr: Rr) -> Result<(), String> {
    match rr {
        Rr::Server {
            port,
            announce,
            wait,
        } => rr_server(port, announce, wait),
        Rr::Client { target, seconds } => rr_client(&target, seconds),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(EXIT_ARG) {
        return;
    }
    let result = match parse_rr(&args) {
        Some(rr) => rr.and_then(run_rr),
        None => parse_args(&args).and_then(|ms| {
            for m in ms {
                let (ops, elapsed) = measure(m)?;
                println!("{}", format_line(m, ops, elapsed));
            }
            Ok(())
        }),
    };
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("twinbox-microbench: {e}");
            1
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_all_three_in_order() {
        assert_eq!(parse_args(&[]).unwrap(), Measure::ALL.to_vec());
        let one = parse_args(&["fork".to_string()]).unwrap();
        assert_eq!(one, vec![Measure::Fork]);
        assert!(parse_args(&["nope".to_string()])
            .unwrap_err()
            .contains("unknown measurement"));
    }

    #[test]
    fn lines_carry_the_mean_in_the_keys_unit() {
        let l = format_line(Measure::Syscall, 1000, Duration::from_micros(50));
        assert!(l.starts_with("syscall_ns: 50.000 (1000 ops"), "{l}");
        let l = format_line(Measure::Exec, 10, Duration::from_millis(5));
        assert!(l.starts_with("exec_us: 500.000 (10 ops"), "{l}");
    }

    #[test]
    fn fork_and_syscall_run_for_real() {
        let (ops, elapsed) = measure(Measure::Syscall).unwrap();
        assert!(ops >= Measure::Syscall.batch() && elapsed >= MIN_TIME);
        fork_once(None).unwrap();
    }

    #[test]
    fn rr_arguments_parse_and_bad_ones_are_named() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_rr(&a(&["fork"])), None);
        assert_eq!(
            parse_rr(&a(&[
                "--tcp-rr-server",
                "5203",
                "--announce",
                "gateway:9",
                "t0k"
            ])),
            Some(Ok(Rr::Server {
                port: 5203,
                announce: Some(("gateway:9".into(), "t0k".into())),
                wait: RR_WAIT
            }))
        );
        assert_eq!(
            parse_rr(&a(&["--tcp-rr-client", "10.0.0.2:5203", "--seconds", "2"])),
            Some(Ok(Rr::Client {
                target: "10.0.0.2:5203".into(),
                seconds: 2.0
            }))
        );
        let err = |v: &[&str]| parse_rr(&a(v)).unwrap().unwrap_err();
        assert!(err(&["--tcp-rr-server", "x"]).contains("not a port"));
        assert!(err(&["--tcp-rr-server"]).contains("needs a value"));
        assert!(err(&["--tcp-rr-client", "host"]).contains("HOST:PORT"));
        assert!(err(&["--tcp-rr-client", "h:1", "--seconds", "-1"]).contains("positive"));
        assert!(err(&["--tcp-rr-server", "1", "--seconds", "1"]).contains("unexpected"));
    }

    #[test]
    fn default_gateway_comes_from_the_route_table() {
        // 10.201.0.1 via eth0, as the kernel prints it on little-endian x86.
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth0\t0000C90A\t00000000\t0001\t0\t0\t0\tFCFFFFFF\n\
                     eth0\t00000000\t0100C90A\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(default_gateway(table), Some(Ipv4Addr::new(10, 201, 0, 1)));
        assert_eq!(default_gateway("Iface\tDestination\n"), None);
    }

    #[test]
    fn rr_lines_have_rate_and_nearest_rank_percentiles() {
        let rtts: Vec<u64> = (1..=100).map(|i| i * 1_000).collect();
        let text = rr_lines(rtts, Duration::from_secs(2)).unwrap();
        assert!(
            text.starts_with("tcp_rr_per_s: 50.0 (100 transactions"),
            "{text}"
        );
        assert!(text.contains("\ntcp_rr_p50_us: 50.0\n"), "{text}");
        assert!(text.ends_with("\ntcp_rr_p99_us: 99.0"), "{text}");
        assert!(rr_lines(vec![], Duration::from_secs(1)).is_err());
    }

    #[test]
    fn rr_round_trip_over_loopback_with_announce() {
        let rendezvous = TcpListener::bind("127.0.0.1:0").unwrap();
        let announce_to = format!("127.0.0.1:{}", rendezvous.local_addr().unwrap().port());
        // A free port for the server: bind, read it, release it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = std::thread::spawn(move || {
            rr_server(
                port,
                Some((announce_to, "tok".into())),
                Duration::from_secs(10),
            )
        });
        let (mut a, _) = rendezvous.accept().unwrap();
        let mut line = String::new();
        a.read_to_string(&mut line).unwrap();
        assert_eq!(line, "tok\n");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut conn = connect_retrying(addr).unwrap();
        conn.set_nodelay(true).unwrap();
        let rtts = rr_transactions(&mut conn, 0.2).unwrap();
        assert!(!rtts.is_empty() && rtts.iter().all(|r| *r > 0));
        drop(conn);
        server.join().unwrap().unwrap();
    }
}
