//! The README's main command, run as a newcomer would: the reload demo on
//! Linux, and the channel demo (`--channel`, the default on Windows).

use std::process::Command;

#[test]
fn demo_serves_a_request_through_a_handed_over_listener() {
    let out = Command::new(env!("CARGO_BIN_EXE_handover"))
        .args(["demo", "--channel"])
        .output()
        .expect("running handover demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("-> HTTP/1.1 200 OK: served by pid"),
        "{stdout}"
    );
    // The server's pid differs from the binder's: it really crossed processes.
    let bound_pid = stdout
        .split("in pid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the demo names the binding pid");
    let served = stdout
        .split("served by pid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the demo names the serving pid");
    assert_ne!(bound_pid, served);
}

/// Five reloads under load: every request served, every reload ready.
#[cfg(target_os = "linux")]
#[test]
fn reload_demo_serves_every_request_across_reloads() {
    let out = Command::new(env!("CARGO_BIN_EXE_handover"))
        .arg("demo")
        .output()
        .expect("running handover demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout
        .lines()
        .find(|l| l.contains("requests served,"))
        .unwrap_or_else(|| panic!("no summary in {stdout}"));
    assert!(summary.contains(" 0 failed, 5 reloads"), "{summary}");
    let served: u64 = summary
        .trim_start_matches("[demo] ")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(served > 0, "{summary}");
    assert!(summary.contains("{1, 2, 3, 4, 5, 6}"), "{summary}");
}
