//! Arguments and output shared by `vm run` and `ctr run`, so the two print comparable
//! lines.

use anyhow::Context;
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;
use twinbox_image::{Ext4Disk, Image, ImageSpec, Layers, Store};
use twinbox_spec::{RunReport, RunSpec, StdinMode, WorkloadUser};

/// `--memory` when the user gives none (MiB).
const DEFAULT_MEMORY_MIB: u32 = 128;

/// Which form of an `--image` a box mounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageForm {
    /// The unpacked layers, as overlayfs lower directories (the container).
    Layers,
    /// One ext4 built from the layers, as the root disk (the VM).
    Ext4,
}

/// An `--image`'s files in the cache, kept for the whole run: they hold the cache's
/// shared lock, so `twinbox image rm`/`prune` cannot take them away meanwhile.
#[allow(dead_code)] // held, never read
pub enum ImageHold {
    /// The layers the container stacks.
    Layers(Layers),
    /// The VM's root disk (and its layers).
    Disk(Ext4Disk),
}

/// Where the workload's stdin comes from: twinbox's own, unless it is a terminal nobody
/// asked to attach (`-i`/`-t`).
fn stdin_mode(attach_terminal: bool, stdin_is_terminal: bool) -> StdinMode {
    if stdin_is_terminal && !attach_terminal {
        StdinMode::Null
    } else {
        StdinMode::Inherit
    }
}

/// Options every `run` subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Root filesystem image (ext4). Default: the one built by scripts/build-artifacts.
    #[arg(long, value_name = "IMG")]
    pub rootfs: Option<PathBuf>,
    /// Run an OCI/Docker image: a docker-archive (`docker save`), an oci-archive or an
    /// OCI layout directory, with `@TAG` or `@DIGEST` when it holds several.
    ///
    /// Its layers are verified and unpacked once into the cache (`twinbox image ls`); the
    /// container stacks them as overlayfs lower directories under a fresh upper layer,
    /// the VM boots one ext4 built from them. The image's config is honoured as `docker
    /// run` does: Entrypoint + Cmd (a command after `--` replaces Cmd, and may be left
    /// out), Env (`-e` on top), WorkingDir (unless `--workdir`), User. Not with
    /// `--rootfs`.
    #[arg(long, value_name = "PATH[@REF]")]
    pub image: Option<String>,
    /// With `--image`: run PROGRAM instead of the image's Entrypoint, as `docker run
    /// --entrypoint` does. The image's Cmd is dropped too: only the arguments after `--`
    /// follow PROGRAM. `--entrypoint ''` clears the Entrypoint, so the command after `--`
    /// is the whole command.
    #[arg(long, value_name = "PROGRAM")]
    pub entrypoint: Option<String>,
    /// Memory in MiB (VM: guest RAM; container: memory limit) [default: 128; a VM
    /// restored with --snapshot: the snapshot's].
    #[arg(long, value_name = "MiB")]
    pub memory: Option<u32>,
    /// Hostname inside the box.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Environment variable for the workload (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory of the workload inside the box. Default: `/`, or the image's
    /// WorkingDir with `--image`.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Kill the box after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Print the host-stamped phases with deltas on stderr when done.
    #[arg(long)]
    pub timings: bool,
    /// Print the RunReport as JSON on stdout when done.
    #[arg(long)]
    pub json: bool,
    /// Network: `--net` links the box with the host, `--net nat` also NATs it out.
    ///
    /// `--net` (or `--net link`) gives the box `eth0` on a point-to-point link with the host
    /// (the container: one end of a veth pair, the host's end `tb<N>`; the VM: a virtio-net
    /// card on a tap `tbt<N>` owned by the VMM): a /30 from 10.201.0.0/16 (or
    /// TWINBOX_NET_POOL), a default route via the host's end, and the host's name server in
    /// /etc/resolv.conf. `--timings` and `--json` print the link, so the host can reach the
    /// box. `--net nat` also masquerades the box's traffic out of the host's default route
    /// (the nftables table `ip twinbox`, and ip_forward on; a host that did not forward
    /// before still forwards nothing between its other interfaces). The cost: routing that
    /// starts later in this boot (Docker or libvirt started after the first `--net nat`
    /// run, an admin's sysctl) is dropped too; to give it back run `nft delete table ip
    /// twinbox` and `rm /run/twinbox/ip_forward-turned-on-by-twinbox`. On a host that
    /// forwards on some interfaces only, ip_forward on makes all of them forward. Without
    /// `--net` the box has only `lo`. Needs CAP_NET_ADMIN (and /dev/net/tun for the VM).
    /// Put the command after `--`.
    #[arg(
        long,
        value_name = "link|nat",
        num_args = 0..=1,
        default_missing_value = "link"
    )]
    pub net: Option<String>,
    /// Keep stdin attached even when it is a terminal.
    ///
    /// The workload reads twinbox's stdin in both boxes (`... | twinbox vm run -- wc -l`);
    /// its end is the workload's end of input. When stdin is a terminal and neither `-i`
    /// nor `-t` is given, the workload gets end of input at once instead, so a command that
    /// reads stdin does not silently take over the terminal.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Run the workload on a pseudo-terminal inside the box (`-it -- /bin/sh`: a shell).
    ///
    /// The box gets a pty of its own (the container: a pty of its devpts as the workload's
    /// controlling terminal; the VM: init allocates it in the guest), relayed to this
    /// terminal in raw mode: window size passed in and resizes forwarded, Ctrl-C goes to the
    /// workload, not to twinbox. stdout and stderr arrive merged on stdout, as on any
    /// terminal. The terminal is restored when the run ends. A stdin that is not a
    /// terminal is relayed too; its end is typed as the terminal's end of file (Ctrl-D).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Print twinbox-init's own lines on stderr (and, for the VM, the serial console with
    /// the kernel log); without it stdout and stderr carry the workload's output alone.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// The command to run and its arguments, after `--` (with `--image`: optional, it
    /// replaces the image's Cmd).
    #[arg(last = true, required_unless_present = "image", value_name = "CMD")]
    pub command: Vec<String>,
}

