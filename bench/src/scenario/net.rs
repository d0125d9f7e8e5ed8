//! `net`: TCP throughput (iperf3, one stream each way) and TCP request/response latency
//! (`twinbox-microbench`, 1-byte messages) between the host and a server in the box.
//!
//! One measurement is one box run whose workload is the servers, while a thread of the
//! bench runs the clients on the host:
//!
//! 1. The bench listens on a rendezvous port (loopback for native, every host address for
//!    a box, whose link address is not known before it starts) and starts the box with
//!    [`server_script`]: two one-off iperf3 servers and the microbench's one-client
//!    request/response server, which, once listening, connects to the rendezvous
//!    (`gateway:PORT` in a box: its default gateway is the host's end of its link) and
//!    sends a per-run token. The connection's source is where the box is.
//! 2. The clients, one after another: `iperf3 -c` (host → box), `iperf3 -c -R` (box →
//!    host), `twinbox-microbench --tcp-rr-client`. An iperf3 server may still be starting
//!    when its client runs: a refused connection is retried a bounded number of times.
//! 3. Each server serves one client and exits, so the box's workload ends with the
//!    measurement. If a client fails, the bench connects once to every server port and
//!    closes, which ends the servers still waiting; the rendezvous wait ends when the box
//!    does, or after a bounded time.
//!
//! Native runs both ends on the host over loopback, with the host's iperf3 and the
//! microbench copy beside the image: the baseline every box's link is compared with.

use super::{output, succeeded, tail, trim_output, Context, Measured, Metrics, Scenario};
use crate::metric::{self, Metric};
use crate::runner::{process, Capabilities, Guest, NetAt, Runner, TimeLimit};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use twinbox_spec::run_spec::NetMode;
use twinbox_spec::{RunReport, RunSpec};

/// Its name.
pub const NAME: &str = "net";

/// The `net` scenario.
pub struct Net;

/// Seconds iperf3 measures each way (after [`IPERF_OMIT_S`]).
pub const IPERF_SECONDS: u32 = 3;
/// Seconds iperf3 leaves out at the start of each test (TCP slow start).
pub const IPERF_OMIT_S: u32 = 1;
/// Seconds of request/response transactions.
pub const RR_SECONDS: u32 = 3;
/// Refused connections an iperf3 client retries while its server starts.
const CONNECT_RETRIES: u32 = 100;
/// Pause between two such retries.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// What the host-side clients take at most when all goes well, plus slack: added to a
/// box's time limit.
const CLIENTS_TIME: Duration =
    Duration::from_secs((2 * (IPERF_SECONDS + IPERF_OMIT_S) + RR_SECONDS + 15) as u64);
/// How long a box's servers wait for their client, seconds: a bound, never reached when
/// the bench is alive (it ends them itself).
const SERVER_WAIT_S: u32 = 120;
/// How long host-time boxes (native, containers) get to announce their servers.
const HOST_ANNOUNCE_WAIT: Duration = Duration::from_secs(60);
/// What stands for the rendezvous in the workload shown in reports.
const RENDEZVOUS_PLACEHOLDER: &str = "<rendezvous>";

