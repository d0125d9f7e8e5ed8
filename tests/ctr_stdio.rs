//! `twinbox ctr run` stdio against the real image (issue 12): stdout and stderr separate
//! and byte-exact, stdin piped in, a closed stdin is EOF, the exit status kept; and with
//! `-it` an interactive shell driven through a pty this test owns (the pty stands for the
//! user's terminal): prompt, arithmetic, Ctrl-C, window size and a resize, `exit 3`, the
//! terminal restored afterwards. Needs root and the built rootfs image; fails naming what
//! is missing. A leak check (mounts, loop devices, cgroups) surrounds every run.
//!
//! The tests share one lock: the leak check compares host snapshots.

mod common;

use common::describe;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use twinbox_spec::terminal::{self, WindowSize};

static SERIAL: Mutex<()> = Mutex::new(());

/// 8 MiB: the size of every stream the tests move.
const SIZE: usize = 8 << 20;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `twinbox ctr run --rootfs IMG ARGS -- CMD...`, not started.
fn ctr(args: &[&str], cmd: &[&str]) -> Command {
    let mut command = Command::new(common::twinbox());
    command
        .args([
            "ctr",
            "run",
            "--rootfs",
            &common::rootfs_image("twinbox ctr run"),
        ])
        .args(args)
        .arg("--")
        .args(cmd);
    command
}

/// Runs `command` to its end with `input` on its stdin (None: a closed pipe), leak-checked.
fn run(what: &str, mut command: Command, input: Option<Vec<u8>>) -> Output {
    common::leaks::check_no_leaks(what, || {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start twinbox");
        let mut stdin = child.stdin.take().expect("stdin");
        // A thread feeds stdin while output is read, so neither side fills up and waits.
        let feeder = std::thread::spawn(move || {
            if let Some(input) = input {
                // EPIPE if the workload stops reading early: its output tells the test.
                let _ = stdin.write_all(&input);
            }
        });
        let out = child.wait_with_output().expect("wait for twinbox");
        feeder.join().unwrap();
        out
    })
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = bytes.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_owned()
}

/// Fails unless every byte value occurs in `bytes`.
fn assert_every_byte_value(bytes: &[u8], what: &str) {
    let mut seen = [false; 256];
    bytes.iter().for_each(|b| seen[*b as usize] = true);
    let missing = seen.iter().filter(|s| !**s).count();
    assert_eq!(missing, 0, "{what}: {missing} byte values never occur");
}

#[test]
fn stdout_and_stderr_arrive_separate_and_byte_exact() {
    let _serial = serial();
    // Random data (every byte value, no structure to hide a lost or repeated block),
    // checksummed inside; the sums follow the data on stdout as two 73-byte lines.
    let script = "head -c 8388608 /dev/urandom > /tmp/o && head -c 8388608 /dev/urandom > /tmp/e \
        && cat /tmp/o && cat /tmp/e >&2 && cd /tmp && sha256sum o e | sed 's/  / /'";
    let out = run(
        "8 MiB on stdout and stderr",
        ctr(&[], &["/bin/sh", "-c", script]),
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe_short(&out));
    let sums_len = 2 * (64 + 1 + 1 + 1);
    assert_eq!(
        out.stdout.len(),
        SIZE + sums_len,
        "stdout is the data and the sums, nothing else"
    );
    assert_eq!(
        out.stderr.len(),
        SIZE,
        "stderr is the data, nothing of init"
    );
    let (data, sums) = out.stdout.split_at(SIZE);
    let sums = String::from_utf8_lossy(sums);
    let inside: Vec<&str> = sums.lines().collect();
    assert_eq!(inside.len(), 2, "{sums}");
    assert_eq!(format!("{} o", sha256(data)), inside[0], "stdout differs");
    assert_eq!(
        format!("{} e", sha256(&out.stderr)),
        inside[1],
        "stderr differs"
    );
    assert_every_byte_value(data, "stdout");
    assert_every_byte_value(&out.stderr, "stderr");
}