impl RunArgs {
    /// A RunSpec from these options; box-specific fields are filled in by the caller.
    /// With `--image`, its root in `form` and what holds it in the cache for the run.
    pub fn to_spec(
        &self,
        spawn_ns: u64,
        form: ImageForm,
    ) -> anyhow::Result<(RunSpec, Option<ImageHold>)> {
        if let Some(image) = &self.image {
            anyhow::ensure!(
                self.rootfs.is_none(),
                "--image and --rootfs both name the root: give one of them"
            );
            let (mut spec, hold) = self.image_spec(image, form)?;
            self.fill(&mut spec, spawn_ns)?;
            return Ok((spec, Some(hold)));
        }
        // Checked here, not by clap, so it is one line and exit 125 like other bad input.
        anyhow::ensure!(
            self.entrypoint.is_none(),
            "--entrypoint replaces an image's Entrypoint, so it needs --image (without one, the command after `--` is the whole command)"
        );
        let rootfs = match &self.rootfs {
            Some(path) => path.clone(),
            None => twinbox_spec::artifacts::require(
                &twinbox_spec::artifacts::rootfs_image(),
                "root filesystem image",
            )
            .map_err(anyhow::Error::msg)?,
        };
        let mut spec = RunSpec::new(rootfs, self.command.clone());
        spec.env = self.env.clone();
        spec.cwd = self.workdir.clone().unwrap_or_else(|| "/".into());
        self.fill(&mut spec, spawn_ns)?;
        Ok((spec, None))
    }

