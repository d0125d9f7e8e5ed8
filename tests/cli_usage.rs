//! What a user sees when the command line itself is wrong: one line on stderr naming the
//! mistake and the `--help` to read, exit status 125 (as for every failure of twinbox
//! itself), nothing on stdout. And what they see when they ask for help or the version:
//! it on stdout, exit 0. Needs neither root nor artifacts: nothing is run.

mod common;

use std::process::Command;

/// Runs `twinbox ARGS` and returns (status, stdout, stderr).
fn twinbox(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::twinbox())
        .args(args)
        .output()
        .expect("run twinbox");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `twinbox ARGS` is refused in one line that contains each of `needles`.
fn assert_refused(args: &[&str], needles: &[&str]) {
    let (status, stdout, stderr) = twinbox(args);
    assert_eq!(status, 125, "twinbox {args:?}: {stderr}");
    assert_eq!(stdout, "", "twinbox {args:?} wrote to stdout");
    assert_eq!(
        stderr.lines().count(),
        1,
        "twinbox {args:?}: one line, got {stderr:?}"
    );
    assert!(stderr.ends_with('\n'), "twinbox {args:?}: {stderr:?}");
    assert!(
        stderr.starts_with("twinbox: "),
        "twinbox {args:?}: {stderr:?}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "twinbox {args:?}: {stderr:?} should mention {needle:?}"
        );
    }
}

#[test]
fn an_unknown_flag_is_one_line_125_with_the_similar_one() {
    assert_refused(
        &["vm", "run", "--cpus", "2", "--", "/bin/true"],
        &[
            "unexpected argument '--cpus'",
            "a similar argument exists: '--vcpus'",
            "(see 'twinbox vm run --help')",
        ],
    );
    assert_refused(
        &["ctr", "run", "--bogus"],
        &["'--bogus'", "(see 'twinbox ctr run --help')"],
    );
    // The workload's command without `--` is an argument twinbox does not take.
    assert_refused(
        &["ctr", "run", "ls", "-la"],
        &["unexpected argument 'ls'", "(see 'twinbox ctr run --help')"],
    );
}

#[test]
fn a_bad_value_is_one_line_125_naming_the_option_and_why() {
    assert_refused(
        &["vm", "run", "--vcpus", "x", "--", "/bin/true"],
        &["invalid value 'x' for '--vcpus <N>'", "invalid digit"],
    );
    assert_refused(
        &["ctr", "run", "--cpus", "2x", "--", "/bin/true"],
        &["invalid value '2x' for '--cpus <N>'"],
    );
    assert_refused(
        &[
            "vm",
            "run",
            "--vcpus",
            "1",
            "--vcpus",
            "2",
            "--",
            "/bin/true",
        ],
        &["'--vcpus <N>' cannot be used multiple times"],
    );
}

#[test]
fn a_missing_argument_is_one_line_125_naming_it() {
    assert_refused(
        &["image", "rm"],
        &["<REFERENCE>", "(see 'twinbox image rm --help')"],
    );
    assert_refused(
        &["vm", "run", "--rootfs"],
        &["a value is required for '--rootfs <IMG>'"],
    );
    assert_refused(&["vm", "snapshot"], &["--out <DIR>"]);
}

#[test]
fn an_unknown_or_missing_subcommand_is_one_line_125_listing_or_suggesting() {
    assert_refused(
        &["frob"],
        &["unrecognized subcommand 'frob'", "(see 'twinbox --help')"],
    );
    assert_refused(
        &["image", "rmm", "x"],
        &[
            "unrecognized subcommand 'rmm'",
            "a similar subcommand exists: 'rm'",
            "(see 'twinbox image --help')",
        ],
    );
    assert_refused(&["help", "frob"], &["'frob'", "(see 'twinbox --help')"]);
    // A group with no subcommand names what it takes instead of printing its whole help.
    assert_refused(
        &[],
        &["requires a subcommand", "vm, ctr, bench, doctor, image"],
    );
    assert_refused(
        &["vm"],
        &["'twinbox vm' requires a subcommand", "run, snapshot"],
    );
    assert_refused(&["ctr"], &["'twinbox ctr' requires a subcommand", "run"]);
    assert_refused(
        &["image"],
        &[
            "'twinbox image' requires a subcommand",
            "load, ls, rm, prune",
        ],
    );
}

#[test]
fn help_and_version_go_to_stdout_and_exit_0() {
    let asks: [(&[&str], &str); 8] = [
        (&["--help"], "Usage: "),
        (&["-h"], "Usage: "),
        (&["help"], "Usage: "),
        (&["help", "vm"], "Usage: "),
        (&["vm", "run", "--help"], "--vcpus <N>"),
        (&["image", "rm", "-h"], "<REFERENCE>"),
        (&["--version"], "twinbox "),
        (&["-V"], "twinbox "),
    ];
    for (args, expected) in asks {
        let (status, stdout, stderr) = twinbox(args);
        assert_eq!(status, 0, "twinbox {args:?}: {stderr}");
        assert_eq!(stderr, "", "twinbox {args:?} wrote to stderr");
        assert!(
            stdout.contains(expected),
            "twinbox {args:?}: stdout {stdout:?} shows no {expected:?}"
        );
    }
    let (_, version, _) = twinbox(&["--version"]);
    assert_eq!(
        version,
        format!("twinbox {}\n", env!("CARGO_PKG_VERSION")),
        "twinbox --version"
    );
}
