//! `handover reload` and `handover status`: clients of a running
//! `handover run`'s control socket.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::run::control;

pub fn reload(control_path: Option<&Path>, timeout: &str) -> Result<()> {
    let timeout = crate::run::duration(timeout)?;
    let answer = control::ask(control_path, "reload", timeout)?;
    if answer["ok"] == Value::Bool(true) {
        println!(
            "reloaded: generation {} is serving, pid {}",
            answer["generation"], answer["pid"]
        );
        return Ok(());
    }
    bail!(
        "reload failed: {}",
        answer["error"].as_str().unwrap_or("no reason given")
    )
}

pub fn status(control_path: Option<&Path>, json: bool) -> Result<()> {
    let s = control::ask(control_path, "status", Duration::from_secs(10))?;
    if json {
        println!("{s}");
        return Ok(());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    };
    println!(
        "handover pid {} running {}",
        s["supervisor_pid"],
        text(&s["program"])
    );
    println!("\nGENERATION  PID       STATE     READY  UPTIME");
    for g in s["generations"].as_array().into_iter().flatten() {
        println!(
            "{:<11} {:<9} {:<9} {:<6} {}s",
            text(&g["generation"]),
            text(&g["pid"]),
            text(&g["state"]),
            if g["ready"] == Value::Bool(true) {
                "yes"
            } else {
                "no"
            },
            text(&g["uptime_secs"])
        );
    }
    println!("\nSOCKET            ADDRESS");
    for sock in s["sockets"].as_array().into_iter().flatten() {
        println!("{:<17} {}", text(&sock["name"]), text(&sock["address"]));
    }
    let store = s["fdstore"].as_array().cloned().unwrap_or_default();
    println!(
        "\nFD STORE ({} of at most {})",
        store.len(),
        text(&s["fdstore_max"])
    );
    if !store.is_empty() {
        println!("NAME              KIND                              FROM GEN  AGE");
        for e in &store {
            let age = now.saturating_sub(e["stored_unix"].as_u64().unwrap_or(now));
            println!(
                "{:<17} {:<33} {:<9} {age}s",
                text(&e["name"]),
                text(&e["kind"]),
                text(&e["generation"])
            );
        }
    }
    println!(
        "\nrestarts: {}   reloads: {} ok, {} failed{}",
        text(&s["restarts"]),
        text(&s["reloads"]["ok"]),
        text(&s["reloads"]["failed"]),
        if s["reload_in_progress"] == Value::Bool(true) {
            "   (a reload is in progress)"
        } else {
            ""
        }
    );
    match &s["last_reload"] {
        Value::Null => println!("last reload: none"),
        r => {
            let ago = now.saturating_sub(r["at_unix"].as_u64().unwrap_or(now));
            if r["ok"] == Value::Bool(true) {
                println!(
                    "last reload: ok, {ago}s ago: generation {} pid {}",
                    text(&r["generation"]),
                    text(&r["pid"])
                );
            } else {
                println!("last reload: FAILED, {ago}s ago: {}", text(&r["error"]));
            }
        }
    }
    Ok(())
}
