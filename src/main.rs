//! `twinbox`: boot one rootfs image as a KVM microVM and as a container, and measure both.
//!
//! This binary only parses, calls a library, and prints. Every user-facing failure is one
//! line on stderr and a non-zero exit status; the error chain goes to the log
//! (`RUST_LOG=debug`).

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Boot one root filesystem image as a KVM microVM and run the very same image as a
/// Linux container, then measure both side by side.
#[derive(Parser)]
#[command(name = "twinbox", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a workload in a KVM microVM (twinbox's own VMM, real Linux kernel).
    #[command(subcommand)]
    Vm(cli::vm::VmCommand),
    /// Run a workload in a container (namespaces, cgroups, overlayfs) from the same image.
    #[command(subcommand)]
    Ctr(cli::ctr::CtrCommand),
    /// Measure native, container and microVM side by side and write a report.
    Bench(cli::bench::BenchArgs),
    /// Check this host: KVM flavour, root, cgroups, overlayfs, loop, tun, artifacts.
    Doctor(cli::doctor::DoctorArgs),
    /// The cache of OCI/Docker images: load, ls, rm, prune.
    #[command(subcommand)]
    Image(cli::image::ImageCommand),
}

fn main() -> ExitCode {
    // `spawn` is stamped first thing, before argument parsing, so startup numbers include
    // everything twinbox itself does.
    let spawn_ns = twinbox_spec::clock::monotonic_ns();
    cli::logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vm(command) => cli::vm::main(command, spawn_ns),
        Command::Ctr(command) => cli::ctr::main(command, spawn_ns),
        Command::Bench(args) => cli::bench::main(args),
        Command::Doctor(args) => cli::doctor::main(args),
        Command::Image(command) => cli::image::main(command),
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