    /// The root, workload and user of `--image`, as `docker run` makes them from the
    /// image's config.
    fn image_spec(&self, text: &str, form: ImageForm) -> anyhow::Result<(RunSpec, ImageHold)> {
        let context = || format!("--image {text}");
        let image = Image::open(&ImageSpec::parse(text)).with_context(context)?;
        let store = Store::default_location();
        let (hold, dirs) = match form {
            ImageForm::Layers => {
                let layers = store.layers(&image).with_context(context)?;
                let dirs = layers.dirs.clone();
                (ImageHold::Layers(layers), dirs)
            }
            ImageForm::Ext4 => {
                let disk = store.ext4(&image).with_context(context)?;
                let dirs = disk.layers.dirs.clone();
                (ImageHold::Disk(disk), dirs)
            }
        };
        let config = &image.config;
        let argv = config.command_with(self.entrypoint.as_deref(), &self.command);
        if argv.is_empty() {
            match self.entrypoint.as_deref() {
                Some(_) => anyhow::bail!(
                    "--entrypoint '' clears the image's Entrypoint and Cmd: put the command after `--`"
                ),
                None => anyhow::bail!(
                    "--image {text}: the image names no command (no Entrypoint or Cmd): put one after `--`"
                ),
            }
        }
        let user = config.resolve_user(&dirs).with_context(context)?;
        let rootfs = match &hold {
            ImageHold::Disk(disk) => disk.path.clone(),
            // The container reads the layers; the path names the image in messages.
            ImageHold::Layers(_) => image.source_path().to_owned(),
        };
        let mut spec = RunSpec::new(rootfs, argv);
        if form == ImageForm::Layers {
            spec.rootfs_layers = Some(dirs);
        }
        spec.env = config.env_for(&self.env, &user);
        spec.cwd = self
            .workdir
            .clone()
            .unwrap_or_else(|| config.working_dir().to_owned());
        spec.user = Some(WorkloadUser {
            uid: user.uid,
            gid: user.gid,
            groups: user.additional_gids,
        });
        Ok((spec, hold))
    }

    /// The options that do not depend on where the root comes from.
    fn fill(&self, spec: &mut RunSpec, spawn_ns: u64) -> anyhow::Result<()> {
        spec.spawn_ns = spawn_ns;
        spec.memory_mib = self.memory.unwrap_or(DEFAULT_MEMORY_MIB);
        spec.hostname = self.hostname.clone();
        spec.tty = self.tty;
        spec.verbose = self.verbose;
        spec.stdin = stdin_mode(self.interactive || self.tty, std::io::stdin().is_terminal());
        // Parsed here, not by clap: the line says NetMode's own why, without clap's
        // "invalid value ... for '--net <MODE>'" in front of it.
        spec.net = self
            .net
            .as_deref()
            .map(str::parse::<twinbox_spec::NetMode>)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        if let Some(seconds) = self.timeout {
            anyhow::ensure!(
                seconds.is_finite() && seconds > 0.0,
                "--timeout {seconds}: must be a positive number of seconds"
            );
            spec.time_limit = Some(std::time::Duration::from_secs_f64(seconds));
        }
        Ok(())
    }

    /// Prints what `--timings`/`--json` asked for and returns the workload's status.
    pub fn finish(&self, report: &RunReport) -> i32 {
        for note in &report.notes {
            super::complain(format_args!("twinbox: note: {note}\n"));
        }
        if let twinbox_spec::Outcome::Failed(reason) = &report.outcome {
            super::complain(format_args!(
                "twinbox: {} failed: {reason}\n",
                report.box_kind
            ));
        }
        if self.timings {
            super::complain(format_args!("{}", report.timeline.render()));
            if let Some(link) = &report.network {
                super::complain(format_args!("network: {link}\n"));
            }
        }
        if self.json {
            super::say(format_args!("{}", report.to_json()));
        }
        report.outcome.exit_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_is_attached_only_when_asked_and_anything_else_always() {
        assert_eq!(stdin_mode(false, true), StdinMode::Null);
        assert_eq!(stdin_mode(true, true), StdinMode::Inherit);
        assert_eq!(stdin_mode(false, false), StdinMode::Inherit);
        assert_eq!(stdin_mode(true, false), StdinMode::Inherit);
    }
}
