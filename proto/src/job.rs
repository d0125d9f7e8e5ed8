//! The job: what `twinbox-init` must run, encoded as one token.
//!
//! The token is unpadded base64url over a small versioned tag-length-value record list,
//! so it survives the kernel command line (which splits on spaces and eats quotes) and an
//! environment variable alike, whatever bytes the arguments contain: spaces, quotes,
//! newlines, non-ASCII. In the VM it travels as `twinbox.job=TOKEN` on the kernel command
//! line; in the container as the `TWINBOX_JOB` environment variable of init.

use crate::base64url;
use std::fmt;
use std::net::Ipv4Addr;

/// Kernel command-line key that carries the job token in the VM.
pub const JOB_CMDLINE_KEY: &str = "twinbox.job";
/// Environment variable that carries the job token in the container.
pub const JOB_ENV_VAR: &str = "TWINBOX_JOB";

const VERSION: u8 = 1;
const TAG_ARG: u8 = 1;
const TAG_ENV: u8 = 2;
const TAG_CWD: u8 = 3;
const TAG_MARKER_PORT: u8 = 4;
const TAG_MARKER_FD: u8 = 5;
const TAG_FLAGS: u8 = 6;
const TAG_HOSTNAME: u8 = 7;
const TAG_NET: u8 = 8;
const TAG_USER: u8 = 9;

const FLAG_OVERLAY_ROOT: u32 = 1 << 0;
const FLAG_POWER_OFF: u32 = 1 << 1;
const FLAG_TTY: u32 = 1 << 2;
const FLAG_VERBOSE: u32 = 1 << 3;
const KNOWN_FLAGS: u32 = FLAG_OVERLAY_ROOT | FLAG_POWER_OFF | FLAG_TTY | FLAG_VERBOSE;

/// Where init writes its phase markers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkerChannel {
    /// Nowhere (e.g. when the artifacts are booted by a peer VMM that has no marker device).
    None,
    /// `outl` to this I/O port (the VM).
    Port(u16),
    /// `write` to this inherited file descriptor (the container).
    Fd(i32),
}

/// How init configures the box's one network interface (`eth0`): the box's end of a
/// point-to-point link with the host, whose end is the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The box's address.
    pub address: Ipv4Addr,
    /// Prefix length of the link (e.g. 30).
    pub prefix_len: u8,
    /// The host's end of the link, the default route.
    pub gateway: Ipv4Addr,
    /// Name server for `/etc/resolv.conf`, if the host has one the box can reach.
    pub resolver: Option<Ipv4Addr>,
}

impl NetConfig {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13);
        out.extend_from_slice(&self.address.octets());
        out.push(self.prefix_len);
        out.extend_from_slice(&self.gateway.octets());
        if let Some(resolver) = self.resolver {
            out.extend_from_slice(&resolver.octets());
        }
        out
    }

    fn decode(value: &[u8]) -> Result<Self, JobError> {
        let ip = |at: usize| Ipv4Addr::new(value[at], value[at + 1], value[at + 2], value[at + 3]);
        let config = match value.len() {
            9 => Self {
                address: ip(0),
                prefix_len: value[4],
                gateway: ip(5),
                resolver: None,
            },
            13 => Self {
                address: ip(0),
                prefix_len: value[4],
                gateway: ip(5),
                resolver: Some(ip(9)),
            },
            _ => return Err(JobError::BadLength(TAG_NET)),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), JobError> {
        if self.prefix_len == 0 || self.prefix_len > 30 {
            return Err(JobError::BadNet("prefix length must be 1..=30"));
        }
        if self.address == self.gateway {
            return Err(JobError::BadNet("address and gateway are the same"));
        }
        Ok(())
    }
}

/// The workload's identity (an image's `User`), set by init in the workload's process
/// right before `execve`: supplementary groups, then gid, then uid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobUser {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary group ids (may be empty: then the workload has none).
    pub groups: Vec<u32>,
}

/// Most supplementary groups a job may carry (Linux's `NGROUPS_MAX`).
pub const MAX_GROUPS: usize = 65536;

impl JobUser {
    /// uid, gid, then each supplementary gid: little-endian `u32`s.
    fn encode(&self) -> Vec<u8> {
        [self.uid, self.gid]
            .iter()
            .chain(&self.groups)
            .flat_map(|id| id.to_le_bytes())
            .collect()
    }