impl Scenario for Net {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "Servers in the box, clients on the host: iperf3, one TCP stream, 3 s after 1 s \
         of slow start, host → box then box → host (`-R`), Gbit/s arriving; then \
         `twinbox-microbench` TCP request/response, 1-byte messages, TCP_NODELAY, one \
         connection for 3 s: transactions/s and p50/p99 round trip. The container and \
         runc get a veth /30 link to the host (runc joins a network namespace the bench \
         prepared, given by path), QEMU a tap with virtio-net-device; native runs both \
         ends on the host over loopback, the baseline. Boxes without a network sit out, \
         saying why."
    }

    fn workload(&self) -> Vec<String> {
        let ports = Ports {
            forward: 5201,
            reverse: 5202,
            rr: 5203,
        };
        server_argv(
            "iperf3",
            "twinbox-microbench",
            ports,
            RENDEZVOUS_PLACEHOLDER,
            "<token>",
        )
    }

    fn metrics(&self) -> &'static [Metric] {
        &[
            metric::TCP_TO_BOX_GBIT_S,
            metric::TCP_FROM_BOX_GBIT_S,
            metric::TCP_RR_PER_S,
            metric::TCP_RR_P50_US,
            metric::TCP_RR_P99_US,
        ]
    }

    fn charted(&self) -> &'static [Metric] {
        &[metric::TCP_TO_BOX_GBIT_S, metric::TCP_RR_P50_US]
    }

    fn sits_out(&self, caps: &Capabilities) -> Option<&'static str> {
        if caps.guest == Guest::TinyOnly {
            return Some("boots only the tiny guest, not the image");
        }
        match caps.net {
            NetAt::Missing(why) => Some(why),
            NetAt::Loopback | NetAt::Link => None,
        }
    }

    fn adjust(&self, spec: &mut RunSpec, _ctx: &Context, caps: &Capabilities) {
        if caps.net == NetAt::Link {
            spec.net = Some(NetMode::Link);
        }
        // The box lives through the whole measurement: its limit (`--vm-timeout` for VMs
        // and peers, a start-up bound) gets the clients' time on top.
        spec.time_limit = spec.time_limit.map(|t| t + CLIENTS_TIME);
    }

    fn extract(&self, _report: &RunReport) -> Result<Metrics, String> {
        // The numbers come from the host-side clients (see `measure`), not from the box.
        Err("the net scenario's numbers come from its host-side clients".into())
    }

    fn measure(&self, runner: &dyn Runner, ctx: &Context) -> Measured {
        let caps = runner.capabilities();
        let mut spec = self.spec(ctx, &caps);
        let setup = match Setup::new(&caps) {
            Ok(s) => s,
            Err(e) => {
                return Measured {
                    error: Some(e),
                    ..Measured::default()
                }
            }
        };
        spec.argv = setup.box_argv(&caps, ctx);
        let announce_wait = match caps.time_limit {
            TimeLimit::Host => HOST_ANNOUNCE_WAIT,
            TimeLimit::Vm => ctx.vm_timeout,
        };
        let box_ended = Arc::new(AtomicBool::new(false));
        let clients = {
            let ended = Arc::clone(&box_ended);
            let microbench = ctx.microbench.clone();
            std::thread::spawn(move || setup.run_clients(&microbench, announce_wait, &ended))
        };
        let run = runner.run(&spec);
        box_ended.store(true, Ordering::SeqCst);
        let clients = clients
            .join()
            .unwrap_or_else(|_| Err("the host-side client thread panicked".into()));
        combine(run, clients)
    }
}

/// One measurement's result from the box's run and the host-side clients.
fn combine(run: Result<RunReport, String>, clients: Result<Metrics, String>) -> Measured {
    let mut report = match run {
        Ok(r) => r,
        Err(e) => {
            return Measured {
                error: Some(e),
                ..Measured::default()
            }
        }
    };
    let box_ok = succeeded(&report);
    let error = match (&clients, box_ok) {
        (Ok(_), Ok(())) => None,
        (Err(e), _) => Some(format!("{e}; box output: {}", tail(output(&report)))),
        (Ok(_), Err(e)) => Some(format!("the box's servers: {e}")),
    };
    trim_output(&mut report);
    Measured {
        metrics: if error.is_none() {
            clients.unwrap_or_default()
        } else {
            Metrics::new()
        },
        error,
        report: Some(report),
    }
}

/// The three server ports of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    /// iperf3 server for host → box.
    pub forward: u16,
    /// iperf3 server for box → host (`-R`).
    pub reverse: u16,
    /// The microbench's request/response server.
    pub rr: u16,
}

impl Ports {
    fn all(self) -> [u16; 3] {
        [self.forward, self.reverse, self.rr]
    }
}

