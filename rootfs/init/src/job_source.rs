//! Where init finds its job: the `TWINBOX_JOB` environment variable (container),
//! `twinbox.job=` on the kernel command line (a VM booted by a peer VMM), or, when the
//! command line says `twinbox.ports=1`, a frame on the VM's control port ([`crate::ports`]).

use std::fmt;
use twinbox_proto::job::{JOB_CMDLINE_KEY, JOB_ENV_VAR};
use twinbox_proto::stdio::PORTS_CMDLINE_FLAG;
use twinbox_proto::{Job, JobError};

/// Which kind of box init is running in, as told by where the job came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The job came from the environment: a container runtime started us.
    Container,
    /// The job came from `/proc/cmdline`: a kernel booted us.
    Vm,
}

/// Where the job is, before it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A token, from the environment (container) or the kernel command line (VM).
    Token(String, Origin),
    /// The VM's control port: the command line has [`PORTS_CMDLINE_FLAG`] and no token.
    Ports,
}

/// Why no job could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSourceError {
    /// Neither the environment nor the command line carries a token.
    Missing,
    /// `/proc/cmdline` could not be read.
    Cmdline(String),
    /// The token is there but does not decode.
    Garbled(Origin, JobError),
}

impl JobSourceError {
    /// The errno reported in the `InitFailed` marker.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Missing => libc::ENOENT,
            Self::Cmdline(_) => libc::EIO,
            Self::Garbled(..) => libc::EINVAL,
        }
    }
}

impl fmt::Display for JobSourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => write!(
                f,
                "no job: set {JOB_ENV_VAR}, or boot with {JOB_CMDLINE_KEY}=TOKEN or \
                 {PORTS_CMDLINE_FLAG} on the kernel command line"
            ),
            Self::Cmdline(err) => write!(f, "cannot read /proc/cmdline: {err}"),
            Self::Garbled(Origin::Container, err) => write!(f, "bad {JOB_ENV_VAR}: {err}"),
            Self::Garbled(Origin::Vm, err) => write!(f, "bad {JOB_CMDLINE_KEY}=: {err}"),
        }
    }
}

/// Where the job is: an environment value wins, then a command-line token, then the
/// ports flag (a token wins over the flag, so a peer VMM's command line never waits for
/// ports it does not have). Pure, so it is unit-tested; [`find`] feeds it the real sources.
pub fn locate(
    env_token: Option<&str>,
    cmdline: impl FnOnce() -> Result<String, String>,
) -> Result<Source, JobSourceError> {
    if let Some(token) = env_token {
        return Ok(Source::Token(token.to_owned(), Origin::Container));
    }
    let cmdline = cmdline().map_err(JobSourceError::Cmdline)?;
    if let Some(token) = Job::token_from_cmdline(&cmdline) {
        return Ok(Source::Token(token.to_owned(), Origin::Vm));
    }
    if cmdline
        .split_ascii_whitespace()
        .any(|word| word == PORTS_CMDLINE_FLAG)
    {
        return Ok(Source::Ports);
    }
    Err(JobSourceError::Missing)
}

/// Decodes a token found by [`locate`].
pub fn decode(token: &str, origin: Origin) -> Result<Job, JobSourceError> {
    Job::decode(token).map_err(|err| JobSourceError::Garbled(origin, err))
}

/// Finds where the job of this boot is. `/proc` must be mounted for the VM case.
pub fn find() -> Result<Source, JobSourceError> {
    let env = std::env::var(JOB_ENV_VAR).ok();
    locate(env.as_deref(), || {
        std::fs::read_to_string("/proc/cmdline").map_err(|e| e.to_string())
    })
}

/// Where the job would have come from if it had been valid: decides how to fail.
pub fn likely_origin() -> Origin {
    if std::env::var_os(JOB_ENV_VAR).is_some() {
        Origin::Container
    } else {
        Origin::Vm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_job(source: Source) -> (Job, Origin) {
        match source {
            Source::Token(token, origin) => (decode(&token, origin).unwrap(), origin),
            Source::Ports => panic!("ports instead of a token"),
        }
    }

    #[test]
    fn env_wins_over_cmdline() {
        let token = Job::new(["true"]).encode().unwrap();
        let (job, origin) = token_job(locate(Some(&token), || panic!("cmdline read")).unwrap());
        assert_eq!(
            (job.argv, origin),
            (vec!["true".to_owned()], Origin::Container)
        );
    }

    #[test]
    fn cmdline_is_used_without_env() {
        let token = Job::new(["sh", "-c", "echo 'a b'"]).encode().unwrap();
        let line = format!("console=ttyS0 reboot=k twinbox.job={token} quiet\n");
        let (job, origin) = token_job(locate(None, || Ok(line)).unwrap());
        assert_eq!(origin, Origin::Vm);
        assert_eq!(job.argv[2], "echo 'a b'");
    }

    #[test]
    fn the_ports_flag_is_used_only_without_a_token() {
        let line = "console=ttyS0 twinbox.ports=1 quiet\n".to_owned();
        assert_eq!(locate(None, || Ok(line)), Ok(Source::Ports));
        // A peer VMM's command line (token) never waits for ports, flag or not.
        let token = Job::new(["true"]).encode().unwrap();
        let both = format!("twinbox.ports=1 twinbox.job={token}");
        assert!(matches!(
            locate(None, || Ok(both)),
            Ok(Source::Token(_, Origin::Vm))
        ));
        for near_miss in ["twinbox.ports=0", "twinbox.ports=1x", "xtwinbox.ports=1"] {
            assert_eq!(
                locate(None, || Ok(near_miss.into())),
                Err(JobSourceError::Missing),
                "{near_miss}"
            );
        }
    }

    #[test]
    fn missing_and_garbled_are_distinct_errors() {
        let missing = locate(None, || Ok("console=ttyS0".into())).unwrap_err();
        assert_eq!(missing, JobSourceError::Missing);
        assert_eq!(missing.errno(), libc::ENOENT);
        assert!(missing.to_string().contains("twinbox.ports=1"), "{missing}");
        let garbled = decode("!!", Origin::Container).unwrap_err();
        assert!(matches!(
            garbled,
            JobSourceError::Garbled(Origin::Container, _)
        ));
        assert_eq!(garbled.errno(), libc::EINVAL);
        assert!(garbled.to_string().starts_with("bad TWINBOX_JOB: "));
        let unreadable = locate(None, || Err("No such file".into())).unwrap_err();
        assert_eq!(
            unreadable.to_string(),
            "cannot read /proc/cmdline: No such file"
        );
    }
}
