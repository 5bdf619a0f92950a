//! A throwaway Courier-IMAP 5 on loopback: `couriertcpd` in the foreground as our child, in a
//! process group of its own, serving `imaplogin`/`imapd` unpacked from the `courier-imap`
//! package into `/opt/inboxd-courier` (installing it would remove Dovecot: both `Provide` and
//! `Conflict` `imap-server`); `INBOXD_COURIER_ROOT` points elsewhere.
//!
//! Courier authenticates through Debian's `authdaemond` (from `courier-authdaemon`, one per
//! machine: its socket path is compiled in) and PAM, so each instance creates a system user of
//! its own (`inbxc<port>`, password `alicepw`, home and Maildir in the instance's folder) and
//! removes it on drop, after killing what runs as it (imapd sessions and the `gam_server` they
//! start). Root only.
//!
//! What differs from Dovecot and Cyrus: no STARTTLS here (plain loopback), no MOVE, CONDSTORE,
//! QRESYNC or LITERAL+; folders are `INBOX.Name`; IDLE checks the folder every
//! `IMAP_IDLE_TIMEOUT` seconds (1 here) instead of being told.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use inboxd::config::{Account, TlsMode};
use inboxd::secret::{Secret, SecretSource};

use crate::{free_port, spawn_in_group, stop_group, wait_listening};

/// The password of every Courier test user.
pub const COURIER_PASSWORD: &str = "alicepw";

fn root_dir() -> PathBuf {
    std::env::var_os("INBOXD_COURIER_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/inboxd-courier"))
}

/// Whether Courier can be started here: its programs are installed and we are root.
pub fn courier_available() -> Result<(), String> {
    let root = root_dir();
    for p in [
        PathBuf::from("/usr/sbin/couriertcpd"),
        PathBuf::from("/usr/sbin/authdaemond"),
        PathBuf::from("/usr/bin/maildirmake"),
        root.join("usr/bin/imapd"),
        root.join("usr/lib/courier/courier/imaplogin"),
    ] {
        if !p.exists() {
            return Err(format!(
                "{} is missing: scripts/install-deps installs Courier (courier-base, courier-authdaemon, and imapd unpacked into /opt/inboxd-courier)",
                p.display()
            ));
        }
    }
    // SAFETY: geteuid(2) only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return Err("Courier authenticates system users: starting a test instance needs root".into());
    }
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A running Courier-IMAP instance. Stopped, its user and folder removed on drop.
#[derive(Debug)]
pub struct Courier {
    dir: PathBuf,
    /// Plain port (no STARTTLS).
    pub port: u16,
    /// The instance's system user (password [`COURIER_PASSWORD`]).
    pub user: String,
    child: Option<Child>,
}

