//! The VM's stdio (issue 12): the workload's stdin, stdout and stderr as three streams
//! over the console device's ports, as a shell user expects them.
//!
//! Where Linux boots (the lab, or a host with hardware KVM), one script:
//! - 8 MiB of random bytes (every byte value) piped in come back on stdout byte-exact
//!   (sha256 on both sides), while the workload's stderr line arrives on stderr alone;
//!   the same 8 MiB sent to stderr arrive there byte-exact with stdout empty;
//! - `wc -c` counts the 8 MiB of stdin; a closed stdin is end of input at once; with `-t`
//!   a piped stdin's end reaches the workload as the terminal's end of file;
//! - the exit status is the workload's; nothing of init or the kernel is on stdout or
//!   stderr without `--verbose`, and `--console-log FILE` holds the kernel log;
//! - a 5,000-character command runs (the job is no longer on the kernel command line);
//! - `-it -- /bin/sh` is an interactive shell through a pty (util-linux `script` plays
//!   the user's terminal): `echo $((6*7))` answers 42, Ctrl-C reaches the workload (a
//!   trap inside prints), the shell survives it, and `exit 3` ends the run with 3;
//! - throughput of 256 MiB of workload output to /dev/null, printed (a measurement, not
//!   asserted).
//!
//! Needs root, the built artifacts, and for the lab its kernel, QEMU and util-linux's
//! `script`; fails naming what is missing.

mod common;

const SCRIPT: &str = r#"
set -u
head -c 8388608 /dev/urandom > /tmp/blob
echo BLOB_SUM=$(sha256sum < /tmp/blob | cut -d' ' -f1)

twinbox vm run -- /bin/sh -c 'cat; echo err-line >&2; exit 7' < /tmp/blob > /tmp/out 2> /tmp/err
echo CAT_STATUS=$?
echo OUT_SUM=$(sha256sum < /tmp/out | cut -d' ' -f1)
echo ERR_TEXT=$(base64 -w0 < /tmp/err)

twinbox vm run -- /bin/sh -c 'cat >&2' < /tmp/blob > /tmp/out2 2> /tmp/err2
echo ERR2_SUM=$(sha256sum < /tmp/err2 | cut -d' ' -f1)
echo ERR2_BYTES=$(wc -c < /tmp/err2)
cmp /tmp/blob /tmp/err2 >/dev/null || echo ERR2_TAIL=$(cmp /tmp/blob /tmp/err2 2>&1 | head -1), the blob ends as stderr does: $(test "$(tail -c 4096 /tmp/blob | sha256sum)" = "$(tail -c 4096 /tmp/err2 | sha256sum)" && echo yes || echo no)
echo OUT2_BYTES=$(wc -c < /tmp/out2)

echo STDIN_COUNT=$(twinbox vm run -- wc -c < /tmp/blob | tr -d ' ')
echo CLOSED_STDIN_BYTES=$(twinbox vm run -- cat < /dev/null | wc -c)
echo TTY_PIPED=$(printf 'one\ntwo\n' | twinbox vm run -t --timeout 300 -- /bin/sh -c 'wc -l; echo piped-eof' | tr -d '\r' | tail -2 | tr '\n' ,)

twinbox vm run --console-log /tmp/console -- /bin/echo hello > /tmp/hello 2> /tmp/hello.err
echo HELLO_STATUS=$?
echo HELLO_TEXT=$(base64 -w0 < /tmp/hello)
echo HELLO_ERR_BYTES=$(wc -c < /tmp/hello.err)
grep -q 'Linux version' /tmp/console && echo CONSOLE_HAS_KERNEL=yes
grep -q 'workload exited with status 0' /tmp/console || echo CONSOLE_EXIT_LINE=absent-without-verbose
twinbox vm run --verbose -- /bin/true > /tmp/verbose.out 2> /tmp/verbose.err
grep -q 'workload exited with status 0' /tmp/verbose.err && echo VERBOSE_EXIT_LINE=stderr
echo VERBOSE_OUT_BYTES=$(wc -c < /tmp/verbose.out)

long=$(head -c 5000 /dev/zero | tr '\0' 'x')
echo LONG_LEN=$(twinbox vm run -- /bin/echo "$long" | tr -d '\n' | wc -c)

now_ms() { awk '{print int($1 * 1000)}' /proc/uptime; }
start=$(now_ms)
twinbox vm run -- /bin/sh -c 'dd if=/dev/zero bs=64k count=4096 2>/dev/null' | cat > /dev/null
echo OUTPUT_256MIB_MS=$(( $(now_ms) - start ))
start=$(now_ms)
twinbox vm run -- /bin/true > /dev/null
echo TRUE_MS=$(( $(now_ms) - start ))

# The interactive shell: `script` gives twinbox a terminal and relays what we type (the
# lab's /dev has no devpts of its own).
if [ ! -e /dev/pts/ptmx ]; then
    mkdir -p /dev/pts && mount -t devpts -o ptmxmode=0666 devpts /dev/pts
