//! Who may do what: the holder's access rules, from a TOML file.
//!
//! ```toml
//! [[allow]]
//! uid = 65534                    # a uid; or gid = 100; or uid = "*" (anyone)
//! ops = ["retrieve", "wait"]     # store, retrieve, remove, list, wait, or "*"
//! names = ["web/*", "db-?"]      # globs: * any run of characters, ? one
//! ```
//!
//! Rules only grant. A request is allowed when the client's uid is the
//! holder's own, or when some rule names the client (by its uid, by its
//! gid as SO_PEERCRED reports it, or as anyone), the operation and a
//! pattern that matches the name. Everything else is denied.
//!
//! The matcher is a small one of our own: names are restricted to
//! letters, digits and `. _ - / @ + =`, so `*` and `?` are all a pattern
//! needs (no classes, no escapes), and a dependency would add nothing.

use std::path::Path;

use anyhow::{bail, Context, Result};
use handover::holder::protocol::{name_char, MAX_NAME_LEN};
use serde::Deserialize;

/// An operation a rule can grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Store,
    Retrieve,
    Remove,
    List,
    Wait,
}

impl Op {
    const ALL: [Op; 5] = [Op::Store, Op::Retrieve, Op::Remove, Op::List, Op::Wait];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Store => "store",
            Op::Retrieve => "retrieve",
            Op::Remove => "remove",
            Op::List => "list",
            Op::Wait => "wait",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Subject {
    Uid(u32),
    Gid(u32),
    Anyone,
}

#[derive(Clone, Debug)]
struct Rule {
    subject: Subject,
    ops: u8,
    names: Vec<String>,
}

/// The rules in force.
#[derive(Clone, Debug)]
pub struct Rules {
    own_uid: u32,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    allow: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    uid: Option<toml::Value>,
    gid: Option<toml::Value>,
    ops: Vec<String>,
    names: Vec<String>,
}

impl Rules {
    /// Only the holder's own uid may do anything: the default.
    pub fn owner_only(own_uid: u32) -> Rules {
        Rules {
            own_uid,
            rules: Vec::new(),
        }
    }

    /// Reads and checks a rules file; any mistake is an error that names
    /// the file and the place.
    pub fn load(path: &Path, own_uid: u32) -> Result<Rules> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the rules file {}", path.display()))?;
        Rules::parse(&text, own_uid).with_context(|| format!("rules file {}", path.display()))
    }

