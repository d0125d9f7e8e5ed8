//! `twinbox`: boot one rootfs image as a KVM microVM and as a container, and measure both.
//!
//! This binary only parses, calls a library, and prints. Every user-facing failure is one
//! line on stderr and a non-zero exit status; the error chain goes to the log
//! (`RUST_LOG=debug`).

mod cli;

use clap::{CommandFactory, Parser, Subcommand};
use cli::lazy::Lazy;
use std::process::ExitCode;

/// Boot one root filesystem image as a KVM microVM and run the very same image as a
/// Linux container, then measure both side by side.
#[derive(Parser)]
// `arg_required_else_help = false` here and on the subcommand groups: `twinbox` or
// `twinbox vm` alone is a usage error told in one line ("requires a subcommand", with the
// list), not the whole help on stderr.
#[command(name = "twinbox", version, about, long_about = None, arg_required_else_help = false)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size difference between variants costs nothing. Each
// subcommand's arguments are built only when it is the one run (`Lazy`).
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a workload in a KVM microVM (twinbox's own VMM, real Linux kernel).
    #[command(subcommand, arg_required_else_help = false)]
    Vm(Lazy<cli::vm::VmCommand>),
    /// Run a workload in a container (namespaces, cgroups, overlayfs) from the same image.
    #[command(subcommand, arg_required_else_help = false)]
    Ctr(Lazy<cli::ctr::CtrCommand>),
    /// Measure native, container and microVM side by side and write a report.
    Bench(Lazy<cli::bench::BenchArgs>),
    /// Check this host: KVM flavour, root, cgroups, overlayfs, loop, tun, artifacts.
    Doctor(Lazy<cli::doctor::DoctorArgs>),
    /// The cache of OCI/Docker images: load, ls, rm, prune.
    #[command(subcommand, arg_required_else_help = false)]
    Image(Lazy<cli::image::ImageCommand>),
}

fn main() -> ExitCode {
    // `spawn` is stamped first thing, before argument parsing, so startup numbers include
    // everything twinbox itself does.
    let spawn_ns = twinbox_spec::clock::monotonic_ns();
    cli::logging::init();
    // Not `Cli::parse()`: its usage errors exit 2 with several lines.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let args: Vec<_> = std::env::args_os().collect();
            return cli::usage::refused(&error, Cli::command, &args);
        }
    };
    let result = match cli.command {
        Command::Vm(Lazy(command)) => cli::vm::main(command, spawn_ns),
        Command::Ctr(Lazy(command)) => cli::ctr::main(command, spawn_ns),
        Command::Bench(Lazy(args)) => cli::bench::main(args),
        Command::Doctor(Lazy(args)) => cli::doctor::main(args),
        Command::Image(Lazy(command)) => cli::image::main(command),
    };
    match result {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(error) => {
            tracing::debug!("{error:?}");
            cli::complain(format_args!("twinbox: {}\n", cli::one_line(&error)));
            ExitCode::from(cli::EXIT_TWINBOX_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `twinbox ARGS... --help` prints.
    fn help(path: &[&str]) -> String {
        let args = std::iter::once("twinbox")
            .chain(path.iter().copied())
            .chain(["--help"]);
        match Cli::try_parse_from(args) {
            Err(error) if error.kind() == clap::error::ErrorKind::DisplayHelp => {
                error.render().to_string()
            }
            _ => panic!("twinbox {} --help printed no help", path.join(" ")),
        }
    }

    /// The description a command's help lists for `name` among its subcommands.
    fn listed(parent_help: &str, name: &str) -> String {
        parent_help
            .lines()
            .find_map(|line| line.trim_start().strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in:\n{parent_help}"))
            .trim()
            .to_owned()
    }

    #[test]
    fn a_subcommand_built_on_demand_says_what_its_parent_lists_and_takes_its_options() {
        // (path, an option its help must show)
        let commands: [(&[&str], &str); 11] = [
            (&["vm"], "run"),
            (&["vm", "run"], "--kernel"),
            (&["vm", "snapshot"], "--out"),
            (&["ctr"], "run"),
            (&["ctr", "run"], "--cpus"),
            (&["bench"], "--runs"),
            (&["doctor"], "--kvm-smoke"),
            (&["image"], "prune"),
            (&["image", "load"], "--ext4"),
            (&["image", "ls"], "--json"),
            (&["image", "rm"], "<REFERENCE>"),
        ];
        for (path, option) in commands {
            let (name, parent) = path.split_last().expect("a subcommand");
            let text = help(path);
            let about = listed(&help(parent), name);
            assert!(
                text.starts_with(&about),
                "twinbox {} --help starts {:?}, its parent lists {about:?}",
                path.join(" "),
                text.lines().next()
            );
            assert!(
                text.contains(option),
                "twinbox {} --help shows no {option}:\n{text}",
                path.join(" ")
            );
        }
    }
}
