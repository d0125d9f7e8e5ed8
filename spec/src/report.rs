//! What one run reports, for either box.

use crate::phase::Timeline;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;

/// Which kind of box ran the workload.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxKind {
    /// A plain host process (the baseline).
    Native,
    /// twinbox's container.
    Container,
    /// twinbox's microVM.
    Vm,
    /// Another runtime or VMM, by name (runc, bubblewrap, qemu-microvm, firecracker, ...).
    Peer(String),
}

impl fmt::Display for BoxKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoxKind::Native => f.write_str("native"),
            BoxKind::Container => f.write_str("container"),
            BoxKind::Vm => f.write_str("vm"),
            BoxKind::Peer(name) => f.write_str(name),
        }
    }
}

/// How the workload ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exited with this status.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
    /// The box failed before the workload could report an exit (guest crash, OOM of the
    /// whole box, time limit, ...): the reason.
    Failed(String),
}

impl Outcome {
    /// The status for the CLI to exit with: the code, 128 + signal, or 1 on failure
    /// (0 is never returned for a failure).
    pub fn exit_status(&self) -> i32 {
        match self {
            Outcome::Exited(code) => *code,
            Outcome::Signaled(signal) => 128 + signal,
            Outcome::Failed(_) => 1,
        }
    }
}

impl From<twinbox_proto::ExitCode> for Outcome {
    fn from(code: twinbox_proto::ExitCode) -> Self {
        match code {
            twinbox_proto::ExitCode::Exited(c) => Outcome::Exited(i32::from(c)),
            twinbox_proto::ExitCode::Signaled(s) => Outcome::Signaled(i32::from(s)),
        }
    }
}

/// Host resources the run used. Fields a box cannot measure stay `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Peak resident set of the runtime/VMM process, KiB, excluding guest RAM where the
    /// box can tell them apart.
    pub runtime_peak_rss_kib: Option<u64>,
    /// Peak proportional set size of the runtime/VMM process, KiB (shared pages divided
    /// by their sharers), excluding guest RAM; where the box measures it.
    #[serde(default)]
    pub runtime_peak_pss_kib: Option<u64>,
    /// Guest RAM pages the host actually backed (VM), KiB.
    pub guest_memory_touched_kib: Option<u64>,
    /// Peak memory charged to the box's cgroup (container), KiB.
    pub cgroup_memory_peak_kib: Option<u64>,
    /// CPU time in user mode, microseconds.
    pub cpu_user_us: Option<u64>,
    /// CPU time in kernel mode, microseconds.
    pub cpu_system_us: Option<u64>,
    /// The box was killed for exceeding its memory limit.
    pub oom_killed: bool,
}

/// A box's link with the host (`--net`), as reports show it, so a caller can connect to
/// the box.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkInfo {
    /// The host end's interface name (`tb3`, `tbt3`).
    pub host_interface: String,
    /// The host end's address, the box's gateway.
    pub host_address: Ipv4Addr,
    /// The box's address, to connect to.
    pub box_address: Ipv4Addr,
    /// The link's prefix length (30).
    pub prefix_len: u8,
    /// The guest NIC's MAC (VM only), as `02:74:62:00:00:03`.
    pub mac: Option<String>,
    /// Whether the box's traffic is masqueraded out of the host (`--net nat`).
    pub nat: bool,
}

impl fmt::Display for LinkInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "eth0 {}/{} via {} (host {}{})",
            self.box_address,
            self.prefix_len,
            self.host_address,
            self.host_interface,
            if self.nat { ", NAT out" } else { "" }
        )
    }
}

/// The result of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub box_kind: BoxKind,
    pub outcome: Outcome,
    pub timeline: Timeline,
    /// Captured output when the spec asked for capture.
    pub output: Option<String>,
    pub usage: Usage,
    /// Facts a reader of the numbers must know (e.g. "host KVM is PVM: VM timings are not
    /// representative of VT-x/AMD-V hosts").
    pub notes: Vec<String>,
    /// The box's network link, when it had one (`--net`).
    #[serde(default)]
    pub network: Option<LinkInfo>,
}

impl RunReport {
    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("RunReport serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_follow_shell_conventions() {
        assert_eq!(Outcome::Exited(7).exit_status(), 7);
        assert_eq!(Outcome::Signaled(9).exit_status(), 137);
        assert_eq!(Outcome::Failed("x".into()).exit_status(), 1);
    }

    #[test]
    fn report_round_trips_through_json() {
        let report = RunReport {
            box_kind: BoxKind::Peer("runc".into()),
            outcome: Outcome::Signaled(15),
            timeline: Timeline::starting_at(5),
            output: Some("hi\n".into()),
            usage: Usage {
                runtime_peak_rss_kib: Some(4096),
                ..Usage::default()
            },
            notes: vec!["n".into()],
            network: Some(LinkInfo {
                host_interface: "tbt3".into(),
                host_address: Ipv4Addr::new(10, 201, 0, 13),
                box_address: Ipv4Addr::new(10, 201, 0, 14),
                prefix_len: 30,
                mac: Some("02:74:62:00:00:03".into()),
                nat: true,
            }),
        };
        let json = report.to_json();
        assert!(json.contains(r#""box_address": "10.201.0.14""#), "{json}");
        let back: RunReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        assert_eq!(
            report.network.unwrap().to_string(),
            "eth0 10.201.0.14/30 via 10.201.0.13 (host tbt3, NAT out)"
        );
    }
}