    fn decode(value: &[u8]) -> Result<Self, JobError> {
        if value.len() < 8 || !value.len().is_multiple_of(4) || value.len() / 4 - 2 > MAX_GROUPS {
            return Err(JobError::BadLength(TAG_USER));
        }
        let mut ids = value
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        let (uid, gid) = (ids.next().unwrap_or(0), ids.next().unwrap_or(0));
        Ok(Self {
            uid,
            gid,
            groups: ids.collect(),
        })
    }
}

/// Everything init needs to know to run one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The workload's argv; `argv[0]` is looked up in `PATH` if it has no slash.
    pub argv: Vec<String>,
    /// The workload's environment, as `KEY=VALUE` strings.
    pub env: Vec<String>,
    /// The workload's working directory.
    pub cwd: String,
    /// Where phase markers go.
    pub marker: MarkerChannel,
    /// Put an overlay with a tmpfs upper layer over the read-only root before running
    /// the workload (the VM does this in the guest; the container runtime does it on the
    /// host).
    pub overlay_root: bool,
    /// Power the machine off when the workload has exited (the VM). Otherwise init exits
    /// with the workload's status (the container).
    pub power_off: bool,
    /// Hostname to set, if any.
    pub hostname: Option<String>,
    /// The network interface to configure, if the box has one.
    pub net: Option<NetConfig>,
    /// The workload runs on a terminal (`-t`): in the container init makes its inherited
    /// stdin (the pty slave the runtime made) the workload's controlling terminal; in the
    /// VM init allocates a pty pair itself and relays it to the stdin and stdout ports
    /// (see [`crate::stdio`]).
    pub tty: bool,
    /// Init prints its own progress lines (e.g. the exit line) on its stderr: in the
    /// container the workload's stderr, in the VM the serial console. Without it init
    /// speaks only when it fails, so the workload's streams carry the workload alone.
    pub verbose: bool,
    /// Run the workload as this user (`--image` with a `User`); `None`: as init's own
    /// user, root. A token without the record decodes to `None`.
    pub user: Option<JobUser>,
}

impl Default for Job {
    fn default() -> Self {
        Self {
            argv: Vec::new(),
            env: Vec::new(),
            cwd: "/".to_owned(),
            marker: MarkerChannel::None,
            overlay_root: false,
            power_off: false,
            hostname: None,
            net: None,
            tty: false,
            verbose: false,
            user: None,
        }
    }
}

/// Why a job cannot be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobError {
    /// The token is not base64url.
    NotBase64,
    /// The token is from another protocol version.
    Version(u8),
    /// The record list ends in the middle of a record.
    Truncated,
    /// A record has an unknown tag.
    UnknownTag(u8),
    /// A fixed-size record has the wrong length.
    BadLength(u8),
    /// A string is not UTF-8 or contains a NUL byte (which `execve` cannot carry).
    BadString(&'static str),
    /// Unknown flag bits.
    UnknownFlags(u32),
    /// The job has no command.
    EmptyArgv,
    /// An environment entry lacks `=`.
    BadEnv(String),
    /// The network record does not describe a usable link.
    BadNet(&'static str),
    /// More supplementary groups than Linux takes.
    TooManyGroups(usize),
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotBase64 => write!(f, "job token is not base64url"),
            Self::Version(v) => write!(f, "job token has protocol version {v}, expected {VERSION}"),
            Self::Truncated => write!(f, "job token is truncated"),
            Self::UnknownTag(t) => write!(f, "job token has unknown record tag {t}"),
            Self::BadLength(t) => write!(f, "job token record {t} has a bad length"),
            Self::BadString(what) => write!(f, "job {what} is not UTF-8 or contains NUL"),
            Self::UnknownFlags(bits) => write!(f, "job token has unknown flags {bits:#x}"),
            Self::EmptyArgv => write!(f, "job has no command"),
            Self::BadEnv(entry) => write!(f, "environment entry {entry:?} has no '='"),
            Self::BadNet(why) => write!(f, "job network: {why}"),
            Self::TooManyGroups(n) => {
                write!(
                    f,
                    "job user has {n} supplementary groups, at most {MAX_GROUPS}"
                )
            }
        }
    }
}

impl std::error::Error for JobError {}

fn check_string(value: &str, what: &'static str) -> Result<(), JobError> {
    if value.contains('\0') {
        Err(JobError::BadString(what))
    } else {
        Ok(())
    }
}