#[test]
fn stdin_of_8_mib_is_counted_and_checksummed_inside() {
    let _serial = serial();
    let input: Vec<u8> = (0..SIZE as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8 ^ i as u8)
        .collect();
    assert_every_byte_value(&input, "the input");
    let expected = sha256(&input);
    let out = run(
        "8 MiB on stdin",
        ctr(
            &[],
            &[
                "/bin/sh",
                "-c",
                "cat > /tmp/in; wc -c < /tmp/in; sha256sum < /tmp/in",
            ],
        ),
        Some(input),
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe_short(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(lines.next().map(str::trim), Some("8388608"), "{text}");
    assert!(
        lines.next().is_some_and(|l| l.starts_with(&expected)),
        "{text} vs {expected}"
    );
    // The one-liner of the issue.
    let out = run(
        "echo hi | wc -l",
        ctr(&[], &["wc", "-l"]),
        Some(b"hi\n".to_vec()),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "{}",
        describe(&out)
    );
}

#[test]
fn a_closed_stdin_is_end_of_input_and_the_exit_status_is_kept() {
    let _serial = serial();
    let out = run(
        "closed stdin",
        ctr(&[], &["/bin/sh", "-c", "cat; echo got-eof; exit 7"]),
        None,
    );
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got-eof\n");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "init says nothing"
    );
    // With --verbose, init's own exit line comes on stderr.
    let out = run(
        "closed stdin, verbose",
        ctr(&["--verbose"], &["/bin/sh", "-c", "exit 5"]),
        None,
    );
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    assert!(
        !out.stderr.is_empty(),
        "no line from init: {}",
        describe(&out)
    );
}

/// A terminal for twinbox: a pty pair of this test, twinbox on the slave as its
/// controlling terminal (so it gets SIGWINCH), the test on the master.
struct Terminal {
    master: File,
    child: Child,
    seen: Vec<u8>,
}

impl Terminal {
    fn spawn(mut command: Command, size: WindowSize) -> Self {
        let (mut master, mut slave) = (-1, -1);
        let ws = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors into our ints; the termios pointer is
        // NULL (defaults), the winsize ours.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &ws,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: two fresh descriptors, owned from here on.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let stdio = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
        command
            .stdin(stdio(&slave))
            .stdout(stdio(&slave))
            .stderr(stdio(&slave));
        // SAFETY: between fork and exec only setsid and ioctl, both async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start twinbox on the pty");
        drop(slave);
        Self {
            master: master.into(),
            child,
            seen: Vec::new(),
        }
    }

    /// Reads until `needle` shows up in what came since the last call; the transcript
    /// on failure.
    fn expect(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&self.seen).into_owned();
            if let Some(at) = text.find(needle) {
                self.seen.drain(..at + needle.len());
                return text[..at + needle.len()].to_owned();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {needle:?} within {within:?}; the terminal showed:\n{text:?}"
            );
            let mut pfd = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd of ours.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
            if pfd.revents != 0 {
                match self.master.read(&mut buf) {
                    Ok(n) if n > 0 => self.seen.extend_from_slice(&buf[..n]),
                    // EIO: twinbox and everything on the slave are gone.
                    _ => panic!(
                        "the terminal closed before {needle:?}:\n{:?}",
                        String::from_utf8_lossy(&self.seen)
                    ),
                }
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    fn resize(&self, size: WindowSize) {
        terminal::set_window_size(std::os::fd::AsFd::as_fd(&self.master), size).unwrap();
    }

    /// The settings of the terminal (on a pty master, TCGETS reads the slave's).
    fn settings(&self) -> libc::termios {
        // SAFETY: an all-zero termios is valid; tcgetattr fills it from our descriptor.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(self.master.as_raw_fd(), &mut t), 0);
            t
        }
    }

    /// Waits for twinbox to end (draining the terminal meanwhile); its exit code.
    fn wait(mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "twinbox did not end; the terminal showed:\n{:?}",
                    String::from_utf8_lossy(&self.seen)
                );
            }
            let mut pfd = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd of ours.
            unsafe { libc::poll(&mut pfd, 1, 50) };
            let mut buf = [0u8; 4096];
            if pfd.revents & libc::POLLIN != 0 {
                if let Ok(n) = self.master.read(&mut buf) {
                    self.seen.extend_from_slice(&buf[..n]);
                }
            }
        }
    }
}

const ICANON_ECHO: libc::tcflag_t = libc::ICANON | libc::ECHO;