/// The box's workload: `sh -c` [`server_script`].
pub fn server_argv(
    iperf3: &str,
    microbench: &str,
    ports: Ports,
    announce: &str,
    token: &str,
) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        server_script(iperf3, microbench, ports, announce, token),
    ]
}

/// Two one-off iperf3 servers in the background, the request/response server in front
/// (it announces readiness to `announce` with `token`), then the status of all three.
/// Every server gives up after [`SERVER_WAIT_S`] (`timeout` for iperf3, `--wait` for the
/// microbench), so a box whose bench vanished (a runc container outlives a SIGKILLed
/// bench until the next bench's sweep) still ends by itself.
/// iperf3 keeps its send buffer in a temporary file: where `/tmp` is read-only (runc's
/// read-only root) `/dev/shm` takes it. Tried by making a file, not with `test -w`, which
/// busybox answers yes for root whatever the mount says.
pub fn server_script(
    iperf3: &str,
    microbench: &str,
    ports: Ports,
    announce: &str,
    token: &str,
) -> String {
    let Ports {
        forward,
        reverse,
        rr,
    } = ports;
    format!(
        "t=$(mktemp 2>/dev/null) && rm -f \"$t\" || export TMPDIR=/dev/shm; \
         timeout {SERVER_WAIT_S} {iperf3} -s -1 -p {forward} & f=$!; \
         timeout {SERVER_WAIT_S} {iperf3} -s -1 -p {reverse} & r=$!; \
         {microbench} --tcp-rr-server {rr} --announce {announce} {token} --wait {SERVER_WAIT_S}; \
         s=$?; wait $f; a=$?; wait $r; b=$?; \
         echo \"net servers: rr $s, iperf3 $a $b\"; \
         [ $s -eq 0 ] && [ $a -eq 0 ] && [ $b -eq 0 ]"
    )
}

/// What one measurement sets up before the box starts.
struct Setup {
    rendezvous: TcpListener,
    token: String,
    ports: Ports,
    loopback: bool,
}

impl Setup {
    fn new(caps: &Capabilities) -> Result<Self, String> {
        let loopback = caps.net == NetAt::Loopback;
        // A box's link address is unknown until it runs, so its announce may arrive on any
        // host address; it is told apart by the token.
        let bind = if loopback {
            Ipv4Addr::LOCALHOST
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        let rendezvous = TcpListener::bind((bind, 0))
            .map_err(|e| format!("rendezvous listener on {bind}: {e}"))?;
        rendezvous
            .set_nonblocking(true)
            .map_err(|e| format!("rendezvous listener: {e}"))?;
        // In a box the servers have the namespace to themselves; natively they share the
        // host's ports, so free ones are picked (a port freed here could be taken before
        // the server binds it: that run then fails and says so).
        let ports = if loopback {
            let mut p = [0u16; 3];
            let held: Vec<TcpListener> = (0..3)
                .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("picking free ports: {e}"))?;
            for (slot, l) in p.iter_mut().zip(&held) {
                *slot = l.local_addr().map_err(|e| e.to_string())?.port();
            }
            Ports {
                forward: p[0],
                reverse: p[1],
                rr: p[2],
            }
        } else {
            Ports {
                forward: 5201,
                reverse: 5202,
                rr: 5203,
            }
        };
        Ok(Self {
            rendezvous,
            token: token(),
            ports,
            loopback,
        })
    }

    /// The workload: host binaries natively, the image's otherwise.
    fn box_argv(&self, caps: &Capabilities, ctx: &Context) -> Vec<String> {
        let port = self.rendezvous.local_addr().map_or(0, |a| a.port());
        let announce = if self.loopback {
            format!("127.0.0.1:{port}")
        } else {
            // In a box the default gateway is the host's end of its link.
            format!("gateway:{port}")
        };
        // The host has no microbench of its own: the copy beside the image is the very
        // file the boxes run.
        let microbench = if caps.host_binaries {
            ctx.microbench.display().to_string()
        } else {
            "twinbox-microbench".into()
        };
        server_argv("iperf3", &microbench, self.ports, &announce, &self.token)
    }