fi
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mkfifo /tmp/typed
script -qfec "twinbox vm run -it -- /bin/sh" /tmp/typescript < /tmp/typed > /dev/null 2>&1 &
term=$!
exec 3<> /tmp/typed
waitfor() { for i in $(seq 1 1200); do grep -q "$1" /tmp/typescript 2>/dev/null && return 0; sleep 0.5; done; return 1; }
printf 'echo ANSWER$((6*7))\r' >&3
waitfor ANSWER42 && echo TTY_ANSWER=42
printf 'sh -c "trap \\"echo TRAPPED\\$((1+1)); exit 5\\" INT; echo READY\\$((4+4)); sleep 100 & wait"\r' >&3
waitfor READY8 && sleep 2
printf '\003' >&3
waitfor TRAPPED2 && echo TTY_CTRL_C=reached-workload
printf 'echo SURVIVED$((2+3))\r' >&3
waitfor SURVIVED5 && echo TTY_SHELL=survived
printf 'exit 3\r' >&3
wait $term
echo TTY_STATUS=$?
exec 3>&-
"#;

#[test]
fn streams_are_separate_and_byte_exact_stdin_flows_and_an_interactive_shell_works() {
    let out = common::run_where_linux_boots(SCRIPT, |lab| {
        lab.bin("/usr/bin/script").mem_mib(2048).timeout_s(1800)
    });
    let v = |key: &str| out.expect_value(key);
    let blob = v("BLOB_SUM");
    assert_eq!(
        v("CAT_STATUS"),
        "7",
        "the workload's status:\n{}",
        out.output
    );
    assert_eq!(v("OUT_SUM"), blob, "8 MiB in and back out on stdout");
    assert_eq!(
        v("ERR_TEXT"),
        "ZXJyLWxpbmUK",
        "stderr holds exactly the workload's `err-line\\n`:\n{}",
        out.output
    );
    assert_eq!(
        v("ERR2_SUM"),
        blob,
        "8 MiB out on stderr; got {} bytes ending in (base64) {:?}",
        v("ERR2_BYTES"),
        out.value("ERR2_TAIL")
    );
    assert_eq!(
        v("OUT2_BYTES"),
        "0",
        "stdout empty when only stderr is written"
    );
    assert_eq!(v("STDIN_COUNT"), "8388608", "wc -c of 8 MiB of stdin");
    assert_eq!(v("CLOSED_STDIN_BYTES"), "0");
    assert_eq!(
        v("TTY_PIPED"),
        "2,piped-eof,",
        "-t with a piped stdin: `wc -l` reads its end:\n{}",
        out.output
    );
    assert_eq!(v("HELLO_STATUS"), "0");
    assert_eq!(v("HELLO_TEXT"), "aGVsbG8K", "stdout is exactly `hello\\n`");
    assert_eq!(
        v("HELLO_ERR_BYTES"),
        "0",
        "nothing of init or the kernel on stderr"
    );
    assert_eq!(
        v("CONSOLE_HAS_KERNEL"),
        "yes",
        "--console-log has the kernel log"
    );
    assert_eq!(v("CONSOLE_EXIT_LINE"), "absent-without-verbose");
    assert_eq!(
        v("VERBOSE_EXIT_LINE"),
        "stderr",
        "--verbose shows init's lines"
    );
    assert_eq!(
        v("VERBOSE_OUT_BYTES"),
        "0",
        "even verbose, stdout stays clean"
    );
    assert_eq!(v("LONG_LEN"), "5000", "a 5,000-character argument runs");
    assert_eq!(v("TTY_ANSWER"), "42", "{}", out.output);
    assert_eq!(v("TTY_CTRL_C"), "reached-workload", "{}", out.output);
    assert_eq!(v("TTY_SHELL"), "survived", "{}", out.output);
    assert_eq!(v("TTY_STATUS"), "3", "exit 3 ends the run with 3");
    let ms: f64 = v("OUTPUT_256MIB_MS").parse().unwrap();
    let base: f64 = v("TRUE_MS").parse().unwrap();
    eprintln!(
        "256 MiB of workload output through the VM: {ms} ms ({base} ms for /bin/true); \
         {:.0} MB/s beyond start-up (lab: software CPU)",
        268.435456 / ((ms - base).max(1.0) / 1000.0)
    );
}

/// On any KVM (this host's PVM too): a `-t` run that ends at its time limit restores the
/// caller's terminal from under the caller thread's seccomp filter — the VMM is not killed
/// (SIGSYS, 159) on the way out — and the terminal is cooked again afterwards.
#[test]
fn a_tty_run_restores_the_terminal_under_the_caller_filter() {
    common::require_root("twinbox vm run -t");
    assert!(
        std::path::Path::new("/usr/bin/script").exists(),
        "/usr/bin/script missing (util-linux): it plays the terminal"
    );
    let dir = std::env::temp_dir().join(format!("twinbox-tty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let line = format!(
        "stty -a | grep -o -- '-\\?icanon' | head -n1 > {dir}/before; \
         {twinbox} vm run -t --timeout 2 -- /bin/true; echo $? > {dir}/status; \
         stty -a | grep -o -- '-\\?icanon' | head -n1 > {dir}/after",
        dir = dir.display(),
        twinbox = common::twinbox().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script");
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let transcript = String::from_utf8_lossy(&out.stdout);
    let (status, before, after) = (read("status"), read("before"), read("after"));
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        status, "1",
        "the run ends at its time limit with 1, not killed: {transcript}"
    );
    assert_eq!(before, "icanon", "{transcript}");
    assert_eq!(
        after, "icanon",
        "the terminal is cooked again: {transcript}"
    );
}
