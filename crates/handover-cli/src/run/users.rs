//! Looking up users and groups by name or number (getpwnam_r, getgrnam_r,
//! getgrouplist: rustix has no user database calls).

use std::ffi::{CStr, CString};

use anyhow::{bail, Context, Result};

/// Who the program runs as.
#[derive(Clone, Debug)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub name: Option<String>,
    pub home: Option<String>,
}

struct Passwd {
    uid: u32,
    gid: u32,
    name: String,
    home: String,
}

fn passwd(user: &str) -> Result<Option<Passwd>> {
    let c = CString::new(user).context("user name contains NUL")?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain data; getpwnam_r/getpwuid_r fill it with
    // pointers into `buf`, which lives until we have copied what we need.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = match user.parse::<u32>() {
            Ok(uid) => libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out),
            Err(_) => libc::getpwnam_r(
                c.as_ptr(),
                &mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut out,
            ),
        };
        if rc != 0 {
            bail!(
                "looking up user {user:?}: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        if out.is_null() {
            return Ok(None);
        }
        Ok(Some(Passwd {
            uid: pw.pw_uid,
            gid: pw.pw_gid,
            name: CStr::from_ptr(pw.pw_name).to_string_lossy().into_owned(),
            home: CStr::from_ptr(pw.pw_dir).to_string_lossy().into_owned(),
        }))
    }
}

/// A group by name or number.
pub fn group(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let c = CString::new(group).context("group name contains NUL")?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: as in `passwd`, with struct group.
    unsafe {
        let mut gr: libc::group = std::mem::zeroed();
        let mut out: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            c.as_ptr(),
            &mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        );
        if rc != 0 {
            bail!(
                "looking up group {group:?}: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        if out.is_null() {
            bail!("no such group: {group:?}");
        }
        Ok(gr.gr_gid)
    }
}

fn group_list(name: &str, gid: u32) -> Vec<u32> {
    let Ok(c) = CString::new(name) else {
        return vec![gid];
    };
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        // SAFETY: getgrouplist writes at most `n` entries into `groups`
        // and updates `n`.
        let rc = unsafe { libc::getgrouplist(c.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n as usize);
            return groups;
        }
        if n > 65_536 {
            return vec![gid];
        }
        n *= 2;
    }
}

/// Resolves `--user` and `--group` the way a service manager does: the
/// user's primary group and supplementary groups unless a group is given.
pub fn resolve(user: Option<&str>, group_arg: Option<&str>) -> Result<Option<Identity>> {
    let gid_override = group_arg.map(group).transpose()?;
    match user {
        Some(user) => {
            let Some(pw) = passwd(user)? else {
                bail!("no such user: {user:?}");
            };
            let gid = gid_override.unwrap_or(pw.gid);
            let groups = match gid_override {
                Some(g) => vec![g],
                None => group_list(&pw.name, pw.gid),
            };
            Ok(Some(Identity {
                uid: pw.uid,
                gid,
                groups,
                name: Some(pw.name),
                home: Some(pw.home),
            }))
        }
        None => Ok(gid_override.map(|gid| Identity {
            // SAFETY: getuid cannot fail.
            uid: unsafe { libc::getuid() },
            gid,
            groups: vec![gid],
            name: None,
            home: None,
        })),
    }
}
