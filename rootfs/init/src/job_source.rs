//! Where init finds its job: the `TWINBOX_JOB` environment variable (container) or
//! `twinbox.job=` on the kernel command line (VM).

use std::fmt;
use twinbox_proto::job::{JOB_CMDLINE_KEY, JOB_ENV_VAR};
use twinbox_proto::{Job, JobError};

/// Which kind of box init is running in, as told by where the job came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The job came from the environment: a container runtime started us.
    Container,
    /// The job came from `/proc/cmdline`: a kernel booted us.
    Vm,
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
                "no job: set {JOB_ENV_VAR} or boot with {JOB_CMDLINE_KEY}=TOKEN on the kernel command line"
            ),
            Self::Cmdline(err) => write!(f, "cannot read /proc/cmdline: {err}"),
            Self::Garbled(Origin::Container, err) => write!(f, "bad {JOB_ENV_VAR}: {err}"),
            Self::Garbled(Origin::Vm, err) => write!(f, "bad {JOB_CMDLINE_KEY}=: {err}"),
        }
    }
}

/// Decodes the job from an environment value or, failing that, a kernel command line.
/// Pure, so it is unit-tested; [`find`] feeds it the real sources.
pub fn from_sources(
    env_token: Option<&str>,
    cmdline: impl FnOnce() -> Result<String, String>,
) -> Result<(Job, Origin), JobSourceError> {
    let (token, origin) = match env_token {
        Some(token) => (token.to_owned(), Origin::Container),
        None => {
            let cmdline = cmdline().map_err(JobSourceError::Cmdline)?;
            let token = Job::token_from_cmdline(&cmdline).ok_or(JobSourceError::Missing)?;
            (token.to_owned(), Origin::Vm)
        }
    };
    Job::decode(&token)
        .map(|job| (job, origin))
        .map_err(|err| JobSourceError::Garbled(origin, err))
}

/// Finds the job of this boot. `/proc` must be mounted for the VM case.
pub fn find() -> Result<(Job, Origin), JobSourceError> {
    let env = std::env::var(JOB_ENV_VAR).ok();
    from_sources(env.as_deref(), || {
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

    #[test]
    fn env_wins_over_cmdline() {
        let token = Job::new(["true"]).encode().unwrap();
        let (job, origin) = from_sources(Some(&token), || panic!("cmdline read")).unwrap();
        assert_eq!(
            (job.argv, origin),
            (vec!["true".to_owned()], Origin::Container)
        );
    }

    #[test]
    fn cmdline_is_used_without_env() {
        let token = Job::new(["sh", "-c", "echo 'a b'"]).encode().unwrap();
        let line = format!("console=ttyS0 reboot=k twinbox.job={token} quiet\n");
        let (job, origin) = from_sources(None, || Ok(line)).unwrap();
        assert_eq!(origin, Origin::Vm);
        assert_eq!(job.argv[2], "echo 'a b'");
    }

    #[test]
    fn missing_and_garbled_are_distinct_errors() {
        let missing = from_sources(None, || Ok("console=ttyS0".into())).unwrap_err();
        assert_eq!(missing, JobSourceError::Missing);
        assert_eq!(missing.errno(), libc::ENOENT);
        let garbled = from_sources(Some("!!"), || Ok(String::new())).unwrap_err();
        assert!(matches!(
            garbled,
            JobSourceError::Garbled(Origin::Container, _)
        ));
        assert_eq!(garbled.errno(), libc::EINVAL);
        assert!(garbled.to_string().starts_with("bad TWINBOX_JOB: "));
        let unreadable = from_sources(None, || Err("No such file".into())).unwrap_err();
        assert_eq!(
            unreadable.to_string(),
            "cannot read /proc/cmdline: No such file"
        );
    }
}
