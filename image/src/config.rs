//! The image config as `docker run` honours it: Entrypoint + Cmd, Env, WorkingDir, User.

use crate::error::{ImageError, Result};
use crate::{fsat, merged};
use rustix::fs::FileType;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::PathBuf;

/// `PATH` when the image sets none, as Docker sets it.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The settings of an image config that shape a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// `Entrypoint`: always run, the command's arguments follow it.
    pub entrypoint: Vec<String>,
    /// `Cmd`: the default arguments, replaced by a command given after `--`.
    pub cmd: Vec<String>,
    /// `Env`: `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// `WorkingDir`, empty when unset.
    pub working_dir: String,
    /// `User`: `uid`, `uid:gid`, `name`, `name:group`, empty for root.
    pub user: String,
}

impl RunConfig {
    pub(crate) fn from_oci(config: Option<&oci_spec::image::Config>) -> Self {
        let Some(c) = config else {
            return Self::default();
        };
        Self {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().unwrap_or_default(),
            user: c.user().clone().unwrap_or_default(),
        }
    }

    /// The argv to run: Entrypoint, then `user_args` if any (they replace Cmd, as
    /// `docker run IMAGE ARGS...` does), else Cmd. Empty when the image names no command
    /// and the user gave none: the caller reports it.
    pub fn command(&self, user_args: &[String]) -> Vec<String> {
        self.command_with(None, user_args)
    }

    /// [`RunConfig::command`] with `docker run --entrypoint` applied: `Some(program)`
    /// replaces the image's Entrypoint with that one word and drops its Cmd, so only
    /// `user_args` follow it (Docker does not keep a Cmd written for another entrypoint);
    /// `Some("")` clears the Entrypoint, so `user_args` are the whole command.
    pub fn command_with(&self, entrypoint: Option<&str>, user_args: &[String]) -> Vec<String> {
        match entrypoint {
            None => {
                let args = if user_args.is_empty() {
                    &self.cmd
                } else {
                    user_args
                };
                self.entrypoint.iter().chain(args).cloned().collect()
            }
            Some("") => user_args.to_vec(),
            Some(program) => std::iter::once(program.to_owned())
                .chain(user_args.iter().cloned())
                .collect(),
        }
    }

    /// The environment: the image's `Env` with `user_env` (`KEY=VALUE`, as `-e` gives them)
    /// on top, a user's key replacing the image's; Docker's default `PATH` when neither sets
    /// one. Order: the image's keys first, in its order, then new user keys.
    pub fn env(&self, user_env: &[String]) -> Vec<String> {
        fn key(kv: &str) -> &str {
            kv.split_once('=').map_or(kv, |(k, _)| k)
        }
        let mut out: Vec<String> = Vec::new();
        for kv in self.env.iter().chain(user_env) {
            match out.iter_mut().find(|e| key(e) == key(kv)) {
                Some(slot) => *slot = kv.clone(),
                None => out.push(kv.clone()),
            }
        }
        if !out.iter().any(|e| key(e) == "PATH") {
            out.insert(0, DEFAULT_PATH.to_owned());
        }
        out
    }

    /// [`RunConfig::env`] plus `HOME` from the resolved user's passwd entry when neither
    /// the image nor the user sets it, as Docker does.
    pub fn env_for(&self, user_env: &[String], user: &ResolvedUser) -> Vec<String> {
        let mut env = self.env(user_env);
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push(format!("HOME={}", user.home));
        }
        env
    }

    /// The working directory: `WorkingDir`, `/` when unset (as Docker).
    pub fn working_dir(&self) -> &str {
        if self.working_dir.is_empty() {
            "/"
        } else {
            &self.working_dir
        }
    }

    /// Resolves `User` against the image's `/etc/passwd` and `/etc/group` as the merged
    /// layers show them (`layers` lowest first, as [`crate::Layers::dirs`]).
    pub fn resolve_user(&self, layers: &[PathBuf]) -> Result<ResolvedUser> {
        let passwd = read_merged(layers, "etc/passwd")?;
        let group = read_merged(layers, "etc/group")?;
        resolve_user(&self.user, passwd.as_deref(), group.as_deref())
    }
}

/// The workload's identity, as the box sets it before exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedUser {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary groups: every `/etc/group` entry listing the user by name.
    pub additional_gids: Vec<u32>,
    /// The home directory from `/etc/passwd` (`HOME` when the image's Env sets none), `/`
    /// when the user is not there.
    pub home: String,
}

