//! Starting a handler program without fork(2), and without giving up "it dies with inboxd".
//!
//! std (and tokio) start a child with posix_spawn, unless the command has a `pre_exec` hook;
//! then they fork(2) the whole process. inboxd needs such a hook: `PR_SET_PDEATHSIG`, so that
//! a handler is killed when inboxd is (SIGKILL included) instead of running on orphaned. But
//! fork copies the page tables of a process holding a runtime, a store and buffers: measured
//! at 1.6 ms per message in the latency benchmark, most of inboxd's own part of an `exec`
//! delivery. No crate starts a program with a death signal without forking, so this does what
//! glibc's posix_spawn does: `clone(CLONE_VM | CLONE_VFORK)` onto a stack of its own, where the
//! child makes only system calls (reset signal handlers and mask, prctl, setpgid, dup2, chdir,
//! execve) on memory prepared before the clone, while the calling thread waits for the child
//! to exec or fail. The exit is awaited on a pidfd (`CLONE_PIDFD`), so no SIGCHLD handler or
//! reaper is involved.
//!
//! Elsewhere (other systems, a kernel or sandbox that refuses the clone) the program is started
//! by tokio with the hook, as before: slower, same guarantees.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::ExitStatus;

use tokio::net::unix::pipe;

/// What the program reads on stdin.
pub(crate) enum Stdin {
    /// A pipe: [`Child::stdin`].
    Piped,
    /// This file, read by the program directly.
    File(File),
}

/// A program to start: argv, the complete environment, working directory, stdin. Its stdout
/// and stderr are pipes ([`Child::stdout`], [`Child::stderr`]); it runs in a process group of
/// its own (its pid) and is killed (SIGKILL) when inboxd dies.
pub(crate) struct Spec<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    pub env: Vec<(OsString, OsString)>,
    pub cwd: &'a Path,
    pub stdin: Stdin,
}

/// A started program. Dropped before it was waited for, it is killed and reaped.
pub(crate) struct Child {
    pid: u32,
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    waiter: Waiter,
}

enum Waiter {
    #[cfg(target_os = "linux")]
    Pidfd(Option<tokio::io::unix::AsyncFd<OwnedFd>>),
    Tokio(tokio::process::Child),
    Done,
}

impl Child {
    /// The program's pid, which is also its process group's id.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Waits until the program exited.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        match &mut self.waiter {
            #[cfg(target_os = "linux")]
            Waiter::Pidfd(fd) => {
                let status = match fd {
                    Some(fd) => linux::wait(self.pid, fd).await?,
                    None => return Err(io::Error::other("the program was already waited for")),
                };
                self.waiter = Waiter::Done;
                Ok(status)
            }
            Waiter::Tokio(child) => child.wait().await,
            Waiter::Done => Err(io::Error::other("the program was already waited for")),
        }
    }

    /// SIGKILL to the program (not yet reaped, so the pid is still ours), then waits for it.
    pub async fn kill(&mut self) -> io::Result<ExitStatus> {
        match &mut self.waiter {
            #[cfg(target_os = "linux")]
            Waiter::Pidfd(_) => {
                signal(self.pid, libc::SIGKILL);
                self.wait().await
            }
            Waiter::Tokio(child) => {
                child.start_kill()?;
                child.wait().await
            }
            Waiter::Done => Err(io::Error::other("the program was already waited for")),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Waiter::Pidfd(fd) = &mut self.waiter
            && let Some(fd) = fd.take()
        {
            signal(self.pid, libc::SIGKILL);
            linux::reap_later(self.pid, fd);
        }
        // A tokio child is killed on drop (`kill_on_drop`) and reaped by tokio.
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) on a child of ours that has not been reaped, so the pid is not reused.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Starts `spec`.
pub(crate) fn spawn(mut spec: Spec<'_>) -> io::Result<Child> {
    let (out_r, out_w) = io::pipe()?;
    let (err_r, err_w) = io::pipe()?;
    let (stdin_child, stdin_ours): (OwnedFd, Option<OwnedFd>) = match std::mem::replace(&mut spec.stdin, Stdin::Piped) {
        Stdin::Piped => {
            let (r, w) = io::pipe()?;
            (r.into(), Some(w.into()))
        }
        Stdin::File(f) => (f.into(), None),
    };
    let fds = [stdin_child, OwnedFd::from(out_w), OwnedFd::from(err_w)];
    #[cfg(target_os = "linux")]
    let started = linux::spawn(&spec, &fds)?;
    #[cfg(not(target_os = "linux"))]
    let started = None;
    let (pid, waiter) = match started {
        #[cfg(target_os = "linux")]
        Some((pid, pidfd)) => (pid, Waiter::Pidfd(Some(linux::watch(pid, pidfd)?))),
        _ => with_tokio(&spec, fds)?,
    };
    Ok(Child {
        pid,
        stdin: stdin_ours.map(pipe::Sender::from_owned_fd).transpose()?,
        stdout: Some(pipe::Receiver::from_owned_fd(out_r.into())?),
        stderr: Some(pipe::Receiver::from_owned_fd(err_r.into())?),
        waiter,
    })
}

/// The fallback: tokio's `Command` with the death-signal hook (fork + exec).
fn with_tokio(spec: &Spec<'_>, fds: [OwnedFd; 3]) -> io::Result<(u32, Waiter)> {
    let [stdin, stdout, stderr] = fds;
    let mut cmd = tokio::process::Command::new(spec.program);
    crate::process::confine(&mut cmd, &[]);
    cmd.env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .args(spec.args)
        .current_dir(spec.cwd)
        .stdin(std::process::Stdio::from(stdin))
        .stdout(std::process::Stdio::from(stdout))
        .stderr(std::process::Stdio::from(stderr));
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("the program exited before it was seen"))?;
    Ok((pid, Waiter::Tokio(child)))
}

