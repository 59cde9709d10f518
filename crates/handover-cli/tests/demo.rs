//! The README's main command, run as a newcomer would.

use std::process::Command;

#[test]
fn demo_serves_a_request_through_a_handed_over_listener() {
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
