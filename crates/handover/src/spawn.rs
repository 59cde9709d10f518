//! Starting a child with exactly the handles chosen for it.
//!
//! [`Command`] is a small `std::process::Command` for one job: the child gets
//! the handles listed, at the numbers listed, and nothing else that the
//! parent has open. Handles added with [`Command::activation`] follow the
//! systemd socket-activation protocol: descriptors 3, 4, … with LISTEN_FDS,
//! LISTEN_FDNAMES, LISTEN_PID set to the child's own pid (written by the
//! child itself after clone, without allocating) and LISTEN_PIDFDID where
//! the kernel gives pidfds an identity.
//!
//! On Windows the child inherits exactly the handles listed (its standard
//! handles and those given to `windows::CommandExt::inherit`) through
//! PROC_THREAD_ATTRIBUTE_HANDLE_LIST, and activation handles are fetched
//! by the child over a channel instead (see `bootstrap.rs`).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::sys;

/// The variables of the activation protocol. A child never inherits ours.
pub(crate) const ACTIVATION_VARS: [&str; 5] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
    "HANDOVER_ACTIVATION_PIPE",
];

/// Whether two environment variable names are the same: exactly on Unix,
/// regardless of ASCII case on Windows.
fn same_var(a: &OsStr, b: &OsStr) -> bool {
    if cfg!(windows) {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// What a child is started with.
#[derive(Debug)]
pub struct Command {
    program: OsString,
    path: Option<PathBuf>,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    env_clear: bool,
    cwd: Option<PathBuf>,
    activation: Vec<Handle>,
    #[cfg(unix)]
    pub(crate) unix: UnixOptions,
    #[cfg(windows)]
    pub(crate) windows: WindowsOptions,
}

/// The Windows-only choices, set through [`crate::windows::CommandExt`].
#[cfg(windows)]
#[derive(Debug, Default)]
pub(crate) struct WindowsOptions {
    /// stdin, stdout and stderr; `None` gives the child a copy of ours.
    pub stdio: [Option<Handle>; 3],
    pub inherit: Vec<Handle>,
    pub creation_flags: u32,
    pub systemfd: bool,
    pub end_with_parent: bool,
}

/// The Unix-only choices, set through [`crate::unix::CommandExt`].
#[cfg(unix)]
#[derive(Debug, Default)]
pub(crate) struct UnixOptions {
    pub placed: Vec<(i32, Handle)>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub groups: Option<Vec<u32>>,
    pub setsid: bool,
    pub process_group: bool,
    pub parent_death_signal: Option<i32>,
}

impl Command {
    /// A command for `program`, found on PATH unless it contains a slash.
    pub fn new(program: impl AsRef<OsStr>) -> Command {
        Command {
            program: program.as_ref().to_owned(),
            path: None,
            args: Vec::new(),
            env: Vec::new(),
            env_clear: false,
            cwd: None,
            activation: Vec::new(),
            #[cfg(unix)]
            unix: UnixOptions::default(),
            #[cfg(windows)]
            windows: WindowsOptions::default(),
        }
    }

    /// The child's standard input. The command keeps the handle until it
    /// is dropped: drop it after spawning, or the child will never see end
    /// of input on a pipe whose writing end the command still holds.
    pub fn stdin(&mut self, handle: Handle) -> &mut Command {
        self.stdio(0, handle)
    }

    /// The child's standard output (see [`Command::stdin`]).
    pub fn stdout(&mut self, handle: Handle) -> &mut Command {
        self.stdio(1, handle)
    }

    /// The child's standard error (see [`Command::stdin`]).
    pub fn stderr(&mut self, handle: Handle) -> &mut Command {
        self.stdio(2, handle)
    }

    #[cfg(unix)]
    fn stdio(&mut self, n: usize, handle: Handle) -> &mut Command {
        crate::unix::CommandExt::fd(self, n as i32, handle)
    }

    #[cfg(windows)]
    fn stdio(&mut self, n: usize, handle: Handle) -> &mut Command {
        self.windows.stdio[n] = Some(handle);
        self
    }

    /// Adds an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Command {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&mut self, args: I) -> &mut Command {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the child.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Command {
        self.env
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes an environment variable for the child.
    pub fn env_remove(&mut self, key: impl AsRef<OsStr>) -> &mut Command {
        self.env.push((key.as_ref().to_owned(), None));
        self
    }

    /// Starts the child with no inherited environment.
    pub fn env_clear(&mut self) -> &mut Command {
        self.env_clear = true;
        self.env.clear();
        self
    }

    /// The child's working directory.
    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Command {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// Passes a handle by the activation protocol, after those added
    /// before it. Its name (see [`Handle::with_name`]) goes into
    /// LISTEN_FDNAMES; unnamed handles are listed as `unknown`, as systemd
    /// does. The command keeps the handle, so it can start the program
    /// again (a restart) with the same sockets.
    pub fn activation(&mut self, handle: Handle) -> Result<&mut Command> {
        if let Some(name) = handle.name() {
            check_fdname(name)?;
        }
        self.activation.push(handle);
        Ok(self)
    }

    /// The handles passed by the activation protocol, in order.
    pub fn activation_handles(&self) -> &[Handle] {
        &self.activation
    }

    /// Runs the program found at `path` (for example where
    /// [`Command::resolved_program`] found it earlier) without looking for
    /// it again at every spawn; the program as given stays the child's
    /// `argv[0]`. If `path` cannot be executed, spawning fails at execve.
    pub fn program_path(&mut self, path: impl AsRef<Path>) -> &mut Command {
        self.path = Some(path.as_ref().to_owned());
        self
    }

    /// The program as given.
    pub fn program(&self) -> &OsStr {
        &self.program
    }

    /// Starts the child.
    pub fn spawn(&self) -> Result<Child> {
        let path = self.resolve_program()?;
        let mut argv = Vec::with_capacity(self.args.len() + 1);
        argv.push(self.program.clone());
        argv.extend(self.args.iter().cloned());
        #[cfg(unix)]
        {
            let inner = sys::spawn_child(self, &path, &argv, self.child_env(Vec::new()))?;
            Ok(Child {
                inner,
                status: None,
            })
        }
        #[cfg(windows)]
        {
            if self.activation.is_empty() {
                let inner = sys::spawn_child(self, &path, &argv, self.child_env(Vec::new()))?;
                return Ok(Child {
                    inner,
                    status: None,
                    bootstrap: None,
                });
            }
            let server = crate::bootstrap::Prepared::new(self.windows.systemfd)?;
            let env = self.child_env(server.env()?);
            let inner = sys::spawn_child(self, &path, &argv, env)?;
            let mut child = Child {
                inner,
                status: None,
                bootstrap: None,
            };
            let serving = child
                .inner
                .exit_watch()
                .map_err(Error::io("DuplicateHandle"))
                .and_then(|watch| server.serve(child.id(), watch, &self.activation));
            match serving {
                Ok(s) => child.bootstrap = Some(s),
                Err(e) => {
                    // Without its handles the child cannot start properly.
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            }
            Ok(child)
        }
    }

    /// Replaces this process with the program (execve), the handles placed
    /// and the environment set as [`Command::spawn`] does for a child;
    /// LISTEN_PID is this process's own pid, which execve keeps. Every other
    /// descriptor of this process is marked close-on-exec, so the program
    /// gets exactly the handles chosen (and the standard ones not replaced).
    ///
    /// Returns only if that failed. The descriptors may have been moved by
    /// then, so the command's handles are left open rather than closed by
    /// number; the caller should report the error and exit.
    #[cfg(unix)]
    pub fn exec(self) -> Error {
        let path = match self.resolve_program() {
            Ok(path) => path,
            Err(e) => return e,
        };
        let mut argv = Vec::with_capacity(self.args.len() + 1);
        argv.push(self.program.clone());
        argv.extend(self.args.iter().cloned());
        let e = sys::exec_in_place(&self, &path, &argv, self.child_env(Vec::new()));
        std::mem::forget(self);
        e
    }

    /// The child's environment: ours (or none) with the command's changes,
    /// the activation variables and `extra` (the Windows bootstrap's).
    fn child_env(&self, extra: Vec<(OsString, OsString)>) -> Vec<OsString> {
        let mut vars: Vec<(OsString, OsString)> = if self.env_clear {
            Vec::new()
        } else {
            std::env::vars_os()
                .filter(|(k, _)| !ACTIVATION_VARS.iter().any(|v| same_var(k, v.as_ref())))
                .collect()
        };
        for (key, value) in &self.env {
            vars.retain(|(k, _)| !same_var(k, key));
            if let Some(value) = value {
                vars.push((key.clone(), value.clone()));
            }
        }
        if !self.activation.is_empty() {
            vars.retain(|(k, _)| !ACTIVATION_VARS.iter().any(|v| same_var(k, v.as_ref())));
            let names: Vec<&str> = self
                .activation
                .iter()
                .map(|h| h.name().unwrap_or("unknown"))
                .collect();
            vars.push((
                "LISTEN_FDS".into(),
                self.activation.len().to_string().into(),
            ));
            vars.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
        }
        for (key, value) in extra {
            vars.retain(|(k, _)| !same_var(k, &key));
            vars.push((key, value));
        }
        vars.into_iter()
            .map(|(k, v)| {
                // Room for the NUL too: the buffer becomes the C string.
                let mut kv = OsString::with_capacity(k.len() + v.len() + 2);
                kv.push(k);
                kv.push("=");
                kv.push(v);
                kv
            })
            .collect()
    }

    /// Where the program will be found, or [`Error::ProgramNotFound`]:
    /// lets a caller report a missing program before doing anything else.
    pub fn resolved_program(&self) -> Result<PathBuf> {
        self.resolve_program()
    }

    fn resolve_program(&self) -> Result<PathBuf> {
        if let Some(path) = &self.path {
            return Ok(path.clone());
        }
        let program = Path::new(&self.program);
        let not_found = || Error::ProgramNotFound {
            program: self.program.to_string_lossy().into_owned(),
        };
        if self.program.is_empty() {
            return Err(not_found());
        }
        let separators: &[u8] = if cfg!(windows) { b"/\\:" } else { b"/" };
        let runnable = |p: &Path| candidates(p).into_iter().find(|c| sys::is_executable(c));
        if self
            .program
            .as_encoded_bytes()
            .iter()
            .any(|b| separators.contains(b))
        {
            return runnable(program).ok_or_else(not_found);
        }
        let path_var = self
            .env
            .iter()
            .rev()
            .find(|(k, _)| same_var(k, "PATH".as_ref()))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| std::env::var_os("PATH"));
        let path_var = path_var.unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path_var)
            .find_map(|dir| runnable(&dir.join(program)))
            .ok_or_else(not_found)
    }

    #[cfg(unix)]
    pub(crate) fn activation_fds(&self) -> impl Iterator<Item = (&Handle, i32)> {
        self.activation.iter().zip(3..)
    }

    pub(crate) fn cwd(&self) -> Option<&Path> {
        self.cwd.as_deref()
    }
}

/// The files a program name may refer to: itself, and on Windows also
/// with `.exe` when it has no extension.
fn candidates(path: &Path) -> Vec<PathBuf> {
    #[cfg(windows)]
    {
        sys::program_candidates(path)
    }
    #[cfg(not(windows))]
    {
        vec![path.to_owned()]
    }
}

/// A systemd file-descriptor name: 1 to 255 printable ASCII characters
/// other than `:`.
pub(crate) fn check_fdname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b':');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            name: name.to_owned(),
            why: "an activation name is 1 to 255 printable ASCII characters other than ':'",
        })
    }
}