fn push_record(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

impl Job {
    /// A job that runs `argv` with default settings.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Checks what `execve` and init would reject later, so the host can report it.
    pub fn validate(&self) -> Result<(), JobError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(JobError::EmptyArgv);
        }
        for arg in &self.argv {
            check_string(arg, "argument")?;
        }
        for entry in &self.env {
            check_string(entry, "environment entry")?;
            if !entry.contains('=') {
                return Err(JobError::BadEnv(entry.clone()));
            }
        }
        check_string(&self.cwd, "working directory")?;
        if let Some(hostname) = &self.hostname {
            check_string(hostname, "hostname")?;
        }
        if let Some(net) = &self.net {
            net.validate()?;
        }
        if let Some(user) = &self.user {
            if user.groups.len() > MAX_GROUPS {
                return Err(JobError::TooManyGroups(user.groups.len()));
            }
        }
        Ok(())
    }

    /// Encodes the job as a token of `[A-Za-z0-9_-]` characters.
    pub fn encode(&self) -> Result<String, JobError> {
        self.validate()?;
        let mut out = vec![VERSION];
        for arg in &self.argv {
            push_record(&mut out, TAG_ARG, arg.as_bytes());
        }
        for entry in &self.env {
            push_record(&mut out, TAG_ENV, entry.as_bytes());
        }
        push_record(&mut out, TAG_CWD, self.cwd.as_bytes());
        match self.marker {
            MarkerChannel::None => {}
            MarkerChannel::Port(port) => {
                push_record(&mut out, TAG_MARKER_PORT, &port.to_le_bytes())
            }
            MarkerChannel::Fd(fd) => push_record(&mut out, TAG_MARKER_FD, &fd.to_le_bytes()),
        }
        let mut flags = 0;
        if self.overlay_root {
            flags |= FLAG_OVERLAY_ROOT;
        }
        if self.power_off {
            flags |= FLAG_POWER_OFF;
        }
        if self.tty {
            flags |= FLAG_TTY;
        }
        if self.verbose {
            flags |= FLAG_VERBOSE;
        }
        push_record(&mut out, TAG_FLAGS, &flags.to_le_bytes());
        if let Some(hostname) = &self.hostname {
            push_record(&mut out, TAG_HOSTNAME, hostname.as_bytes());
        }
        if let Some(net) = &self.net {
            push_record(&mut out, TAG_NET, &net.encode());
        }
        if let Some(user) = &self.user {
            push_record(&mut out, TAG_USER, &user.encode());
        }
        Ok(base64url::encode(&out))
    }

    /// Decodes a token produced by [`Job::encode`]. Every malformed input is an error.
    pub fn decode(token: &str) -> Result<Self, JobError> {
        let bytes = base64url::decode(token).ok_or(JobError::NotBase64)?;
        let (&version, mut rest) = bytes.split_first().ok_or(JobError::Truncated)?;
        if version != VERSION {
            return Err(JobError::Version(version));
        }
        let mut job = Self::default();
        while let Some((&tag, after_tag)) = rest.split_first() {
            let len_bytes: [u8; 4] = after_tag
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or(JobError::Truncated)?;
            let len = u32::from_le_bytes(len_bytes) as usize;
            let value = after_tag.get(4..4 + len).ok_or(JobError::Truncated)?;
            rest = &after_tag[4 + len..];
            let text =
                |what| String::from_utf8(value.to_vec()).map_err(|_| JobError::BadString(what));
            match tag {
                TAG_ARG => job.argv.push(text("argument")?),
                TAG_ENV => job.env.push(text("environment entry")?),
                TAG_CWD => job.cwd = text("working directory")?,
                TAG_HOSTNAME => job.hostname = Some(text("hostname")?),
                TAG_NET => job.net = Some(NetConfig::decode(value)?),
                TAG_USER => job.user = Some(JobUser::decode(value)?),
                TAG_MARKER_PORT => {
                    let raw = value.try_into().map_err(|_| JobError::BadLength(tag))?;
                    job.marker = MarkerChannel::Port(u16::from_le_bytes(raw));
                }
                TAG_MARKER_FD => {
                    let raw = value.try_into().map_err(|_| JobError::BadLength(tag))?;
                    job.marker = MarkerChannel::Fd(i32::from_le_bytes(raw));
                }
                TAG_FLAGS => {
                    let raw = value.try_into().map_err(|_| JobError::BadLength(tag))?;
                    let flags = u32::from_le_bytes(raw);
                    if flags & !KNOWN_FLAGS != 0 {
                        return Err(JobError::UnknownFlags(flags));
                    }
                    job.overlay_root = flags & FLAG_OVERLAY_ROOT != 0;
                    job.power_off = flags & FLAG_POWER_OFF != 0;
                    job.tty = flags & FLAG_TTY != 0;
                    job.verbose = flags & FLAG_VERBOSE != 0;
                }
                other => return Err(JobError::UnknownTag(other)),
            }
        }
        job.validate()?;
        Ok(job)
    }

    /// Finds the job token in a kernel command line (`/proc/cmdline`).
    pub fn token_from_cmdline(cmdline: &str) -> Option<&str> {
        cmdline
            .split_ascii_whitespace()
            .filter_map(|word| word.strip_prefix(JOB_CMDLINE_KEY)?.strip_prefix('='))
            .next_back()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tricky_job() -> Job {
        Job {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo \"hello  world\" 'single' $HOME; exit 7".into(),
                "with space".into(),
                "naïve — 日本語 🚀".into(),
                "line\nbreak\ttab".into(),
                String::new(),
                "twinbox.job=not-this-one".into(),
            ],
            env: vec![
                "PATH=/bin:/sbin".into(),
                "EMPTY=".into(),
                "Q=a \"b\" 'c'".into(),
            ],
            cwd: "/tmp/dir with space".into(),
            marker: MarkerChannel::Port(crate::MARKER_PORT),
            overlay_root: true,
            power_off: true,
            hostname: Some("box-ü".into()),
            net: Some(NetConfig {
                address: Ipv4Addr::new(10, 201, 0, 2),
                prefix_len: 30,
                gateway: Ipv4Addr::new(10, 201, 0, 1),
                resolver: Some(Ipv4Addr::new(127, 0, 0, 53)),
            }),
            tty: true,
            verbose: true,
            user: Some(JobUser {
                uid: 1000,
                gid: 1000,
                groups: vec![10, 4_000_000_000],
            }),
        }
    }

    #[test]
    fn the_user_round_trips_and_a_token_without_it_still_decodes() {
        let mut job = Job::new(["/bin/id"]);
        // A token as hosts wrote it before the user record: no user, run as root.
        let mut old = vec![VERSION];
        push_record(&mut old, TAG_ARG, b"/bin/id");
        push_record(&mut old, TAG_CWD, b"/");
        push_record(&mut old, TAG_FLAGS, &0u32.to_le_bytes());
        assert_eq!(Job::decode(&base64url::encode(&old)).unwrap(), job);
        for groups in [vec![], vec![0], vec![1, 2, 3]] {
            job.user = Some(JobUser {
                uid: 65534,
                gid: 0,
                groups,
            });
            assert_eq!(Job::decode(&job.encode().unwrap()).unwrap(), job);
        }
        // The record is uid, gid, groups as little-endian u32s.
        let user = JobUser {
            uid: 1,
            gid: 2,
            groups: vec![3],
        };
        assert_eq!(user.encode(), [1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
        // Short, ragged or oversized records are refused, not read past.
        for bad in [&[1u8, 0, 0, 0][..], &[0; 9], &[0; 10]] {
            let mut bytes = vec![VERSION];
            push_record(&mut bytes, TAG_ARG, b"/bin/id");
            push_record(&mut bytes, TAG_USER, bad);
            assert_eq!(
                Job::decode(&base64url::encode(&bytes)),
                Err(JobError::BadLength(TAG_USER))
            );
        }
        let mut bytes = vec![VERSION];
        push_record(&mut bytes, TAG_ARG, b"/bin/id");
        push_record(&mut bytes, TAG_USER, &vec![0; 8 + 4 * (MAX_GROUPS + 1)]);
        assert_eq!(
            Job::decode(&base64url::encode(&bytes)),
            Err(JobError::BadLength(TAG_USER))
        );
        job.user = Some(JobUser {
            uid: 0,
            gid: 0,
            groups: vec![0; MAX_GROUPS + 1],
        });
        assert_eq!(job.encode(), Err(JobError::TooManyGroups(MAX_GROUPS + 1)));
    }

    #[test]
    fn network_records_round_trip_and_bad_ones_are_refused() {
        let mut job = Job::new(["/bin/true"]);
        let link = NetConfig {
            address: Ipv4Addr::new(10, 201, 0, 6),
            prefix_len: 30,
            gateway: Ipv4Addr::new(10, 201, 0, 5),
            resolver: None,
        };
        job.net = Some(link);
        assert_eq!(Job::decode(&job.encode().unwrap()).unwrap().net, Some(link));
        job.net = Some(NetConfig {
            prefix_len: 31,
            ..link
        });
        assert!(matches!(job.encode(), Err(JobError::BadNet(_))));
        job.net = Some(NetConfig {
            gateway: link.address,
            ..link
        });
        assert!(matches!(job.encode(), Err(JobError::BadNet(_))));
        // A record of the wrong size is refused, not read past.
        let mut bytes = vec![VERSION];
        push_record(&mut bytes, TAG_ARG, b"/bin/true");
        push_record(&mut bytes, TAG_NET, &[10, 0, 0, 2, 30]);
        assert_eq!(
            Job::decode(&base64url::encode(&bytes)),
            Err(JobError::BadLength(TAG_NET))
        );
    }

    #[test]
    fn tricky_arguments_round_trip() {
        let job = tricky_job();
        let token = job.encode().unwrap();
        assert!(token
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(Job::decode(&token).unwrap(), job);
    }

    #[test]
    fn container_job_round_trips() {
        let job = Job {
            marker: MarkerChannel::Fd(3),
            ..Job::new(["true"])
        };
        assert_eq!(Job::decode(&job.encode().unwrap()).unwrap(), job);
    }

    #[test]
    fn token_survives_a_kernel_command_line() {
        let token = tricky_job().encode().unwrap();
        let cmdline = format!("console=ttyS0 quiet {JOB_CMDLINE_KEY}={token} reboot=k\n");
        let found = Job::token_from_cmdline(&cmdline).unwrap();
        assert_eq!(Job::decode(found).unwrap(), tricky_job());
        assert_eq!(
            Job::token_from_cmdline("console=ttyS0 twinbox.jobs=x"),
            None
        );
    }

    #[test]
    fn invalid_jobs_are_refused_at_encode() {
        assert_eq!(Job::default().encode(), Err(JobError::EmptyArgv));
        assert_eq!(
            Job::new(["a\0b"]).encode(),
            Err(JobError::BadString("argument"))
        );
        let bad_env = Job {
            env: vec!["NOEQUALS".into()],
            ..Job::new(["true"])
        };
        assert_eq!(bad_env.encode(), Err(JobError::BadEnv("NOEQUALS".into())));
    }

    #[test]
    fn malformed_tokens_are_errors_not_panics() {
        let good = base64url::decode(&Job::new(["true"]).encode().unwrap()).unwrap();
        assert_eq!(Job::decode("!!"), Err(JobError::NotBase64));
        assert_eq!(Job::decode(""), Err(JobError::Truncated));
        assert_eq!(
            Job::decode(&base64url::encode(&[9])),
            Err(JobError::Version(9))
        );
        assert_eq!(
            Job::decode(&base64url::encode(&[1])),
            Err(JobError::EmptyArgv)
        );
        // Every prefix of a valid job is either valid or a clean error.
        for len in 0..good.len() {
            let _ = Job::decode(&base64url::encode(&good[..len]));
        }
        let huge_len = [1, TAG_ARG, 0xff, 0xff, 0xff, 0xff, b'x'];
        assert_eq!(
            Job::decode(&base64url::encode(&huge_len)),
            Err(JobError::Truncated)
        );
        let bad_port = [1, TAG_MARKER_PORT, 1, 0, 0, 0, 7];
        assert_eq!(
            Job::decode(&base64url::encode(&bad_port)),
            Err(JobError::BadLength(4))
        );
        let unknown = [1, 99, 0, 0, 0, 0];
        assert_eq!(
            Job::decode(&base64url::encode(&unknown)),
            Err(JobError::UnknownTag(99))
        );
        let bad_utf8 = [1, TAG_ARG, 1, 0, 0, 0, 0xff];
        assert_eq!(
            Job::decode(&base64url::encode(&bad_utf8)),
            Err(JobError::BadString("argument"))
        );
    }
}
