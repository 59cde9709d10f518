//! Access control for real: the tests run as root, and the clients they
//! start run as uid/gid 65534. What the rules deny is denied and what they
//! grant is allowed; with no rules, other uids get nothing; SIGHUP reloads
//! the rules and a bad file is refused with the old rules kept.

#![cfg(target_os = "linux")]

mod holder_common;

use handover::holder::{Entry, StoreOptions};
use handover::Handle;
use holder_common::*;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

const RULES: &str = r#"
# nobody may fetch and wait for what is under pub/, and list everything
[[allow]]
uid = 65534
ops = ["retrieve", "wait"]
names = ["pub/*"]

[[allow]]
gid = 65534
ops = ["list"]
names = ["pub/*", "other"]
"#;

#[test]
fn another_uid_gets_what_the_rules_grant_and_nothing_else() {
    if !is_root() {
        eprintln!("skipped: needs root to start a client as uid 65534");
        return;
    }
    let dir = scratch("rules");
    let rules = dir.join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let holder = Holder::start(&["--rules", rules.to_str().unwrap()]);
    let mut root = holder.client();
    for name in ["pub/a", "secret", "other"] {
        let f = std::fs::File::open("/dev/null").unwrap();
        root.store(name, &Handle::from(f), StoreOptions::new())
            .unwrap();
    }

    // Granted: retrieve and wait under pub/, list (only what it may list).
    let out = ok(&mut holder.cmd_as_nobody([
        "get",
        "pub/a",
        "--",
        "sh",
        "-c",
        "echo $LISTEN_FDNAMES; id -u",
    ]));
    assert_eq!(out, "pub/a\n65534\n");
    ok(&mut holder.cmd_as_nobody(["wait", "pub/a", "--timeout", "1s"]));
    let json = ok(&mut holder.cmd_as_nobody(["ls", "--json"]));
    let listed: Vec<Entry> = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["other", "pub/a"], "secret must not be listed");

    // Denied: everything else, with a message that says who and what.
    let e = fails(&mut holder.cmd_as_nobody(["get", "secret", "--", "true"]));
    assert!(
        e.contains("uid 65534")
            && e.contains("may not retrieve \"secret\"")
            && e.contains("denied"),
        "{e}"
    );
    let e = fails(&mut holder.cmd_as_nobody(["get", "pub/a", "--remove", "--", "true"]));
    assert!(e.contains("may not remove \"pub/a\""), "{e}");
    let e = fails(&mut holder.cmd_as_nobody(["rm", "pub/a"]));
    assert!(e.contains("denied"), "{e}");
    let e = fails(&mut holder.cmd_as_nobody(["put", "pub/b", "--fd", "0"]));
    assert!(e.contains("may not store \"pub/b\""), "{e}");
    let e = fails(&mut holder.cmd_as_nobody(["wait", "secret", "--timeout", "1s"]));
    assert!(e.contains("may not wait"), "{e}");
    // A denied retrieve of a missing name says denied, not "not found":
    // it tells nothing about what is held.
    let e = fails(&mut holder.cmd_as_nobody(["get", "missing", "--", "true"]));
    assert!(e.contains("denied"), "{e}");
    // Nothing was removed or added by the refused requests.
    let names: Vec<String> = root.list().unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["other", "pub/a", "secret"]);

    // SIGHUP: new rules let nobody store under pub/ (and remove there).
    std::fs::write(
        &rules,
        format!(
            "{RULES}\n[[allow]]\nuid = \"*\"\nops = [\"store\", \"remove\"]\nnames = [\"pub/*\"]\n"
        ),
    )
    .unwrap();
    holder.signal(libc::SIGHUP);
    holder.wait_for_log("rules reloaded");
    ok(&mut holder.cmd_as_nobody(["put", "pub/b", "--listen", "127.0.0.1:0"]));
    let b = root
        .list()
        .unwrap()
        .into_iter()
        .find(|e| e.name == "pub/b")
        .expect("stored");
    assert_eq!(
        (b.owner_uid, b.owner_gid),
        (65534, 65534),
        "the owner is the storing client"
    );
    ok(&mut holder.cmd_as_nobody(["rm", "pub/b"]));
    let e = fails(&mut holder.cmd_as_nobody(["put", "secret2", "--fd", "0"]));
    assert!(e.contains("denied"), "{e}");

    // A bad file is refused, clearly, and the rules in force stay.
    std::fs::write(
        &rules,
        "[[allow]]\nuid = 65534\nops = [\"steal\"]\nnames = [\"*\"]\n",
    )
    .unwrap();
    holder.signal(libc::SIGHUP);
    holder.wait_for_log("refused");
    let log = holder.stderr();
    assert!(log.contains("unknown operation \"steal\""), "{log}");
    assert!(log.contains(rules.to_str().unwrap()), "{log}");
    assert!(log.contains("previous rules stay in force"), "{log}");
    ok(&mut holder.cmd_as_nobody(["put", "pub/c", "--listen", "127.0.0.1:0"]));
    let e = fails(&mut holder.cmd_as_nobody(["get", "secret", "--", "true"]));
    assert!(e.contains("denied"), "{e}");
    // A file that is not even TOML: refused too, the holder keeps serving.
    std::fs::write(&rules, "[[allow\n").unwrap();
    holder.signal(libc::SIGHUP);
    eventually("the second refusal", || {
        (holder.stderr().matches("was refused").count() == 2).then_some(())
    });
    ok(&mut holder.cmd_as_nobody(["get", "pub/c", "--", "true"]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_rules_only_the_holders_own_uid_is_served() {
    if !is_root() {
        eprintln!("skipped: needs root to start a client as uid 65534");
        return;
    }
    // The socket file is opened to everyone, so that the holder itself
    // has to refuse.
    let holder = Holder::start(&["--socket-mode", "666"]);
    ok(&mut holder.cmd(["put", "x", "--listen", "127.0.0.1:0"]));
    for args in [
        &["ls"][..],
        &["get", "x", "--", "true"],
        &["rm", "x"],
        &["wait", "x", "--timeout", "1s"],
        &["put", "y", "--fd", "0"],
    ] {
        let e = fails(&mut holder.cmd_as_nobody(args));
        assert!(e.contains("denied"), "{args:?}: {e}");
    }
    // A takeover by another uid is refused too, and changes nothing.
    let mut takeover = handover(["hold", "--takeover"]);
    takeover.arg(&holder.path);
    {
        use std::os::unix::process::CommandExt;
        takeover.uid(NOBODY).gid(NOBODY).current_dir("/");
    }
    let e = fails(&mut takeover);
    assert!(e.contains("may not take this holder over"), "{e}");
    assert_eq!(holder.client().list().unwrap().len(), 1);
    // Without --socket-mode the file itself keeps others out.
    let private = Holder::start(&[]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&private.path).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_bad_rules_file_stops_the_start() {
    let dir = scratch("badrules");
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        "[[allow]]\nuid = 1\ngid = 2\nops = [\"store\"]\nnames = [\"*\"]\n",
    )
    .unwrap();
    let mut cmd = handover(["hold", "--socket"]);
    cmd.arg(dir.join("h.sock")).arg("--rules").arg(&rules);
    let e = fails(&mut cmd);
    assert!(e.contains("rules file") && e.contains("not both"), "{e}");
    assert!(!dir.join("h.sock").exists(), "nothing was bound");
    let mut cmd = handover(["hold", "--socket"]);
    cmd.arg(dir.join("h.sock"))
        .arg("--rules")
        .arg(dir.join("missing.toml"));
    let e = fails(&mut cmd);
    assert!(e.contains("cannot read the rules file"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
