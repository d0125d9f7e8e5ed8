//! What twinbox does when clap refuses the command line: an unknown flag, a bad value, a
//! missing argument or subcommand is told like every other failure of twinbox — one line
//! on stderr, `twinbox: ...`, and exit status 125 — instead of clap's own several lines
//! (message, tips, usage, "try '--help'") and status 2. `--help` and `--version` are not
//! failures: they print to stdout, as clap does, and exit 0.
//!
//! The line is clap's message, its did-you-mean tips, and which `--help` to read:
//!
//! ```text
//! twinbox: unexpected argument '--cpus' found; a similar argument exists: '--vcpus' (see 'twinbox vm run --help')
//! twinbox: invalid value 'x' for '--vcpus <N>': invalid digit found in string (see 'twinbox vm run --help')
//! ```

use super::{complain, EXIT_TWINBOX_ERROR};
use clap::error::ErrorKind;
use std::ffi::OsString;
use std::process::ExitCode;

/// Tells the user why clap refused `args` (or prints the help or version asked for) and
/// returns the exit status. `command` builds the whole CLI, called only for a refusal, to
/// name the subcommand whose `--help` to read (`--version` stays as cheap as it was).
pub fn refused(
    error: &clap::Error,
    command: impl FnOnce() -> clap::Command,
    args: &[OsString],
) -> ExitCode {
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // To stdout, coloured on a terminal; a reader that went away is no error.
            let _ = error.print();
            ExitCode::SUCCESS
        }
        // A command whose arguments are all optional asked for its help by being given
        // none: the help, on stderr, is the answer. (twinbox's subcommand groups turn this
        // off, so that `twinbox vm` is the one line "requires a subcommand".)
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = error.print();
            ExitCode::from(EXIT_TWINBOX_ERROR)
        }
        _ => {
            complain(format_args!(
                "twinbox: {}\n",
                one_line(error, &command_path(command(), args))
            ));
            ExitCode::from(EXIT_TWINBOX_ERROR)
        }
    }
}

/// clap's message, its did-you-mean tips and the `--help` of `path`, on one line.
fn one_line(error: &clap::Error, path: &str) -> String {
    // Rendered without colour (StyledStr's Display drops the styles): "error: MESSAGE"
    // (a list of missing arguments or valid subcommands on the lines below it), a blank
    // line, "  tip: ..." lines, a blank line, usage, a blank line, "For more information,
    // try '--help'."
    let rendered = error.render().to_string();
    let message = rendered.split("\n\n").next().unwrap_or_default();
    let message = message.strip_prefix("error: ").unwrap_or(message);
    let mut line = message
        .lines()
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    // "to pass '--x' as a value, use '-- --x'" is left out: after a mistyped flag it sends
    // the user the wrong way, and where CMD goes is in the help the line points to.
    let tips = rendered
        .lines()
        .filter_map(|text| text.trim_start().strip_prefix("tip: "))
        .filter(|tip| !tip.starts_with("to pass "));
    for tip in tips {
        line.push_str("; ");
        line.push_str(tip);
    }
    line.push_str(&format!(" (see '{path} --help')"));
    line
}

/// The subcommands `args` named before clap refused them, as the user types them:
/// `twinbox vm run` for `twinbox vm run --vcpus x`, `twinbox` for `twinbox frob`.
fn command_path(mut command: clap::Command, args: &[OsString]) -> String {
    // Every subcommand's arguments, deferred at start-up (`lazy`), are built here: this
    // path runs once, to print one line.
    command.build();
    let mut path = command.get_name().to_owned();
    let mut current = &command;
    for arg in args.iter().skip(1) {
        match current.find_subcommand(arg) {
            // `twinbox help frob`: the help to read is the parent's, not `help --help`.
            Some(sub) if sub.get_name() != "help" => {
                path.push(' ');
                path.push_str(sub.get_name());
                current = sub;
            }
            _ => break,
        }
    }
    path
}
