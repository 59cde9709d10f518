//! `--routes FILE`: named pools of workers, and which connections go to
//! each, by TLS SNI or HTTP/1 Host, peeked without consuming a byte.
//!
//! ```toml
//! peek_timeout = "500ms"   # then the default pool
//! peek_limit = 16384       # bytes; more without a verdict: the default pool
//!
//! [[pool]]
//! name = "api"
//! workers = 2
//! command = ["/usr/local/bin/api-server", "--port-from-handover"]  # default: the main PROGRAM
//!
//! [[route]]
//! sni = "api.example.com"   # or host = "api.example.com"; "*.example.com" matches subdomains
//! pool = "api"
//! ```

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use handover::dispatch::peek::{self, Peek};
use serde::Deserialize;

/// The most a peek may be given: a ClientHello with many extensions, or a
/// request head with large cookies, fits.
const MAX_PEEK_LIMIT: usize = handover::dispatch::protocol::MAX_PEEKED;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    peek_timeout: Option<String>,
    peek_limit: Option<usize>,
    #[serde(default)]
    pool: Vec<PoolFile>,
    #[serde(default)]
    route: Vec<RouteFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    name: String,
    workers: usize,
    command: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    sni: Option<String>,
    host: Option<String>,
    pool: String,
}

/// A pool named in the routes file.
pub struct PoolSpec {
    pub name: String,
    pub workers: usize,
    /// Its own program, or None for the main PROGRAM.
    pub command: Option<Vec<OsString>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum By {
    Sni,
    Host,
}

struct Route {
    by: By,
    pattern: String,
    /// Index into the pools: 0 is the default pool, then the file's.
    pool: usize,
}

/// The routing table. Without a file: no routes, nothing is peeked.
pub struct Routes {
    routes: Vec<Route>,
    pub pools: Vec<PoolSpec>,
    pub peek_timeout: Duration,
    pub peek_limit: usize,
}

/// Where a connection goes once its first bytes are seen.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// To this pool (0 is the default one).
    Pool(usize),
    /// More bytes are needed.
    Wait,
}

impl Routes {
    pub fn none() -> Routes {
        Routes {
            routes: Vec::new(),
            pools: Vec::new(),
            peek_timeout: Duration::from_millis(500),
            peek_limit: 16 * 1024,
        }
    }

    pub fn load(path: &Path) -> Result<Routes> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the routes file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("routes file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Routes> {
        let file: File = toml::from_str(text)?;
        let mut out = Routes::none();
        if let Some(t) = &file.peek_timeout {
            out.peek_timeout = crate::run::duration(t).context("peek_timeout")?;
            if out.peek_timeout.is_zero() {
                bail!("peek_timeout must be more than 0");
            }
        }
        if let Some(limit) = file.peek_limit {
            if !(1..=MAX_PEEK_LIMIT).contains(&limit) {
                bail!("peek_limit must be 1 to {MAX_PEEK_LIMIT} bytes, not {limit}");
            }
            out.peek_limit = limit;
        }
        for p in file.pool {
            if p.name == "default" {
                bail!("pool name \"default\" is the main PROGRAM's pool; choose another");
            }
            if out.pools.iter().any(|q| q.name == p.name) {
                bail!("pool {:?} is defined twice", p.name);
            }
            handover::activation::check_name(&p.name)
                .with_context(|| format!("pool name {:?}", p.name))?;
            if !(1..=1024).contains(&p.workers) {
                bail!("pool {:?}: workers must be 1 to 1024", p.name);
            }
            if p.command.as_ref().is_some_and(Vec::is_empty) {
                bail!("pool {:?}: command is empty", p.name);
            }
            out.pools.push(PoolSpec {
                name: p.name,
                workers: p.workers,
                command: p
                    .command
                    .map(|c| c.into_iter().map(OsString::from).collect()),
            });
        }
        for (i, r) in file.route.into_iter().enumerate() {
            let (by, pattern) = match (r.sni, r.host) {
                (Some(s), None) => (By::Sni, s),
                (None, Some(h)) => (By::Host, h),
                _ => bail!("route {}: give exactly one of sni or host", i + 1),
            };
            let mut pattern = pattern.trim().trim_end_matches('.').to_ascii_lowercase();
            // Hosts that are IPv6 literals are compared in their short
            // form, without brackets, as the peek gives them.
            let bare = pattern.trim_start_matches('[').trim_end_matches(']');
            if let Ok(v6) = bare.parse::<std::net::Ipv6Addr>() {
                pattern = v6.to_string();
            }
            if pattern.is_empty() {
                bail!("route {}: empty name", i + 1);
            }
            let pool = match r.pool.as_str() {
                "default" => 0,
                name => {
                    1 + out
                        .pools
                        .iter()
                        .position(|p| p.name == name)
                        .with_context(|| format!("route {}: no pool named {name:?}", i + 1))?
                }
            };
            out.routes.push(Route { by, pattern, pool });
        }
        Ok(out)
    }