    /// Waits for the box's announce, then runs the three clients against it; on failure
    /// ends the box's servers.
    fn run_clients(
        self,
        microbench: &std::path::Path,
        announce_wait: Duration,
        box_ended: &AtomicBool,
    ) -> Result<Metrics, String> {
        // Only loopback, or twinbox's link pool, may announce: the listener of a box run
        // is on every host address, and nothing from elsewhere is even read.
        let pool = if self.loopback {
            None
        } else {
            Some(hostnet::Pool::from_env().map_err(|e| format!("network pool: {e}"))?)
        };
        let expected = |ip: IpAddr| match (ip, pool) {
            (IpAddr::V4(v4), Some(pool)) => pool.contains(v4),
            (ip, None) => ip.is_loopback(),
            _ => false,
        };
        let host = wait_for_announce(
            &self.rendezvous,
            &self.token,
            &expected,
            announce_wait,
            box_ended,
        )?;
        let result = self.clients(host, microbench, box_ended);
        if result.is_err() {
            release_servers(host, self.ports);
        }
        result
    }

    fn clients(
        &self,
        host: IpAddr,
        microbench: &std::path::Path,
        box_ended: &AtomicBool,
    ) -> Result<Metrics, String> {
        let to_box = iperf3_client(host, self.ports.forward, false, box_ended)?;
        let from_box = iperf3_client(host, self.ports.reverse, true, box_ended)?;
        let mut cmd = Command::new(microbench);
        cmd.arg("--tcp-rr-client")
            .arg(format!("{host}:{}", self.ports.rr))
            .args(["--seconds", &RR_SECONDS.to_string()]);
        let out = run_client(cmd, Duration::from_secs(u64::from(RR_SECONDS) + 30))?;
        let mut m = parse_rr(&out)?;
        m.insert(metric::TCP_TO_BOX_GBIT_S.key.into(), to_box);
        m.insert(metric::TCP_FROM_BOX_GBIT_S.key.into(), from_box);
        Ok(m)
    }
}

/// A token no other run (of this bench or another) sends.
fn token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "twinbox-net-{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        twinbox_spec::clock::monotonic_ns()
    )
}