    pub fn parse(text: &str, own_uid: u32) -> Result<Rules> {
        let raw: RawFile =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        let mut rules = Vec::new();
        for (i, r) in raw.allow.into_iter().enumerate() {
            let rule = check(r).with_context(|| format!("[[allow]] number {}", i + 1))?;
            rules.push(rule);
        }
        Ok(Rules { own_uid, rules })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether a client with this uid and gid may do `op` on `name`.
    pub fn allows(&self, uid: u32, gid: u32, op: Op, name: &str) -> bool {
        uid == self.own_uid
            || self.rules.iter().any(|r| {
                let who = match r.subject {
                    Subject::Uid(u) => u == uid,
                    Subject::Gid(g) => g == gid,
                    Subject::Anyone => true,
                };
                who && r.ops & op.bit() != 0 && r.names.iter().any(|p| glob(p, name))
            })
    }

    /// Whether a client with this uid and gid may `op` anything at all
    /// (list shows only the names it matches).
    pub fn allows_any(&self, uid: u32, gid: u32, op: Op) -> bool {
        uid == self.own_uid
            || self.rules.iter().any(|r| {
                r.ops & op.bit() != 0
                    && match r.subject {
                        Subject::Uid(u) => u == uid,
                        Subject::Gid(g) => g == gid,
                        Subject::Anyone => true,
                    }
            })
    }
}

fn check(r: RawRule) -> Result<Rule> {
    let id = |what: &str, id: toml::Value| -> Result<Subject> {
        match id {
            toml::Value::Integer(n) => match u32::try_from(n) {
                Ok(n) if what == "uid" => Ok(Subject::Uid(n)),
                Ok(n) => Ok(Subject::Gid(n)),
                Err(_) => bail!("{what} = {n}: a {what} is a number from 0 to {}", u32::MAX),
            },
            toml::Value::String(t) if t == "*" => Ok(Subject::Anyone),
            other => bail!("{what} = {other}: a {what} is a number, or \"*\" for anyone"),
        }
    };
    let subject = match (r.uid, r.gid) {
        (Some(u), None) => id("uid", u)?,
        (None, Some(g)) => id("gid", g)?,
        (None, None) => bail!("a rule needs uid = N, gid = N or uid = \"*\""),
        (Some(_), Some(_)) => bail!("a rule has either uid or gid, not both (write two rules)"),
    };
    if r.ops.is_empty() {
        bail!("ops is empty: give some of store, retrieve, remove, list, wait, or \"*\"");
    }
    let mut ops = 0u8;
    for op in &r.ops {
        if op == "*" {
            ops |= Op::ALL.iter().map(|o| o.bit()).fold(0, |a, b| a | b);
            continue;
        }
        let Some(o) = Op::ALL.iter().find(|o| o.as_str() == op) else {
            bail!(
                "unknown operation {op:?} in ops (store, retrieve, remove, list, wait, or \"*\")"
            );
        };
        ops |= o.bit();
    }
    if r.names.is_empty() {
        bail!("names is empty: give name patterns, such as [\"*\"] or [\"web/*\"]");
    }
    for p in &r.names {
        if p.is_empty() || p.len() > MAX_NAME_LEN {
            bail!("name pattern {p:?} must be 1 to {MAX_NAME_LEN} bytes");
        }
        if let Some(c) = p.chars().find(|&c| !(name_char(c) || c == '*' || c == '?')) {
            bail!(
                "name pattern {p:?} contains {c:?}, which no name can contain \
                 (names: letters, digits, . _ - / @ + =; wildcards: * and ?)"
            );
        }
    }
    Ok(Rule {
        subject,
        ops,
        names: r.names,
    })
}

/// Whether `name` matches `pattern`, where `*` matches any run of
/// characters (`/` included) and `?` exactly one. Linear in practice:
/// the usual greedy matcher that backtracks only to the last `*`.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, n, m) in [
            ("*", "anything/at/all", true),
            ("web/*", "web/http", true),
            ("web/*", "web/", true),
            ("web/*", "web", false),
            ("web/*", "api/http", false),
            ("db-?", "db-1", true),
            ("db-?", "db-12", false),
            ("a*b*c", "a-b-b-c", true),
            ("a*b*c", "a-b-b-d", false),
            ("*.sock", "x.sock", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("**", "", true),
            ("?", "", false),
        ] {
            assert_eq!(glob(p, n), m, "{p} vs {n}");
        }
    }

    #[test]
    fn rules_grant_and_default_deny() {
        let r = Rules::parse(
            r#"
            [[allow]]
            uid = 65534
            ops = ["retrieve", "wait"]
            names = ["web/*"]

            [[allow]]
            gid = 100
            ops = ["list"]
            names = ["*"]

            [[allow]]
            uid = "*"
            ops = ["*"]
            names = ["public/?"]
            "#,
            0,
        )
        .unwrap();
        assert_eq!(r.len(), 3);
        assert!(r.allows(0, 0, Op::Store, "anything"));
        assert!(r.allows(65534, 65534, Op::Retrieve, "web/http"));
        assert!(!r.allows(65534, 65534, Op::Store, "web/http"));
        assert!(!r.allows(65534, 65534, Op::Retrieve, "db"));
        assert!(r.allows(5, 100, Op::List, "db"));
        assert!(!r.allows(5, 101, Op::List, "db"));
        assert!(r.allows(7, 7, Op::Remove, "public/x"));
        assert!(!r.allows(7, 7, Op::Remove, "public/xy"));
        assert!(r.allows_any(5, 100, Op::List));
        let no_list = Rules::parse(
            "[[allow]]\nuid = 5\nops = [\"store\"]\nnames = [\"*\"]\n",
            0,
        )
        .unwrap();
        assert!(!no_list.allows_any(5, 5, Op::List));
        assert!(no_list.allows_any(5, 5, Op::Store));
        let owner = Rules::owner_only(1000);
        assert!(owner.allows(1000, 1, Op::Remove, "x"));
        assert!(!owner.allows(0, 0, Op::Retrieve, "x"));
    }

    #[test]
    fn mistakes_are_refused_clearly() {
        for (text, says) in [
            (
                "[[allow]]\nuid = 1\nops = [\"store\"]\nnames = [\"*\"]\ncolour = 1\n",
                "unknown field",
            ),
            (
                "[[allow]]\nops = [\"store\"]\nnames = [\"*\"]\n",
                "needs uid",
            ),
            (
                "[[allow]]\nuid = 1\ngid = 1\nops = [\"store\"]\nnames = [\"*\"]\n",
                "not both",
            ),
            (
                "[[allow]]\nuid = \"root\"\nops = [\"store\"]\nnames = [\"*\"]\n",
                "is a number",
            ),
            (
                "[[allow]]\nuid = 1\nops = [\"steal\"]\nnames = [\"*\"]\n",
                "unknown operation",
            ),
            (
                "[[allow]]\nuid = 1\nops = []\nnames = [\"*\"]\n",
                "ops is empty",
            ),
            (
                "[[allow]]\nuid = 1\nops = [\"store\"]\nnames = []\n",
                "names is empty",
            ),
            (
                "[[allow]]\nuid = 1\nops = [\"store\"]\nnames = [\"a:b\"]\n",
                "contains ':'",
            ),
            ("[[allow]]\nuid = 1\nops = [\"store\"]\n", "missing field"),
            ("[[allow]\n", "line 1"),
            ("[[deny]]\nuid = 1\n", "unknown field"),
            (
                "[[allow]]\nuid = -1\nops = [\"store\"]\nnames = [\"*\"]\n",
                "allow",
            ),
        ] {
            let e = format!("{:#}", Rules::parse(text, 0).unwrap_err());
            assert!(e.contains(says), "{text:?}: {e}");
        }
        assert_eq!(Rules::parse("", 0).unwrap().len(), 0);
    }
}