    /// Whether connections must be peeked at all.
    pub fn peeks(&self) -> bool {
        !self.routes.is_empty()
    }

    /// Where a connection goes, given the bytes peeked so far; `full` when
    /// no more will come (the limit is reached, the peer closed, or time
    /// is up): an undecided connection then goes to the default pool.
    pub fn decide(&self, bytes: &[u8], full: bool) -> Verdict {
        let (by, found) = if peek::looks_like_tls(bytes) {
            (By::Sni, peek::tls_sni(bytes))
        } else {
            (By::Host, peek::http_host(bytes))
        };
        match found {
            Peek::Name(name) => Verdict::Pool(self.pool_for(by, &name)),
            Peek::NeedMore if !full && bytes.len() < self.peek_limit => Verdict::Wait,
            _ => Verdict::Pool(0),
        }
    }

    fn pool_for(&self, by: By, name: &str) -> usize {
        self.routes
            .iter()
            .find(|r| r.by == by && peek::name_matches(&r.pattern, name))
            .map_or(0, |r| r.pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        peek_timeout = "200ms"
        [[pool]]
        name = "api"
        workers = 2
        [[pool]]
        name = "static"
        workers = 1
        command = ["/bin/true"]
        [[route]]
        sni = "api.example.com"
        pool = "api"
        [[route]]
        host = "*.static.test"
        pool = "static"
    "#;

    #[test]
    fn host_routes_and_fallbacks() {
        let r = Routes::parse(FILE).unwrap();
        assert_eq!(r.peek_timeout, Duration::from_millis(200));
        assert_eq!(r.pools.len(), 2);
        let head = b"GET / HTTP/1.1\r\nHost: img.static.test:8080\r\n\r\n";
        assert_eq!(r.decide(head, false), Verdict::Pool(2));
        assert_eq!(r.decide(&head[..20], false), Verdict::Wait);
        assert_eq!(r.decide(&head[..20], true), Verdict::Pool(0));
        let v6 = b"GET / HTTP/1.1\r\nHost: [0:0::01]:80\r\n\r\n";
        let r6 = Routes::parse("[[route]]\nhost = \"[::0:1]\"\npool = \"default\"").unwrap();
        assert_eq!(r6.routes[0].pattern, "::1");
        assert_eq!(r6.decide(v6, false), Verdict::Pool(0));
        let other = b"GET / HTTP/1.1\r\nHost: elsewhere\r\n\r\n";
        assert_eq!(r.decide(other, false), Verdict::Pool(0));
        assert_eq!(r.decide(b"\x00\x01garbage", false), Verdict::Pool(0));
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        for (text, says) in [
            ("[[route]]\nsni = \"a\"\npool = \"nope\"", "no pool named"),
            (
                "[[route]]\npool = \"default\"",
                "exactly one of sni or host",
            ),
            ("[[pool]]\nname = \"default\"\nworkers = 1", "main PROGRAM"),
            ("[[pool]]\nname = \"a\"\nworkers = 0", "workers must be"),
            ("peek_limit = 0", "peek_limit"),
            ("bogus = 1", "unknown field"),
        ] {
            let e = format!("{:#}", Routes::parse(text).err().expect(text));
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