#[test]
fn an_interactive_shell_runs_on_the_box_s_own_pty() {
    let _serial = serial();
    let code = common::leaks::check_no_leaks("ctr run -it -- /bin/sh", || {
        let size = WindowSize { rows: 31, cols: 97 };
        let mut term = Terminal::spawn(ctr(&["-it"], &["/bin/sh"]), size);
        assert_ne!(term.settings().c_lflag & ICANON_ECHO, 0);
        let prompt = "# ";
        term.expect(prompt, Duration::from_secs(20));
        // twinbox put the caller's terminal into raw mode for the session.
        assert_eq!(term.settings().c_lflag & ICANON_ECHO, 0, "not raw");
        term.send(b"echo $((6*7))\r");
        term.expect("\r\n42\r\n", Duration::from_secs(10));
        // The pty is the box's own: its devpts holds only it, and it is the shell's
        // controlling terminal.
        term.send(b"tty; ls /dev/pts | tr '\\n' ' '; echo; cat /proc/self/stat | cut -d' ' -f7\r");
        term.expect("\r\n/dev/pts/0\r\n0 ptmx \r\n", Duration::from_secs(10));
        let line = term.expect("\r\n", Duration::from_secs(10));
        assert_ne!(line.trim(), "0", "no controlling terminal (tty_nr 0)");
        // The window size the caller's terminal had, then a resize forwarded.
        term.send(b"stty size\r");
        term.expect("\r\n31 97\r\n", Duration::from_secs(10));
        term.resize(WindowSize {
            rows: 40,
            cols: 120,
        });
        // SIGWINCH reaches twinbox (the pty's foreground process group) and the box's
        // terminal follows; poll until it did.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            term.send(b"stty size\r");
            let answer = term.expect(prompt, Duration::from_secs(10));
            if answer.contains("40 120") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "resize not forwarded: {answer:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Ctrl-C is the workload's: sleep is interrupted, the shell and twinbox live on.
        term.send(b"sleep 100\r");
        term.expect("sleep 100\r\n", Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        term.send(b"\x03");
        term.expect(prompt, Duration::from_secs(10));
        term.send(b"echo after-$((1+1))\r");
        term.expect("\r\nafter-2\r\n", Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(10));
        term.send(b"exit 3\r");
        term.wait(Duration::from_secs(20))
    });
    assert_eq!(code, Some(3), "the shell's exit status");
}

#[test]
fn the_terminal_comes_back_cooked_and_a_tty_without_a_terminal_stdin_still_runs() {
    let _serial = serial();
    // The caller's settings are back once twinbox is gone.
    common::leaks::check_no_leaks("ctr run -it -- sh -c 'read l; exit 4'", || {
        let mut term = Terminal::spawn(
            ctr(&["-it"], &["/bin/sh", "-c", "echo ready; read l; exit 4"]),
            WindowSize { rows: 24, cols: 80 },
        );
        term.expect("ready", Duration::from_secs(20));
        assert_eq!(term.settings().c_lflag & ICANON_ECHO, 0, "not raw");
        term.send(b"\r");
        let master = term.master.try_clone().unwrap();
        assert_eq!(term.wait(Duration::from_secs(20)), Some(4));
        // SAFETY: an all-zero termios is valid; tcgetattr fills it from our descriptor.
        let after = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            libc::tcgetattr(master.as_raw_fd(), &mut t);
            t
        };
        assert_eq!(after.c_lflag & ICANON_ECHO, ICANON_ECHO, "left raw");
    });
    // SIGTERM to twinbox mid-session: the box is stopped and the terminal restored too.
    common::leaks::check_no_leaks("ctr run -it -- sleep 100, SIGTERM", || {
        let term = Terminal::spawn(
            ctr(&["-it"], &["sleep", "100"]),
            WindowSize { rows: 24, cols: 80 },
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while term.settings().c_lflag & ICANON_ECHO != 0 {
            assert!(Instant::now() < deadline, "never raw");
            std::thread::sleep(Duration::from_millis(50));
        }
        let master = term.master.try_clone().unwrap();
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(term.child.id() as i32, libc::SIGTERM) };
        assert_eq!(
            term.wait(Duration::from_secs(20)),
            Some(128 + libc::SIGTERM)
        );
        // SAFETY: an all-zero termios is valid; tcgetattr fills it from our descriptor.
        let after = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            libc::tcgetattr(master.as_raw_fd(), &mut t);
            t
        };
        assert_eq!(after.c_lflag & ICANON_ECHO, ICANON_ECHO, "left raw");
    });
    // -t with stdin and stdout pipes: the pty is made all the same, output comes merged.
    let out = run(
        "ctr run -t with pipes",
        ctr(&["-t"], &["/bin/sh", "-c", "tty; echo err >&2; exit 6"]),
        None,
    );
    assert_eq!(out.status.code(), Some(6), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/dev/pts/0\r\nerr\r\n"
    );
    // -t with a piped stdin: its end reaches the box as a keyboard's Ctrl-D would, after
    // a finished line and an unfinished one alike (the time limit only stops a hang).
    for input in [&b"one\ntwo\n"[..], b"one\ntwo"] {
        let out = run(
            "ctr run -t with piped input",
            ctr(
                &["-t", "--timeout", "20"],
                &["/bin/sh", "-c", "wc -l; echo got-eof"],
            ),
            Some(input.to_vec()),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        // wc counts newlines; the pty echoes the input before its count.
        let lines = if input.ends_with(b"\n") { 2 } else { 1 };
        assert!(
            text.ends_with(&format!("{lines}\r\ngot-eof\r\n")),
            "{text:?}"
        );
    }
    // A terminal stdin without -i or -t is not the workload's: it reads EOF at once.
    common::leaks::check_no_leaks("ctr run on a terminal without -i", || {
        let mut term = Terminal::spawn(
            ctr(&[], &["/bin/sh", "-c", "cat; echo stdin-closed"]),
            WindowSize { rows: 24, cols: 80 },
        );
        term.expect("stdin-closed", Duration::from_secs(20));
        assert_eq!(term.wait(Duration::from_secs(20)), Some(0));
    });
}

fn describe_short(out: &Output) -> String {
    format!(
        "status {:?}, {} bytes of stdout, stderr starts {:?}",
        out.status.code(),
        out.stdout.len(),
        String::from_utf8_lossy(&out.stderr[..out.stderr.len().min(400)])
    )
}