fn cstring(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} contains a NUL byte")))
}

/// Where `program` is looked for, in order: as given when it names a path (relative to the
/// working directory the program gets, as `inboxd check` resolves it), else in each directory
/// of the program's `PATH` (inboxd's own when the environment has none), as execvp(3) does.
fn candidates(program: &str, env: &[(OsString, OsString)]) -> io::Result<Vec<CString>> {
    use std::os::unix::ffi::OsStrExt;
    if program.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "empty program name"));
    }
    if program.contains('/') {
        return Ok(vec![cstring(program.as_bytes(), "the program name")?]);
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    let mut out = Vec::new();
    for dir in std::env::split_paths(&path) {
        let dir = if dir.as_os_str().is_empty() { ".".into() } else { dir };
        out.push(cstring(dir.join(program).as_os_str().as_bytes(), "PATH")?);
    }
    Ok(out)
}

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::atomic::{AtomicI32, Ordering};
    use tokio::io::unix::AsyncFd;

    /// The child's stack: it runs a few system calls and nothing else.
    const STACK: usize = 64 * 1024;

    /// Everything the child touches, prepared before the clone. The pointers point into
    /// vectors that outlive the child's run (the parent waits for its exec).
    struct Plan {
        candidates: Vec<*const libc::c_char>,
        argv: *const *const libc::c_char,
        envp: *const *const libc::c_char,
        cwd: *const libc::c_char,
        fds: [libc::c_int; 3],
        parent: libc::pid_t,
        /// The errno that made the child give up before exec; 0 if it exec'd.
        errno: AtomicI32,
    }

    /// Starts the program; `None` when this kernel (or a sandbox) refuses the clone, so the
    /// caller falls back to tokio.
    pub(super) fn spawn(spec: &Spec<'_>, fds: &[OwnedFd; 3]) -> io::Result<Option<(u32, OwnedFd)>> {
        let candidates = candidates(spec.program, &spec.env)?;
        let mut args = vec![cstring(spec.program.as_bytes(), "the program name")?];
        for a in spec.args {
            args.push(cstring(a.as_bytes(), "an argument")?);
        }
        let mut env = Vec::with_capacity(spec.env.len());
        for (i, (k, v)) in spec.env.iter().enumerate() {
            // A name given twice is the last value, as with std's `Command::env`.
            if spec.env[i + 1..].iter().any(|(later, _)| later == k) {
                continue;
            }
            if k.as_bytes().contains(&b'=') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "an environment variable's name contains '='",
                ));
            }
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            env.push(cstring(&kv, "the environment")?);
        }
        let cwd = cstring(spec.cwd.as_os_str().as_bytes(), "the working directory")?;
        let argv: Vec<*const libc::c_char> = args
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const libc::c_char> = env
            .iter()
            .map(|e| e.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let plan = Plan {
            candidates: candidates.iter().map(|c| c.as_ptr()).collect(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            cwd: cwd.as_ptr(),
            fds: [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()],
            // SAFETY: getpid(2) has no preconditions.
            parent: unsafe { libc::getpid() },
            errno: AtomicI32::new(0),
        };
        let mut stack = vec![0u8; STACK];
        // The stack grows down from its (16-byte aligned) top.
        let top = (stack.as_mut_ptr() as usize + STACK) & !15;
        let mut pidfd: libc::c_int = -1;
        // SAFETY: all signals are blocked around the clone so that no handler of ours runs in
        // the child (which shares our memory) before it reset them; the old mask is restored
        // right after. The child runs `child` on `stack` with `plan`, both alive until clone
        // returns: CLONE_VFORK suspends this thread until the child exec'd or exited.
        let pid = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                &plan as *const Plan as *mut libc::c_void,
                &mut pidfd as *mut libc::c_int,
            );
            let err = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                return match err.raw_os_error() {
                    Some(libc::EINVAL | libc::ENOSYS | libc::EPERM) => Ok(None),
                    _ => Err(err),
                };
            }
            pid
        };
        drop(stack);
        // SAFETY: CLONE_PIDFD stored a new descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let errno = plan.errno.load(Ordering::Acquire);
        if errno != 0 {
            // The child gave up before exec and has exited: reap it.
            let mut status = 0;
            // SAFETY: waitpid(2) on our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(Some((pid as u32, pidfd)))
    }

    /// The child gives up: records errno for the parent and exits.
    unsafe fn fail(plan: &Plan) -> ! {
        // SAFETY: errno is readable at any time; `_exit` ends only the child.
        unsafe {
            plan.errno.store(*libc::__errno_location(), Ordering::Release);
            libc::_exit(127)
        }
    }

    /// The child, between clone and exec: system calls only, on memory the parent prepared.
    extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the parent's `Plan`, alive while the parent waits for us.
        let plan = unsafe { &*(arg as *const Plan) };
        // SAFETY: each call below is a plain system call wrapper (async-signal-safe) on
        // memory prepared by the parent; on failure the child records errno and `_exit`s.
        unsafe {
            // Our signal handlers must not run in the program: caught signals go back to
            // their default, as exec would do; SIGPIPE too (Rust ignores it, a program should
            // not inherit that). The mask was all-blocked by the parent; empty it.
            for sig in 1..65 {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                    continue;
                }
                if (old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN)
                    || (sig == libc::SIGPIPE && old.sa_sigaction == libc::SIG_IGN)
                {
                    let mut dfl: libc::sigaction = std::mem::zeroed();
                    dfl.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(sig, &dfl, std::ptr::null_mut());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                fail(plan);
            }
            // inboxd died before the prctl: do not run orphaned.
            if libc::getppid() != plan.parent {
                libc::_exit(1);
            }
            if libc::setpgid(0, 0) != 0 {
                fail(plan);
            }
            // Moved above 2 first, so that no source is overwritten by an earlier dup2.
            let mut high = [0; 3];
            for (i, fd) in plan.fds.iter().enumerate() {
                high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3);
                if high[i] < 0 {
                    fail(plan);
                }
            }
            for (i, fd) in high.iter().enumerate() {
                if libc::dup2(*fd, i as libc::c_int) < 0 {
                    fail(plan);
                }
            }
            if libc::chdir(plan.cwd) != 0 {
                fail(plan);
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // execvp's rule: a directory where it is not found (or not a directory) is
            // skipped; one where it is not executable is remembered over "not found".
            let mut denied = false;
            for path in &plan.candidates {
                libc::execve(*path, plan.argv, plan.envp);
                match *libc::__errno_location() {
                    libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                    libc::EACCES => denied = true,
                    _ => fail(plan),
                }
            }
            if denied {
                *libc::__errno_location() = libc::EACCES;
            }
            fail(plan)
        }
    }

    /// The pidfd, registered with the runtime. If it cannot be (a kernel whose pidfds cannot
    /// be polled), the program is killed and reaped, and that is the error.
    pub(super) fn watch(pid: u32, pidfd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
        // SAFETY: the OwnedFd is open and owned by the AsyncFd from here on; its raw fd never
        // changes.
        match unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) } {
            Ok(fd) => Ok(fd),
            Err(e) => {
                signal(pid, libc::SIGKILL);
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    let mut status = 0;
                    // SAFETY: waitpid(2) on our own child, which was just killed.
                    unsafe { libc::waitpid(pid, &mut status, 0) };
                }
                Err(io::Error::other(format!(
                    "cannot wait for the program: {}",
                    e.into_parts().1
                )))
            }
        }
    }

    /// Waits for the pidfd to be readable (the program exited), then reaps it.
    pub(super) async fn wait(pid: u32, fd: &AsyncFd<OwnedFd>) -> io::Result<ExitStatus> {
        loop {
            let mut guard = fd.readable().await?;
            if let Some(status) = try_reap(pid)? {
                return Ok(status);
            }
            guard.clear_ready();
        }
    }

    fn try_reap(pid: u32) -> io::Result<Option<ExitStatus>> {
        let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child, without blocking.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => Ok(None),
            p if p == pid => Ok(Some(ExitStatus::from_raw(status))),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// Reaps a killed program once it is gone: on the runtime when there is one, else on a
    /// thread of its own (a dropped child must not stay a zombie).
    pub(super) fn reap_later(pid: u32, fd: AsyncFd<OwnedFd>) {
        if let Ok(Some(_)) = try_reap(pid) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = wait(pid, &fd).await;
                });
            }
            Err(_) => {
                std::thread::spawn(move || {
                    drop(fd);
                    if let Ok(pid) = libc::pid_t::try_from(pid) {
                        let mut status = 0;
                        // SAFETY: waitpid(2) on our own child.
                        unsafe { libc::waitpid(pid, &mut status, 0) };
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn run(program: &str, args: &[&str], env: &[(&str, &str)], cwd: &Path, input: &[u8]) -> (Child, String) {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut child = spawn(Spec {
            program,
            args: &args,
            env: env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
            cwd,
            stdin: Stdin::Piped,
        })
        .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).await.unwrap();
        drop(stdin);
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
        (child, out)
    }

    const PATH: (&str, &str) = ("PATH", "/usr/bin:/bin");

    /// `sleep 30`, to be killed or dropped.
    fn sleeper(dir: &Path) -> Child {
        spawn(Spec {
            program: "sleep",
            args: &["30".into()],
            env: vec![(PATH.0.into(), PATH.1.into())],
            cwd: dir,
            stdin: Stdin::Piped,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn the_program_gets_its_argv_environment_directory_and_stdin_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, out) = run(
            "sh",
            &[
                "-c",
                "echo \"$0 $1\"; env | sort; pwd; cat; exec ls -l /proc/self/fd",
                "a b",
                "c",
            ],
            &[PATH, ("ONLY", "this")],
            dir.path(),
            b"from stdin\n",
        )
        .await;
        assert!(child.wait().await.unwrap().success());
        let cwd = dir.path().canonicalize().unwrap();
        // Exactly the environment given (sh adds PWD; nothing of ours leaks).
        let expected = format!(
            "a b c\nONLY=this\nPATH=/usr/bin:/bin\nPWD={}\n{}\nfrom stdin\n",
            cwd.display(),
            cwd.display()
        );
        let (head, fds) = out.split_at(out.find("total ").unwrap());
        assert_eq!(head, expected);
        for line in fds.lines().skip(1) {
            let words: Vec<&str> = line.split_whitespace().skip(8).collect();
            let (fd, target) = words.split_at(1);
            let fd: i32 = fd[0].parse().unwrap();
            if fd <= 2 || target.last().is_some_and(|t| t.starts_with("/proc/")) {
                continue; // stdio, and `ls`'s own handle on the directory
            }
            // Anything else must be a descriptor whoever started the tests left inheritable
            // (a shell's pipe), never one of ours: those are all close-on-exec.
            // SAFETY: F_GETFD only reads the descriptor's flags.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert!(
                flags >= 0 && flags & libc::FD_CLOEXEC == 0,
                "descriptor leaked into the program: {line}"
            );
        }
    }

    #[tokio::test]
    async fn a_name_given_twice_is_its_last_value() {
        let dir = tempfile::tempdir().unwrap();
        // `env` prints the environment as the kernel gave it (a shell would tidy it first).
        let (mut child, out) = run(
            "env",
            &[],
            &[PATH, ("TWICE", "first"), ("TWICE", "last")],
            dir.path(),
            b"",
        )
        .await;
        assert!(child.wait().await.unwrap().success());
        let twice: Vec<&str> = out.lines().filter(|l| l.starts_with("TWICE=")).collect();
        assert_eq!(twice, ["TWICE=last"]);
    }

    #[tokio::test]
    async fn the_program_leads_its_own_process_group_with_default_signals_and_an_empty_mask() {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, out) = run(
            "cat",
            &["/proc/self/stat", "/proc/self/status"],
            &[PATH],
            dir.path(),
            b"",
        )
        .await;
        assert!(child.wait().await.unwrap().success());
        let stat: Vec<&str> = out
            .lines()
            .next()
            .unwrap()
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        // Fields after the name: state, ppid, pgrp.
        assert_eq!(stat[2], child.id().to_string(), "process group");
        assert_eq!(stat[1], std::process::id().to_string(), "parent");
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap()
        };
        assert_eq!(field("SigBlk:"), 0, "no signal blocked");
        // Rust ignores SIGPIPE; the program must not inherit that (nor anything caught).
        let ours = std::fs::read_to_string("/proc/self/status").unwrap();
        let our_ignored = ours
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        let sigpipe = 1u64 << (libc::SIGPIPE - 1);
        assert_ne!(
            our_ignored & sigpipe,
            0,
            "the test process ignores SIGPIPE, as Rust programs do"
        );
        // What we ignore (set by whoever started us) stays ignored, as with posix_spawn; but
        // not SIGPIPE, which the Rust runtime ignores for itself.
        assert_eq!(field("SigIgn:"), our_ignored & !sigpipe, "ignored signals");
        assert_eq!(field("SigCgt:"), 0, "no handler of ours");
        // Started by the clone path, not tokio's fork fallback.
        #[cfg(target_os = "linux")]
        assert!(matches!(child.waiter, Waiter::Done), "waited for on its pidfd");
    }

    #[tokio::test]
    async fn the_exit_status_and_a_kill_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, _) = run("sh", &["-c", "exit 3"], &[PATH], dir.path(), b"").await;
        assert_eq!(child.wait().await.unwrap().code(), Some(3));
        let mut child = sleeper(dir.path());
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.kill().await.unwrap().signal(), Some(libc::SIGKILL));
    }

    #[tokio::test]
    async fn a_missing_or_unrunnable_program_is_an_error_of_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |program: &'static str| Spec {
            program,
            args: &[],
            env: vec![("PATH".into(), dir.path().as_os_str().to_owned())],
            cwd: dir.path(),
            stdin: Stdin::Piped,
        };
        let e = spawn(spec("no-such-program")).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let e = spawn(spec("./no-such-program")).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        std::fs::write(dir.path().join("plain"), "#!/bin/sh\n").unwrap();
        let e = spawn(spec("plain")).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        let e = spawn(Spec {
            cwd: Path::new("/no/such/dir"),
            ..spec("/bin/true")
        })
        .err()
        .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }

    #[tokio::test]
    async fn a_dropped_child_is_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let child = sleeper(dir.path());
        let pid = child.id();
        drop(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "still there (or a zombie)"
        );
    }
}