/// The address the box's announce with `token` came from: where its servers are.
fn wait_for_announce(
    listener: &TcpListener,
    token: &str,
    expected: &dyn Fn(IpAddr) -> bool,
    limit: Duration,
    box_ended: &AtomicBool,
) -> Result<IpAddr, String> {
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((mut conn, from)) => {
                if expected(from.ip()) && read_token(&mut conn).as_deref() == Some(token) {
                    return Ok(from.ip());
                }
                tracing::debug!(%from, "net: a connection to the rendezvous without our token");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("rendezvous accept: {e}")),
        }
        if box_ended.load(Ordering::SeqCst) {
            return Err("the box ended before its servers were ready".into());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "the box's servers did not announce themselves within {:.0} s",
                limit.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The first line a rendezvous connection sends, read for at most 5 s.
fn read_token(conn: &mut TcpStream) -> Option<String> {
    conn.set_nonblocking(false).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    conn.take(256).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8(buf).ok()?;
    Some(text.lines().next()?.trim().to_string())
}

/// One iperf3 client run against `host:port` (`-R`: the box sends), retrying while the
/// server is not listening yet; the Gbit/s that arrived.
fn iperf3_client(
    host: IpAddr,
    port: u16,
    reverse: bool,
    box_ended: &AtomicBool,
) -> Result<f64, String> {
    let mut tries = 0;
    loop {
        let mut cmd = Command::new("iperf3");
        cmd.arg("-c")
            .arg(host.to_string())
            .args(["-p", &port.to_string()])
            .args(["-t", &IPERF_SECONDS.to_string()])
            .args(["-O", &IPERF_OMIT_S.to_string()])
            .arg("-J");
        if reverse {
            cmd.arg("-R");
        }
        let limit = Duration::from_secs(u64::from(IPERF_SECONDS + IPERF_OMIT_S) + 30);
        let out = run_client(cmd, limit).or_else(|e| {
            // iperf3 -J reports errors in its JSON and may still exit 0 or 1.
            if e.contains("Connection refused") {
                Ok(e)
            } else {
                Err(e)
            }
        })?;
        match parse_iperf3(&out) {
            Err(e) if e.contains("Connection refused") && tries < CONNECT_RETRIES => {
                if box_ended.load(Ordering::SeqCst) {
                    return Err(format!("iperf3 to {host}:{port}: the box ended: {e}"));
                }
                tries += 1;
                std::thread::sleep(RETRY_PAUSE);
            }
            Err(e) if e.contains("Connection refused") => {
                return Err(format!(
                    "iperf3 server {host}:{port} not listening after {tries} tries {} ms \
                     apart: {e}",
                    RETRY_PAUSE.as_millis()
                ))
            }
            other => {
                return other.map_err(|e| {
                    format!(
                        "iperf3 {}to {host}:{port}: {e}",
                        if reverse { "-R " } else { "" }
                    )
                })
            }
        }
    }
}

/// Runs a host-side client with a time limit; its output when it exited 0, else an
/// error holding the output.
fn run_client(cmd: Command, limit: Duration) -> Result<String, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let done = process::run(cmd, twinbox_spec::clock::monotonic_ns(), true, Some(limit))?;
    let out = done.output.unwrap_or_default();
    match done.outcome {
        twinbox_spec::Outcome::Exited(0) => Ok(out),
        other => Err(format!("{program} ended with {other:?}: {}", tail(&out))),
    }
}

/// Connects once to each server port and closes: a one-off iperf3 server takes that as
/// its (failed) client and exits, the request/response server sees its client leave.
fn release_servers(host: IpAddr, ports: Ports) {
    for port in ports.all() {
        let _ = TcpStream::connect_timeout(&SocketAddr::new(host, port), Duration::from_secs(1));
    }
}