/// Resolves a Docker `User` string against passwd and group contents (`None`: the image
/// has no such file). The rules are Docker's: a numeric uid needs no passwd entry (gid
/// then comes from the entry if there is one, else 0); a name must be in passwd; a group
/// given by name must be in group.
pub fn resolve_user(user: &str, passwd: Option<&str>, group: Option<&str>) -> Result<ResolvedUser> {
    let fail = |what: String| ImageError::User {
        user: user.to_owned(),
        what,
    };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    // passwd: name:x:uid:gid:gecos:home:shell
    let users: Vec<Vec<&str>> = passwd
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let entry = match u.parse::<u32>() {
        Ok(uid) => users.iter().find(|f| f[2].parse::<u32>().ok() == Some(uid)),
        Err(_) => Some(
            users
                .iter()
                .find(|f| f[0] == u)
                .ok_or_else(|| fail(format!("no user {u:?} in the image's /etc/passwd")))?,
        ),
    };
    let uid = match u.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => entry
            .and_then(|f| f[2].parse().ok())
            .ok_or_else(|| fail(format!("bad uid for {u:?} in /etc/passwd")))?,
    };
    let name = entry.map(|f| f[0]);
    let home = entry
        .and_then(|f| f.get(5))
        .filter(|h| !h.is_empty())
        .unwrap_or(&"/")
        .to_string();
    // group: name:x:gid:member,member
    let groups: Vec<Vec<&str>> = group
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .collect();
    let gid = match g {
        Some(g) if !g.is_empty() => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| fail(format!("no group {g:?} in the image's /etc/group")))?,
        },
        _ => entry.and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    let mut additional_gids = Vec::new();
    if let Some(name) = name {
        for f in &groups {
            let members = f.get(3).copied().unwrap_or_default();
            if members.split(',').any(|m| m == name) {
                if let Ok(id) = f[2].parse::<u32>() {
                    if id != gid && !additional_gids.contains(&id) {
                        additional_gids.push(id);
                    }
                }
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

/// Reads a small file as the overlay of `layers` shows it: from the topmost layer that has
/// it, stopping at a whiteout or an opaque directory above it. `None` when absent. A
/// symlink there is not followed (the image's files are not resolved against the host):
/// it counts as absent.
pub fn read_merged(layers: &[PathBuf], path: &str) -> Result<Option<String>> {
    let comps = fsat::components(path.as_bytes()).unwrap_or_default();
    let Some((&name, parents)) = comps.split_last() else {
        return Ok(None);
    };
    let Some(found) = merged::entry(layers, parents, name)? else {
        return Ok(None);
    };
    if found.kind != FileType::RegularFile {
        return Ok(None);
    }
    let io = |e: std::io::Error| ImageError::Io {
        path: PathBuf::from(path),
        what: "cannot read the image's file",
        source: e,
    };
    let fd = rustix::fs::openat(
        &found.dir,
        name,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io(e.into()))?;
    let mut text = Vec::new();
    std::fs::File::from(fd)
        .take(crate::source::JSON_LIMIT)
        .read_to_end(&mut text)
        .map_err(io)?;
    Ok(Some(String::from_utf8_lossy(&text).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RunConfig {
        RunConfig {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            env: vec!["A=1".into(), "PATH=/bin".into()],
            working_dir: "/srv".into(),
            user: "app".into(),
        }
    }

    #[test]
    fn command_is_entrypoint_then_user_args_or_cmd() {
        let c = cfg();
        assert_eq!(c.command(&[]), vec!["/bin/sh", "-c", "echo hi"]);
        assert_eq!(
            c.command(&["exit 3".into()]),
            vec!["/bin/sh", "-c", "exit 3"]
        );
        let no_ep = RunConfig {
            entrypoint: vec![],
            ..cfg()
        };
        assert_eq!(no_ep.command(&["/bin/true".into()]), vec!["/bin/true"]);
        assert!(RunConfig::default().command(&[]).is_empty());
    }

    #[test]
    fn an_entrypoint_given_replaces_the_image_s_and_drops_its_cmd() {
        let c = cfg();
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Replaced: the image's Cmd ("echo hi") was written for /bin/sh -c, not for env.
        assert_eq!(c.command_with(Some("/bin/env"), &[]), vec!["/bin/env"]);
        assert_eq!(
            c.command_with(Some("/bin/echo"), &args(&["a", "b"])),
            vec!["/bin/echo", "a", "b"]
        );
        // One word, never split: a program name may hold a space.
        assert_eq!(
            c.command_with(Some("/opt/my app"), &[]),
            vec!["/opt/my app"]
        );
        // Cleared: the arguments are the command; none at all is an empty argv.
        assert_eq!(
            c.command_with(Some(""), &args(&["/bin/true", "x"])),
            vec!["/bin/true", "x"]
        );
        assert!(c.command_with(Some(""), &[]).is_empty());
        // Not given: as without the option.
        assert_eq!(c.command_with(None, &[]), c.command(&[]));
    }

    #[test]
    fn user_env_overrides_and_path_defaults() {
        let c = cfg();
        assert_eq!(
            c.env(&["A=2".into(), "B=3".into()]),
            vec!["A=2", "PATH=/bin", "B=3"]
        );
        assert_eq!(RunConfig::default().env(&[]), vec![DEFAULT_PATH]);
        assert_eq!(c.working_dir(), "/srv");
        let user = resolve_user("app", Some(PASSWD), Some(GROUP)).unwrap();
        assert!(c.env_for(&[], &user).contains(&"HOME=/home/app".to_owned()));
        assert!(c
            .env_for(&["HOME=/x".into()], &user)
            .contains(&"HOME=/x".to_owned()));
        assert_eq!(RunConfig::default().working_dir(), "/");
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napps:x:1001:\nwheel:x:10:app,other\nstaff:x:50:\n";

    #[test]
    fn users_resolve_as_docker_does() {
        let r = resolve_user("app", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!(
            (r.uid, r.gid, r.additional_gids.clone(), r.home.as_str()),
            (1000, 1001, vec![10], "/home/app")
        );
        let r = resolve_user("app:staff", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((r.uid, r.gid), (1000, 50));
        let r = resolve_user("1000:7", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((r.uid, r.gid), (1000, 7));
        // A numeric uid needs no entry; its gid is then 0.
        let r = resolve_user("4242", None, None).unwrap();
        assert_eq!((r.uid, r.gid, r.home.as_str()), (4242, 0, "/"));
        let r = resolve_user("", Some(PASSWD), None).unwrap();
        assert_eq!((r.uid, r.gid, r.home.as_str()), (0, 0, "/root"));
        let e = resolve_user("nobody", Some(PASSWD), Some(GROUP))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no user \"nobody\""), "{e}");
        let e = resolve_user("app:nogroup", Some(PASSWD), Some(GROUP))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no group \"nogroup\""), "{e}");
    }
}