impl Courier {
    /// Starts an instance with a new system user and an empty Maildir.
    pub fn start() -> io::Result<Courier> {
        courier_available().map_err(io::Error::other)?;
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("inboxd-courier-{}-{port}", std::process::id()));
        let home = dir.join("home");
        fs::create_dir_all(&home)?;
        for d in [&dir, &home] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
        }
        let user = format!("inbxc{port}");
        let mut c = Courier {
            dir,
            port,
            user,
            child: None,
        };
        c.create_user()?;
        c.write_files()?;
        c.launch()?;
        Ok(c)
    }

    fn home(&self) -> PathBuf {
        self.dir.join("home").join(&self.user)
    }

    fn create_user(&self) -> io::Result<()> {
        let home = self.home();
        let _ = Command::new("userdel").arg(&self.user).output();
        run(
            Command::new("useradd")
                .args(["-M", "-s", "/usr/sbin/nologin", "-d"])
                .arg(&home)
                .arg(&self.user),
            "useradd",
        )?;
        let mut chpasswd = Command::new("chpasswd").stdin(Stdio::piped()).spawn()?;
        io::Write::write_all(
            &mut chpasswd.stdin.take().expect("piped"),
            format!("{}:{COURIER_PASSWORD}\n", self.user).as_bytes(),
        )?;
        if !chpasswd.wait()?.success() {
            return Err(io::Error::other("chpasswd failed"));
        }
        fs::create_dir_all(&home)?;
        run(Command::new("chown").arg(format!("{}:", self.user)).arg(&home), "chown")?;
        run(
            Command::new("su")
                .args(["-s", "/bin/sh", &self.user, "-c"])
                .arg(format!("maildirmake '{}'", home.join("Maildir").display())),
            "maildirmake",
        )?;
        ensure_authdaemon()
    }

    fn write_files(&self) -> io::Result<()> {
        let root = root_dir();
        let root = root.display();
        fs::write(
            self.dir.join("run-imapd.sh"),
            format!(
                "#!/bin/sh
set -a
. {root}/etc/courier/imapd
IMAP_STARTTLS=NO
IMAP_IDLE_TIMEOUT=1
IMAP_CAPABILITY=\"IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT THREAD=REFERENCES SORT QUOTA IDLE AUTH=PLAIN\"
# Without -pid=, couriertcpd stays in the foreground.
exec /usr/sbin/couriertcpd -address=127.0.0.1 -maxprocs=100 -maxperip=100 -nodnslookup -noidentlookup {port} {root}/usr/lib/courier/courier/imaplogin {root}/usr/bin/imapd Maildir
",
                port = self.port
            ),
        )
    }

    fn launch(&mut self) -> io::Result<()> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg(self.dir.join("run-imapd.sh"))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        self.child = Some(spawn_in_group(cmd, &self.dir.join("stderr.log"))?);
        // Listening is not ready: a login goes through `imaplogin`, `authdaemond` and PAM, and
        // `authdaemond`, just started, creates its socket a moment before it accepts on it (a
        // first login in that moment is dropped: seen once in CI on a fresh machine).
        let (port, user) = (self.port, self.user.clone());
        wait_listening(
            &mut self.child,
            &[self.port],
            &self.dir.join("stderr.log"),
            "couriertcpd (listening and logging in)",
            || login(port, &user).is_ok(),
        )
        .map_err(|e| match login(port, &user) {
            Err(why) => io::Error::other(format!("{e}; the last login: {why}")),
            Ok(()) => e,
        })
    }

    /// An account for the instance's user on its plain port.
    pub fn account(&self) -> Account {
        Account::new(
            &self.user,
            "127.0.0.1",
            self.port,
            TlsMode::None,
            &self.user,
            SecretSource::Literal(Secret::new(COURIER_PASSWORD)),
        )
    }

    /// Stops the instance: its process group as [`stop_group`] does, then everything of its
    /// user (sessions, `gam_server`).
    pub fn stop(&mut self) {
        stop_group(&mut self.child);
        let _ = Command::new("pkill").args(["-KILL", "-u", &self.user]).output();
    }

    /// Starts the instance again after [`Courier::stop`], on the same port with the same mail.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.launch()
    }
}

/// `authdaemond`'s socket: compiled into Courier's `imaplogin`, one per machine.
const AUTHDAEMON_SOCKET: &str = "/run/courier/authdaemon/socket";
const AUTHDAEMON_PID: &str = "/run/courier/authdaemon/pid";

/// Starts `authdaemond` unless one answers on its socket. A socket file is not enough: a
/// daemon killed with its session (SIGKILL, as a CI machine ends a session) leaves its socket
/// and pid file behind, every login then fails, and `authdaemond start` would trust the stale
/// pid file; that is what failed CI on a machine where the daemon had been started before.
/// The stale files are removed (never `authdaemond stop`: the stale pid may be another
/// process's by now). One start at a time within a process.
fn ensure_authdaemon() -> io::Result<()> {
    static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = STARTING.lock().unwrap_or_else(|p| p.into_inner());
    let answers = || std::os::unix::net::UnixStream::connect(AUTHDAEMON_SOCKET).is_ok();
    if answers() {
        return Ok(());
    }
    for stale in [AUTHDAEMON_SOCKET, AUTHDAEMON_PID] {
        let _ = fs::remove_file(stale);
    }
    run(Command::new("/usr/sbin/authdaemond").arg("start"), "authdaemond start")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if answers() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(io::Error::other(format!(
        "authdaemond was started but does not answer on {AUTHDAEMON_SOCKET} within 10 s"
    )))
}

/// Whether `user` can log in on `port` (greeting, `LOGIN`, tagged OK, `LOGOUT`); if not, what
/// went wrong, for the error when it never can.
fn login(port: u16, user: &str) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write};
    let attempt = || -> io::Result<Result<(), String>> {
        let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if !line.starts_with("* OK") {
            return Ok(Err(format!("greeting {:?}", line.trim_end())));
        }
        (&stream).write_all(format!("a LOGIN {user} {COURIER_PASSWORD}\r\n").as_bytes())?;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(Err("connection closed after LOGIN".into()));
            }
            if line.starts_with("a ") {
                let _ = (&stream).write_all(b"b LOGOUT\r\n");
                return Ok(if line.starts_with("a OK") {
                    Ok(())
                } else {
                    Err(format!("LOGIN answered {:?}", line.trim_end()))
                });
            }
        }
    };
    attempt().unwrap_or_else(|e| Err(e.to_string()))
}

impl Drop for Courier {
    fn drop(&mut self) {
        self.stop();
        for _ in 0..50 {
            match Command::new("userdel").arg(&self.user).output() {
                Ok(o) if o.status.success() => break,
                _ => {
                    let _ = Command::new("pkill").args(["-KILL", "-u", &self.user]).output();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