/// Gbit/s that arrived (`end.sum_received.bits_per_second`) from iperf3's JSON (`-J`),
/// or iperf3's own error.
pub fn parse_iperf3(output: &str) -> Result<f64, String> {
    let start = output
        .find('{')
        .ok_or_else(|| format!("no iperf3 JSON in output: {}", tail(output)))?;
    let json: serde_json::Value = serde_json::Deserializer::from_str(&output[start..])
        .into_iter()
        .next()
        .ok_or("empty iperf3 output")?
        .map_err(|e| format!("iperf3 JSON: {e}"))?;
    if let Some(e) = json["error"].as_str() {
        return Err(format!("iperf3: {e}"));
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .filter(|b| *b > 0.0)
        .map(|b| b / 1e9)
        .ok_or_else(|| "iperf3 JSON: end.sum_received.bits_per_second missing or zero".into())
}

/// The request/response client's three numbers (`key: value` lines).
pub fn parse_rr(output: &str) -> Result<Metrics, String> {
    [
        metric::TCP_RR_PER_S,
        metric::TCP_RR_P50_US,
        metric::TCP_RR_P99_US,
    ]
    .iter()
    .map(|m| {
        super::number_after(output, &format!("{}:", m.key))
            .filter(|v| *v > 0.0)
            .map(|v| (m.key.to_string(), v))
            .ok_or_else(|| format!("no {} in the client's output: {}", m.key, tail(output)))
    })
    .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::runner;
    use crate::scenario::tests::ctx;

    /// What iperf3 3.12 prints with `-J` (trimmed to the fields read, and one beside).
    pub(crate) const IPERF3_JSON: &str = r#"{
	"start":	{ "version": "iperf 3.12", "test_start": { "protocol": "TCP", "num_streams": 1 } },
	"end":	{
		"sum_sent":	{ "seconds": 3.000329, "bytes": 7317356544, "bits_per_second": 19506533134.598717, "retransmits": 1 },
		"sum_received":	{ "seconds": 3.000744, "bytes": 7317356544, "bits_per_second": 19498443941.707367 }
	}
}"#;

    /// iperf3's JSON when the server is not listening yet.
    const IPERF3_REFUSED: &str = r#"{
	"start":	{ "connected": [], "version": "iperf 3.12" },
	"intervals":	[],
	"end":	{ },
	"error":	"unable to connect to server: Connection refused"
}"#;

    pub(crate) const RR_OUTPUT: &str =
        "tcp_rr_per_s: 31415.9 (94247 transactions in 3.000 s)\ntcp_rr_p50_us: 29.5\ntcp_rr_p99_us: 61.2\n";

    #[test]
    fn iperf3_gives_the_received_rate_in_gbit_s() {
        let g = parse_iperf3(IPERF3_JSON).unwrap();
        assert!((g - 19.498443941707367).abs() < 1e-9, "{g}");
        let noisy = format!("warning: something\n{IPERF3_JSON}\n");
        assert!((parse_iperf3(&noisy).unwrap() - g).abs() < 1e-12);
    }

    #[test]
    fn iperf3_errors_are_iperf3s_own_words() {
        let e = parse_iperf3(IPERF3_REFUSED).unwrap_err();
        assert_eq!(e, "iperf3: unable to connect to server: Connection refused");
        assert!(parse_iperf3("iperf3: command not found").is_err());
        let zero = IPERF3_JSON.replace("19498443941.707367", "0");
        assert!(parse_iperf3(&zero).unwrap_err().contains("missing or zero"));
    }

    #[test]
    fn rr_output_gives_three_numbers_or_names_the_missing_one() {
        let m = parse_rr(RR_OUTPUT).unwrap();
        assert_eq!(
            (m["tcp_rr_per_s"], m["tcp_rr_p50_us"], m["tcp_rr_p99_us"]),
            (31415.9, 29.5, 61.2)
        );
        let e = parse_rr("tcp_rr_per_s: 10\ntcp_rr_p50_us: 5\n").unwrap_err();
        assert!(e.contains("tcp_rr_p99_us"), "{e}");
    }

    #[test]
    fn who_has_a_network_and_who_says_why_not() {
        assert_eq!(Net.sits_out(&runner::native::CAPABILITIES), None);
        assert_eq!(Net.sits_out(&runner::container::CAPABILITIES), None);
        assert_eq!(Net.sits_out(&runner::peer_runc::CAPABILITIES), None);
        assert_eq!(Net.sits_out(&runner::peer_qemu::CAPABILITIES), None);
        assert_eq!(Net.sits_out(&runner::vm::CAPABILITIES), None);
        for caps in [runner::PEER_RUNTIME, runner::TINY_GUEST_VMM] {
            let why = Net.sits_out(&caps).expect("sits out");
            assert!(why.len() > 20, "{why}");
        }
    }

    #[test]
    fn a_box_with_a_link_asks_for_one_and_native_does_not() {
        let c = ctx();
        assert_eq!(
            Net.spec(&c, &runner::container::CAPABILITIES).net,
            Some(NetMode::Link)
        );
        assert_eq!(Net.spec(&c, &runner::native::CAPABILITIES).net, None);
        // The 7 s VM limit of ctx() is a start-up bound: the measurement comes on top.
        let runc = Net.spec(&c, &runner::peer_runc::CAPABILITIES);
        assert_eq!(runc.time_limit, Some(c.vm_timeout + CLIENTS_TIME));
        assert!(CLIENTS_TIME > Duration::from_secs(u64::from(2 * IPERF_SECONDS + RR_SECONDS)));
    }

    #[test]
    fn native_runs_host_binaries_on_loopback_and_boxes_announce_to_their_gateway() {
        let c = ctx();
        let native = Setup::new(&runner::native::CAPABILITIES).unwrap();
        let argv = native.box_argv(&runner::native::CAPABILITIES, &c);
        let script = &argv[2];
        assert!(
            script.contains("/beside/twinbox-microbench --tcp-rr-server"),
            "{script}"
        );
        assert!(script.contains("--announce 127.0.0.1:"), "{script}");
        assert!(script.contains(&native.token), "{script}");
        let ports = native.ports.all();
        assert!(ports.iter().all(|p| *p > 0) && ports[0] != ports[1] && ports[1] != ports[2]);
        let boxed = Setup::new(&runner::container::CAPABILITIES).unwrap();
        let script = boxed.box_argv(&runner::container::CAPABILITIES, &c)[2].clone();
        assert!(
            script.contains("twinbox-microbench --tcp-rr-server 5203 --announce gateway:"),
            "{script}"
        );
        assert!(
            script.contains("timeout 120 iperf3 -s -1 -p 5201 &"),
            "{script}"
        );
        assert!(
            script.contains("timeout 120 iperf3 -s -1 -p 5202 &"),
            "{script}"
        );
        assert_ne!(native.token, boxed.token);
    }

    #[test]
    fn the_announce_names_the_box_and_strays_are_ignored() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            use std::io::Write;
            let mut stray = TcpStream::connect(addr).unwrap();
            stray.write_all(b"someone else\n").unwrap();
            drop(stray);
            let mut ours = TcpStream::connect(addr).unwrap();
            ours.write_all(b"tok-1\n").unwrap();
        });
        let ended = AtomicBool::new(false);
        let any = |_: IpAddr| true;
        let from =
            wait_for_announce(&listener, "tok-1", &any, Duration::from_secs(10), &ended).unwrap();
        assert_eq!(from, IpAddr::V4(Ipv4Addr::LOCALHOST));
        sender.join().unwrap();
        ended.store(true, Ordering::SeqCst);
        let e = wait_for_announce(&listener, "tok-1", &any, Duration::from_secs(10), &ended)
            .unwrap_err();
        assert!(e.contains("ended before"), "{e}");
        let quiet = AtomicBool::new(false);
        let e =
            wait_for_announce(&listener, "x", &any, Duration::from_millis(50), &quiet).unwrap_err();
        assert!(e.contains("did not announce"), "{e}");
        // The right token from an address that may not announce is not taken.
        let sender = std::thread::spawn(move || {
            use std::io::Write;
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"tok-2\n").unwrap();
        });
        let none = |_: IpAddr| false;
        let e = wait_for_announce(
            &listener,
            "tok-2",
            &none,
            Duration::from_millis(500),
            &quiet,
        )
        .unwrap_err();
        sender.join().unwrap();
        assert!(e.contains("did not announce"), "{e}");
    }

    #[test]
    fn a_run_fails_when_either_side_fails() {
        use crate::scenario::tests::report;
        use twinbox_spec::{BoxKind, Outcome};
        let ok = || Ok(report(BoxKind::Container, "net servers: rr 0, iperf3 0 0"));
        let m = combine(ok(), parse_rr(RR_OUTPUT)).metrics;
        assert_eq!(m.len(), 3);
        let bad = combine(ok(), Err("iperf3 -R to 10.201.0.2:5202: boom".into()));
        assert!(bad.metrics.is_empty());
        assert!(bad.error.unwrap().contains("boom"));
        let mut failed = report(BoxKind::Container, "");
        failed.outcome = Outcome::Exited(1);
        let bad = combine(Ok(failed), parse_rr(RR_OUTPUT));
        assert!(bad.error.unwrap().contains("servers"));
        let bad = combine(Err("container: no veth".into()), parse_rr(RR_OUTPUT));
        assert_eq!(bad.error.as_deref(), Some("container: no veth"));
    }
}