/// A started child process.
#[derive(Debug)]
pub struct Child {
    pub(crate) inner: sys::Spawned,
    status: Option<ExitStatus>,
    /// Serves the child its activation handles (Windows), until it has
    /// them or exits.
    #[cfg(windows)]
    bootstrap: Option<crate::bootstrap::Serving>,
}

impl Child {
    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.inner.pid
    }

    /// Waits for the child to exit.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let status = sys::wait_child(&self.inner, true)
            .map_err(Error::io("waitpid"))?
            .ok_or_else(|| Error::Io {
                op: "waitpid",
                source: std::io::Error::other("a blocking wait returned no status"),
            })?;
        self.status = Some(status);
        Ok(status)
    }

    /// The exit status if the child has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = sys::wait_child(&self.inner, false).map_err(Error::io("waitpid"))?;
        }
        Ok(self.status)
    }

    /// Forcibly ends the child (SIGKILL on Unix).
    pub fn kill(&mut self) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        sys::kill_child(&self.inner).map_err(Error::io("kill"))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::unix::CommandExt;
    use std::io::Read;

    #[test]
    fn program_path_runs_that_file_and_keeps_the_name_as_given() {
        let cmd = || {
            let mut c = Command::new("no-such-program-handover");
            c.arg("/proc/self/cmdline");
            c
        };
        assert!(matches!(
            cmd().spawn().unwrap_err(),
            Error::ProgramNotFound { .. }
        ));
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let mut c = cmd();
        c.program_path("/bin/cat").fd(1, Handle::from(w));
        assert_eq!(
            c.resolved_program().unwrap(),
            Path::new("/bin/cat").to_owned()
        );
        let mut child = c.spawn().unwrap();
        drop(c);
        let mut out = Vec::new();
        std::fs::File::from(r).read_to_end(&mut out).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(out, b"no-such-program-handover\0/proc/self/cmdline\0");
    }
}
