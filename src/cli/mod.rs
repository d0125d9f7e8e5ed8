//! The subcommands. Each file parses its arguments, calls a library and prints.

pub mod bench;
pub mod common;
pub mod ctr;
pub mod doctor;
pub mod image;
pub mod lazy;
pub mod logging;
pub mod usage;
pub mod vm;

/// Exit status when twinbox itself fails (bad input, missing artifact, setup error), as
/// opposed to the workload's own status. 125 follows `docker run`/`podman run`: it stays
/// clear of the workload's 0–124 and of the shell's 126/127/128+N.
pub const EXIT_TWINBOX_ERROR: u8 = 125;

/// An error and its causes joined into one line for a user: `what: why: root cause`.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for (i, cause) in error.chain().enumerate() {
        let text = cause.to_string();
        if i > 0 {
            if line.contains(&text) {
                continue;
            }
            line.push_str(": ");
        }
        line.push_str(text.lines().next().unwrap_or_default());
    }
    line
}

/// Prints a line to stdout; a reader that went away (`twinbox doctor | head`) is not an
/// error (`println!` would panic on the broken pipe).
pub fn say(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// Writes `text` to stderr; a reader that went away is not an error. `eprintln!` would
/// panic on the broken pipe, and a box's CLI whose stderr reader died (a killed bench that
/// started it, `2>&1 | head`) must still exit with the workload's status, not 101.
pub fn complain(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = std::io::stderr().write_fmt(text);
}
