//! `otm demo` end to end: the built binary runs the whole offline tour and says what happened.
//! No timing is asserted; the demo's own waits give up after 30 s each.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `otm demo` and returns (success, stdout, stderr); kills it after `limit`.
fn run_demo(limit: Duration) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_otm"))
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("otm demo starts");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let began = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if began.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "otm demo ran longer than {limit:?}\nstdout:\n{}\nstderr:\n{}",
                out.join().unwrap(),
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.success(), out.join().unwrap(), err.join().unwrap())
}

/// The line after the one containing `needle`.
fn line_after<'a>(text: &'a str, needle: &str) -> Option<&'a str> {
    let mut lines = text.lines();
    lines.by_ref().find(|l| l.contains(needle))?;
    lines.next()
}

#[test]
fn the_demo_tours_the_service_and_cleans_up() {
    let (ok, stdout, stderr) = run_demo(Duration::from_secs(240));
    let both = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(ok, "otm demo failed\n{both}");

    // Three tenants answered a conversation: every chat starts at #1, bob's goes to #3.
    for tenant in ["alice", "bob", "carol"] {
        let first = stdout
            .lines()
            .find(|l| l.contains(&format!("[{tenant}]")) && l.contains("bot:"))
            .unwrap_or_else(|| panic!("no reply shown for {tenant}\n{both}"));
        assert!(
            first.contains("#1: "),
            "{tenant}'s first reply is #1: {first}\n{both}"
        );
    }
    assert!(stdout.contains("#2: ping"), "{both}");
    assert!(stdout.contains("#3: still there?"), "{both}");

    // carol fell asleep (no instance), had a final snapshot, and woke remembering two messages.
    assert!(stdout.contains("carol: idle, no instance"), "{both}");
    assert!(stdout.contains("reason \"final\""), "{both}");
    let back =
        line_after(&stdout, "user: I'm back.").unwrap_or_else(|| panic!("no wake message\n{both}"));
    assert!(
        back.contains("[carol]") && back.contains("bot:  #3: I'm back."),
        "the count goes on after the wake: {back}\n{both}"
    );

    // The phase table: a header, a cold row with its phases, the warm row (measured or marked
    // unavailable), and the awake row.
    let header = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("path "))
        .unwrap_or_else(|| panic!("no latency table\n{both}"));
    for column in ["create", "claim", "restore", "start", "ready", "total"] {
        assert!(
            header.contains(column),
            "column {column} in {header}\n{both}"
        );
    }
    let table = stdout
        .split_once(header)
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} row\n{both}"))
            .to_owned()
    };
    let cold = row("cold");
    let cells: Vec<&str> = cold.split_whitespace().collect();
    assert!(
        cells.len() >= 7 && cells[1].parse::<u64>().is_ok(),
        "cold row has a create time: {cold}\n{both}"
    );
    let warm = row("warm");
    assert!(
        warm.contains("not available in this build")
            || warm
                .split_whitespace()
                .nth(2)
                .is_some_and(|c| c.parse::<u64>().is_ok()),
        "warm row has a claim time or says why not: {warm}\n{both}"
    );
    row("awake");
    assert!(stdout.contains("first reply after a cold wake"), "{both}");

    // It cleaned up and said how long it took.
    let dir = stdout
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("data directory"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no data directory shown\n{both}"));
    assert!(dir.starts_with("/tmp/otm-demo-"), "{dir}");
    assert!(
        !std::path::Path::new(dir).exists(),
        "{dir} was removed\n{both}"
    );
    assert!(stdout.contains(&format!("removed {dir}")), "{both}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("demo finished in ") && last.ends_with(" s"),
        "{last}\n{both}"
    );

    // No secret shows: bot tokens are `<bot id>:<secret>`, and server logs stay off stdout.
    for bot in ["700001:", "700002:", "700003:"] {
        assert!(
            !stdout.contains(bot) && !stderr.contains(bot),
            "a bot token was printed\n{both}"
        );
    }
    assert!(
        !stdout.contains(" INFO ") && !stdout.contains(" WARN "),
        "logs went to stdout\n{both}"
    );
}
