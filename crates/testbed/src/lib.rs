//! A throwaway Dovecot on loopback, for the demo, the integration tests and the benchmark.
//!
//! Each instance lives in its own temporary folder (config, sockets, state, log, TLS
//! certificate, mail) and listens on free loopback ports: a plain/STARTTLS port and an implicit
//! TLS port. It runs in the foreground as our child in its own process group, with its stdio
//! redirected (Dovecot keeps the stderr it was started with open for its whole life), and is
//! stopped with SIGTERM to that group. As root, mail is owned by `nobody`; otherwise by the
//! current user (with the settings rootless Dovecot needs).
//!
//! Users: `alice`/`alicepw`, `bob`/`bobpw`, and `quoted` whose password `p@ss w"rd\x` needs
//! IMAP quoting.

use std::fs;
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod courier;
mod cyrus;

pub use courier::{COURIER_PASSWORD, Courier, courier_available};
pub use cyrus::{Cyrus, cyrus_available};

use inboxd::config::{Account, TlsMode};
use inboxd::secret::{Secret, SecretSource};

/// The test users and their passwords.
pub const USERS: &[(&str, &str)] = &[("alice", "alicepw"), ("bob", "bobpw"), ("quoted", "p@ss w\"rd\\x")];

/// Options for a Dovecot instance.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Replace the post-login capability list (e.g. to hide IDLE).
    pub capabilities: Option<String>,
    /// Accept OAuth2 bearer tokens (XOAUTH2 and OAUTHBEARER) issued by this issuer URL,
    /// validated locally as JWTs with the public keys in [`Dovecot::oauth2_keys_dir`].
    pub oauth2_issuer: Option<String>,
    /// Serve the kind of certificate `openssl req -x509` makes by default: self-signed and
    /// marked CA:TRUE (its own `tls/cert.pem`).
    pub self_signed_ca: bool,
    /// IMAP connections one user may hold from one address (Dovecot's default is 10).
    pub max_userip_connections: Option<u32>,
    /// Room for this many IMAP sessions at once: process limits raised, and the login
    /// service in Dovecot's high-performance mode (a few processes for every TLS client).
    pub sessions: Option<u32>,
    /// This many more users, `u0000`, `u0001`, ... (see [`extra_user`]), each with the
    /// password [`EXTRA_PASSWORD`].
    pub extra_users: u32,
}

/// The password of every extra user ([`Options::extra_users`]).
pub const EXTRA_PASSWORD: &str = "userpw";

/// The name of the `i`th extra user ([`Options::extra_users`]).
pub fn extra_user(i: u32) -> String {
    format!("u{i:04}")
}

/// A running Dovecot instance. Stopped and removed on drop.
#[derive(Debug)]
pub struct Dovecot {
    dir: PathBuf,
    keep_dir: bool,
    /// Plain port (STARTTLS offered; LOGIN allowed on loopback).
    pub port: u16,
    /// Implicit TLS port.
    pub tls_port: u16,
    child: Option<Child>,
    mail_uid: (u32, u32),
}

/// The ports [`free_port`] hands out: below Linux's default ephemeral range (32768–60999), so
/// that no outgoing connection of a parallel test can take one between the probe and the
/// server's bind (a port from `bind(:0)` can be; seen as "Address already in use" in CI).
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port nobody listens on right now, for a server a test starts: each call in a
/// process takes the next of [`TEST_PORTS`] after a start that differs by process (so two test
/// processes rarely probe the same ones), checked by binding it.
pub fn free_port() -> io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = TEST_PORTS.start + offset as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::other(format!("no free port in {TEST_PORTS:?}")))
}

/// A test user's account over STARTTLS on `port`, trusting `ca_file`.
fn starttls_account(user: &str, port: u16, ca_file: PathBuf) -> Account {
    let password = USERS.iter().find(|(u, _)| *u == user).map_or("", |(_, p)| p);
    let mut a = Account::new(
        user,
        "127.0.0.1",
        port,
        TlsMode::Starttls,
        user,
        SecretSource::Literal(Secret::new(password)),
    );
    a.ca_file = Some(ca_file);
    a
}

/// Established TCP connections to `port` on 127.0.0.1, as the kernel lists them (the server's
/// side of each session of its clients).
pub fn established_to(port: u16) -> usize {
    let local = format!("0100007F:{port:04X}");
    fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == local && f[3] == "01"
        })
        .count()
}

/// Starts a server in the foreground as our child, in a process group of its own, its output
/// appended to `log`.
fn spawn_in_group(mut cmd: Command, log: &Path) -> io::Result<Child> {
    let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
}

/// Waits (15 s at most) until every port accepts connections and `ready` holds; fails with the
/// server's log if it exits first.
fn wait_listening(
    child: &mut Option<Child>,
    ports: &[u16],
    log: &Path,
    what: &str,
    ready: impl Fn() -> bool,
) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if ports.iter().all(|&p| TcpStream::connect(("127.0.0.1", p)).is_ok()) && ready() {
            return Ok(());
        }
        if let Some(c) = child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            let log = fs::read_to_string(log).unwrap_or_default();
            return Err(io::Error::other(format!("{what} exited with {status}: {log}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(io::Error::other(format!("{what} did not start listening within 15 s")))
}

/// Whether the server on `port` greets with `text` in its first line.
fn greets(port: u16, text: &str) -> bool {
    use std::io::{BufRead, BufReader};
    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let greeted = BufReader::new(&stream).read_line(&mut line).is_ok() && line.contains(text);
    let _ = (&stream).write_all(b"a LOGOUT\r\n");
    greeted
}

/// Lets every one of `n` IMAP processes of one user watch its folder with inotify: Linux's
/// default of 128 inotify instances per user makes Dovecot's sessions beyond the 128th fall
/// back to checking every `mailbox_idle_check_interval`, so a new message is noticed up to a
/// second late (seen as a p99 of ~1 s with 1,000 IDLE sessions). Raised, never lowered; root
/// only (otherwise said once on stderr).
pub fn raise_inotify_instances(n: u32) {
    let path = Path::new("/proc/sys/fs/inotify/max_user_instances");
    let now: u32 = fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    if now >= n {
        return;
    }
    if let Err(e) = fs::write(path, n.to_string()) {
        eprintln!(
            "fs.inotify.max_user_instances is {now}, below the {n} sessions asked for, and cannot be raised ({e}): Dovecot checks the folders of the sessions beyond it every second instead of being told"
        );
    }
}

/// Stops a server started by [`spawn_in_group`]: SIGTERM to its process group, then SIGKILL to
/// the group after 5 s (children may outlive the master by a moment).
fn stop_group(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let pgid = child.id() as i32;
        // SAFETY: signals the process group the server was started in.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn find_dovecot() -> io::Result<PathBuf> {
    for p in ["/usr/sbin/dovecot", "/usr/local/sbin/dovecot"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "dovecot is not installed (Debian/Ubuntu: apt-get install -y dovecot-imapd)",
    ))
}

/// Whether Dovecot is installed here.
pub fn available() -> bool {
    find_dovecot().is_ok()
}

impl Dovecot {
    /// Starts an instance with default options in a new temporary folder.
    pub fn start() -> io::Result<Dovecot> {
        Dovecot::start_with(Options::default())
    }

    /// Starts an instance with the given options.
    pub fn start_with(options: Options) -> io::Result<Dovecot> {
        let base = std::env::temp_dir().join(format!("inboxd-dovecot-{}-{}", std::process::id(), free_port()?));
        fs::create_dir_all(&base)?;
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755))?;
        // SAFETY: geteuid(2) and getegid(2) only read the process's credentials.
        let root = unsafe { libc::geteuid() } == 0;
        let mail_uid = if root {
            (65534, 65534)
        } else {
            // SAFETY: as above.
            unsafe { (libc::geteuid(), libc::getegid()) }
        };
        let mut d = Dovecot {
            dir: base,
            keep_dir: false,
            port: free_port()?,
            tls_port: free_port()?,
            child: None,
            mail_uid,
        };
        // A free port can be taken by another test's server between our probe and Dovecot's
        // bind: then try again on other ports.
        let mut attempt = 1;
        loop {
            d.write_files(&options, root)?;
            match d.launch() {
                Err(e) if attempt < 5 && e.to_string().contains("Address already in use") => {
                    attempt += 1;
                    d.port = free_port()?;
                    d.tls_port = free_port()?;
                }
                r => return r.map(|()| d),
            }
        }
    }

    /// The instance's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keep the folder after drop (for the demo: its Maildir output may live there).
    pub fn keep(&mut self) {
        self.keep_dir = true;
    }

    /// The CA certificate that verifies this instance (a self-signed certificate for
    /// `localhost` and `127.0.0.1`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }

    /// Where an OAuth2 test issuer writes its public keys (`default/RS256/<kid>`, PEM).
    pub fn oauth2_keys_dir(&self) -> PathBuf {
        self.dir.join("oauth2-keys")
    }

    /// The Dovecot config file.
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("dovecot.conf")
    }

    /// The Maildir of a user.
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.dir.join("home").join(user).join("Maildir")
    }

    /// An account for a test user over STARTTLS on the plain port, trusting the instance's CA.
    pub fn account(&self, user: &str) -> Account {
        starttls_account(user, self.port, self.ca_file())
    }

    fn write_files(&self, options: &Options, root: bool) -> io::Result<()> {
        let d = &self.dir;
        for sub in ["run", "state", "tls", "home", "oauth2-keys"] {
            fs::create_dir_all(d.join(sub))?;
        }
        let (uid, gid) = self.mail_uid;
        let mut users = String::new();
        let extra = (0..options.extra_users).map(|i| (extra_user(i), EXTRA_PASSWORD.to_string()));
        for (user, pass) in USERS.iter().map(|(u, p)| (u.to_string(), p.to_string())).chain(extra) {
            let home = d.join("home").join(&user);
            fs::create_dir_all(&home)?;
            chown(&home, uid, gid)?;
            users.push_str(&format!("{user}:{pass}:{uid}:{gid}::{}::\n", home.display()));
        }
        fs::write(d.join("users"), users)?;
        make_certificates(&d.join("tls"))?;
        if options.self_signed_ca {
            make_self_signed_ca(&d.join("tls"))?;
        }
        let mut conf = format!(
            r#"protocols = imap
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/state
instance_name = inboxd-test-{port}
login_greeting = {greeting}
log_path = {d}/dovecot.log
ssl = yes
ssl_cert = <{d}/tls/cert.pem
ssl_key = <{d}/tls/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
auth_verbose = yes
first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_fsync = never
namespace inbox {{
  inbox = yes
  mailbox Junk {{
    special_use = \Junk
  }}
  mailbox Trash {{
    special_use = \Trash
  }}
  mailbox Sent {{
    special_use = \Sent
  }}
}}
mailbox_idle_check_interval = 1 secs
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d}/users
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
  {chroot}
}}
service imap-login {{
  inet_listener imap {{
    port = {port}
  }}
  inet_listener imaps {{
    port = {tls_port}
    ssl = yes
  }}
  {chroot}
}}
"#,
            d = d.display(),
            port = self.port,
            tls_port = self.tls_port,
            greeting = self.greeting(),
            chroot = if root { "" } else { "chroot =" },
        );
        if Path::new("/usr/share/dovecot/dh.pem").exists() {
            conf.push_str("ssl_dh = </usr/share/dovecot/dh.pem\n");
        }
        if !root {
            let user = std::env::var("USER").unwrap_or_else(|_| "nobody".into());
            let group = Command::new("id")
                .arg("-gn")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok());
            let group = group.map(|g| g.trim().to_string()).unwrap_or_else(|| user.clone());
            conf.push_str(&format!(
                "default_internal_user = {user}\ndefault_internal_group = {group}\ndefault_login_user = {user}\n"
            ));
        }
        if let Some(n) = options.max_userip_connections {
            conf.push_str(&format!("protocol imap {{\n  mail_max_userip_connections = {n}\n}}\n"));
        }
        if let Some(n) = options.sessions {
            raise_inotify_instances(n + 64);
            let n = n + 64;
            conf.push_str(&format!(
                "default_process_limit = {n}\ndefault_client_limit = {}\nservice imap {{\n  process_limit = {n}\n}}\n",
                n * 4
            ));
            conf = conf.replace(
                "service imap-login {\n",
                &format!("service imap-login {{\n  service_count = 0\n  process_min_avail = 2\n  client_limit = {n}\n"),
            );
        }
        if let Some(issuer) = &options.oauth2_issuer {
            fs::set_permissions(d.join("oauth2-keys"), fs::Permissions::from_mode(0o755))?;
            fs::write(
                d.join("dovecot-oauth2.conf.ext"),
                format!(
                    "introspection_mode = local\nlocal_validation_key_dict = fs:posix:prefix={}/\nusername_attribute = sub\nissuers = {issuer}\n",
                    d.join("oauth2-keys").display()
                ),
            )?;
            conf = conf.replace(
                "auth_mechanisms = plain login",
                "auth_mechanisms = plain login xoauth2 oauthbearer",
            );
            conf = conf.replace(
                "passdb {\n  driver = passwd-file\n",
                "passdb {\n  driver = passwd-file\n  mechanisms = plain login\n",
            );
            conf.push_str(&format!(
                "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}/dovecot-oauth2.conf.ext\n}}\n",
                d.display()
            ));
        }
        if let Some(caps) = &options.capabilities {
            conf.push_str(&format!("protocol imap {{\n  imap_capability = {caps}\n}}\n"));
        }
        fs::write(d.join("dovecot.conf"), conf)?;
        Ok(())
    }

    /// This instance's greeting: its folder's name, unique on the machine while it runs.
    fn greeting(&self) -> String {
        let name = self.dir.file_name().map(|n| n.to_string_lossy().into_owned());
        format!("inboxd-test-{}", name.unwrap_or_default())
    }

    fn launch(&mut self) -> io::Result<()> {
        let mut cmd = Command::new(find_dovecot()?);
        cmd.arg("-F").arg("-c").arg(self.config_file());
        self.child = Some(spawn_in_group(cmd, &self.dir.join("stderr.log"))?);
        // Ready when *this* instance greets on the port: a free port picked by another test at
        // the same moment would otherwise be "listening" with someone else's server behind
        // it (then torn down under this test: a reset at the greeting, seen once in CI).
        let (port, greeting) = (self.port, self.greeting());
        wait_listening(
            &mut self.child,
            &[self.port, self.tls_port],
            &self.dir.join("stderr.log"),
            "dovecot",
            || greets(port, &greeting),
        )
    }

    /// Stops the instance (SIGTERM to its process group, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        stop_group(&mut self.child);
    }

    /// Starts the instance again after [`Dovecot::stop`], on the same ports with the same mail.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.launch()
    }

    /// Runs `doveadm` against this instance.
    pub fn doveadm(&self, args: &[&str]) -> io::Result<String> {
        let out = Command::new("doveadm")
            .arg("-c")
            .arg(self.config_file())
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "doveadm {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes messages straight into a user's Maildir folder (`INBOX` or another), the fast way
    /// to make a large backlog. Dovecot assigns UIDs in file-name order at its next sync.
    pub fn drop_messages(&self, user: &str, folder: &str, messages: &[Vec<u8>]) -> io::Result<()> {
        for (i, m) in messages.iter().enumerate() {
            self.drop_message_with(user, folder, i, m.len() as u64, |f| f.write_all(m))?;
        }
        Ok(())
    }

    /// Puts one message of `len` bytes into a folder's Maildir, written by `write` straight
    /// into the file (for messages too large to build in memory). `n` makes the name unique.
    pub fn drop_message_with(
        &self,
        user: &str,
        folder: &str,
        n: usize,
        len: u64,
        write: impl FnOnce(&mut fs::File) -> io::Result<()>,
    ) -> io::Result<()> {
        let root = self.maildir(user);
        let dir = if folder == "INBOX" {
            root.clone()
        } else {
            root.join(format!(".{folder}"))
        };
        let (uid, gid) = self.mail_uid;
        for p in [&root, &dir] {
            for sub in ["", "new", "cur", "tmp"] {
                let s = p.join(sub);
                if !s.exists() {
                    fs::create_dir_all(&s)?;
                    chown(&s, uid, gid)?;
                }
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let name = format!("{now}.M{n:08}P{}.inboxd,S={len}", std::process::id());
        let tmp = dir.join("tmp").join(&name);
        let mut f = fs::File::create(&tmp)?;
        write(&mut f)?;
        drop(f);
        chown(&tmp, uid, gid)?;
        fs::rename(&tmp, dir.join("new").join(&name))
    }
}

/// A throwaway CA and a server certificate it signed, for `localhost` and `127.0.0.1` (a
/// self-signed leaf is rejected by webpki as "CA used as end entity").
/// Replaces `cert.pem`/`key.pem` with one self-signed CA:TRUE certificate.
fn make_self_signed_ca(dir: &Path) -> io::Result<()> {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn make_certificates(dir: &Path) -> io::Result<()> {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )?;
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "30",
                "-subj",
                "/CN=inboxd test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &["-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "leaf.csr"],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "leaf.ext",
            "-out",
            "cert.pem",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "openssl {} failed: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr)
            )));
        }
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: geteuid(2) only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
        if !self.keep_dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A small RFC 5322 message for tests and the demo.
pub fn sample_message(n: usize, subject: &str, body_len: usize) -> Vec<u8> {
    let mut m = format!(
        "From: sender@example.com\r\nTo: alice@example.com\r\nSubject: {subject}\r\nMessage-ID: <{n}.{}@inboxd.test>\r\nDate: Thu, 26 Nov 2026 07:00:00 +0000\r\n\r\n",
        std::process::id()
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n";
    while m.len() < body_len {
        m.extend_from_slice(line);
    }
    m
}

/// A server process of a test's own: a free loopback port, a temp directory that survives
/// restarts (so a broker keeps what it stored), SIGKILL on stop, removed on drop.
struct Service {
    what: &'static str,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Serve TLS only, with `cert.pem`/`key.pem` issued by `ca.pem` in `dir`.
    tls: bool,
    /// Stop with SIGTERM first (a clean shutdown), SIGKILL only if it does not exit in 30 s.
    gentle: bool,
    command: fn(&Path, u16, bool) -> io::Result<Command>,
    ready: fn(u16) -> bool,
}

impl Service {
    fn start(
        what: &'static str,
        tls: bool,
        command: fn(&Path, u16, bool) -> io::Result<Command>,
        ready: fn(u16) -> bool,
    ) -> io::Result<Service> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("inboxd-{what}-{}-{port}", std::process::id()));
        fs::create_dir_all(&dir)?;
        if tls {
            make_certificates(&dir)?;
        }
        let mut s = Service {
            what,
            port,
            dir,
            child: None,
            tls,
            gentle: false,
            command,
            ready,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> io::Result<()> {
        use std::os::unix::process::CommandExt;
        // Its own process group: a server started by a script (RabbitMQ) dies with it.
        let child = (self.command)(&self.dir, self.port, self.tls)?
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: {e} (scripts/install-deps installs it)", self.what),
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if (self.ready)(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(io::Error::other(format!(
            "{} did not answer on port {}",
            self.what, self.port
        )))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.gentle
                && let Ok(pid) = i32::try_from(c.id())
            {
                // SAFETY: kill(2) with a negative pid signals the process group we created.
                unsafe {
                    libc::kill(-pid, libc::SIGTERM);
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: kill(2) with a negative pid signals the process group we created.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn installed(candidates: &[&str], package: &str) -> io::Result<PathBuf> {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{package} is not installed (apt-get install {package})"),
            )
        })
}

/// A server of a test's own that a target talks to, and how to reach it: what the broker
/// types below share ([`Nats`], [`Redis`], [`Mosquitto`], [`Rabbit`] dereference to it).
pub struct Broker {
    pub port: u16,
    service: Service,
    /// URL schemes and hosts: plain, and TLS-only (the TLS certificate names `localhost`).
    plain: &'static str,
    tls: &'static str,
}

impl Broker {
    fn new(service: Service, plain: &'static str, tls: &'static str) -> Broker {
        Broker {
            port: service.port,
            service,
            plain,
            tls,
        }
    }

    /// The server's URL: `nats://127.0.0.1:PORT`, or for a TLS-only one `tls://localhost:PORT`
    /// (and the same for `redis`, `mqtt`/`mqtts`, `amqp`/`amqps`).
    pub fn url(&self) -> String {
        let base = if self.service.tls { self.tls } else { self.plain };
        format!("{base}:{}", self.port)
    }

    /// The CA that issued a TLS-only server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.service.dir.join("ca.pem")
    }

    /// Stops the server (SIGKILL; RabbitMQ: SIGTERM first); what it stored stays for
    /// [`Broker::restart`].
    pub fn stop(&mut self) {
        self.service.stop();
    }

    /// Starts it again on the same port, with what it stored.
    pub fn restart(&mut self) -> io::Result<()> {
        self.service.restart()
    }
}

/// Each broker type is a [`Broker`] with its own way of starting.
macro_rules! broker {
    ($name:ident) => {
        impl std::ops::Deref for $name {
            type Target = Broker;
            fn deref(&self) -> &Broker {
                &self.0
            }
        }

        impl std::ops::DerefMut for $name {
            fn deref_mut(&mut self) -> &mut Broker {
                &mut self.0
            }
        }
    };
}

/// A throwaway NATS server with JetStream (Debian's `nats-server`). Tests that stop or restart
/// the broker use one of their own, never the machine's.
pub struct Nats(Broker);
broker!(Nats);

impl Nats {
    pub fn start() -> io::Result<Nats> {
        Nats::start_with(false)
    }

    /// A server that speaks TLS only, with a certificate for `localhost`/127.0.0.1 issued by
    /// [`Broker::ca_file`].
    pub fn start_tls() -> io::Result<Nats> {
        Nats::start_with(true)
    }

    fn start_with(tls: bool) -> io::Result<Nats> {
        let service = Service::start(
            "nats-server",
            tls,
            |dir, port, tls| {
                let mut c = Command::new(installed(
                    &["/usr/sbin/nats-server", "/usr/bin/nats-server"],
                    "nats-server",
                )?);
                c.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                    .arg(dir.join("js"))
                    .arg("-l")
                    .arg(dir.join("nats.log"));
                if tls {
                    c.arg("--tls")
                        .arg("--tlscert")
                        .arg(dir.join("cert.pem"))
                        .arg("--tlskey")
                        .arg(dir.join("key.pem"));
                }
                Ok(c)
            },
            listening,
        )?;
        Ok(Nats(Broker::new(service, "nats://127.0.0.1", "tls://localhost")))
    }
}

/// A throwaway Redis writing every change to its append-only file (so a restart keeps the
/// data, as a production Redis with AOF does).
pub struct Redis(Broker);
broker!(Redis);

impl Redis {
    pub fn start() -> io::Result<Redis> {
        let service = Service::start(
            "redis-server",
            false,
            |dir, port, _| {
                let mut c = Command::new(installed(
                    &["/usr/bin/redis-server", "/usr/sbin/redis-server"],
                    "redis-server",
                )?);
                c.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", ""])
                    .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                    .arg(dir);
                Ok(c)
            },
            // Listening is not loaded: PING until it answers PONG.
            |port| {
                use std::io::Read;
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                    return false;
                };
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 64];
                s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
            },
        )?;
        Ok(Redis(Broker::new(service, "redis://127.0.0.1", "rediss://localhost")))
    }
}

/// A throwaway Mosquitto (MQTT 5) keeping its state in its own directory.
pub struct Mosquitto(Broker);
broker!(Mosquitto);

impl Mosquitto {
    pub fn start() -> io::Result<Mosquitto> {
        Mosquitto::start_with(false)
    }

    /// A broker that speaks TLS only (MQTT over TLS), its certificate issued by
    /// [`Broker::ca_file`].
    pub fn start_tls() -> io::Result<Mosquitto> {
        Mosquitto::start_with(true)
    }

    fn start_with(tls: bool) -> io::Result<Mosquitto> {
        let service = Service::start(
            "mosquitto",
            tls,
            |dir, port, tls| {
                // SAFETY: geteuid(2) only reads the process's credentials.
                let root = unsafe { libc::geteuid() } == 0;
                let tls_lines = if tls {
                    format!(
                        "cafile {0}/ca.pem\ncertfile {0}/cert.pem\nkeyfile {0}/key.pem\n",
                        dir.display()
                    )
                } else {
                    String::new()
                };
                let conf = format!(
                    "listener {port} 127.0.0.1\n{tls_lines}allow_anonymous true\npersistence true\npersistence_location {}/\n{}",
                    dir.display(),
                    if root { "user root\n" } else { "" }
                );
                fs::write(dir.join("mosquitto.conf"), conf)?;
                let mut c = Command::new(installed(&["/usr/sbin/mosquitto", "/usr/bin/mosquitto"], "mosquitto")?);
                c.arg("-c").arg(dir.join("mosquitto.conf"));
                Ok(c)
            },
            listening,
        )?;
        Ok(Mosquitto(Broker::new(service, "mqtt://127.0.0.1", "mqtts://localhost")))
    }
}

/// A throwaway RabbitMQ node of its own (Debian's `rabbitmq-server`): own node name, ports,
/// database and Erlang cookie in its directory, no plugins; its queues survive a restart (it
/// is stopped with SIGTERM, see [`Broker::stop`]). User guest, password guest.
pub struct Rabbit(Broker);
broker!(Rabbit);

impl Rabbit {
    pub fn start() -> io::Result<Rabbit> {
        Rabbit::start_with(false)
    }

    /// A node that speaks AMQP over TLS only (amqps), its certificate issued by
    /// [`Broker::ca_file`].
    pub fn start_tls() -> io::Result<Rabbit> {
        Rabbit::start_with(true)
    }

    fn start_with(tls: bool) -> io::Result<Rabbit> {
        let mut service = Service::start(
            "rabbitmq-server",
            tls,
            |dir, port, tls| {
                let script = installed(&["/usr/lib/rabbitmq/bin/rabbitmq-server"], "rabbitmq-server")?;
                fs::write(dir.join("enabled_plugins"), "[].\n")?;
                fs::write(dir.join("rabbitmq-env.conf"), "")?;
                let conf = if tls {
                    format!(
                        "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{port}\nssl_options.cacertfile = {0}/ca.pem\nssl_options.certfile = {0}/cert.pem\nssl_options.keyfile = {0}/key.pem\nloopback_users = none\n",
                        dir.display()
                    )
                } else {
                    String::new()
                };
                fs::write(dir.join("rabbitmq.conf"), conf)?;
                let mut c = Command::new(script);
                c.env("HOME", dir)
                    .env("RABBITMQ_NODENAME", format!("inboxd{port}@localhost"))
                    .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                    .env("RABBITMQ_NODE_PORT", port.to_string())
                    .env("RABBITMQ_DIST_PORT", free_port()?.to_string())
                    .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
                    .env("RABBITMQ_LOG_BASE", dir.join("log"))
                    .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
                    .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
                    .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
                    .env("ERL_EPMD_ADDRESS", "127.0.0.1");
                Ok(c)
            },
            listening,
        )?;
        // RabbitMQ buffers its metadata log in the Erlang process: a SIGKILL soon after a queue
        // was declared can lose the queue. It is stopped as an operator (or systemd) would.
        service.gentle = true;
        Ok(Rabbit(Broker::new(service, "amqp://127.0.0.1", "amqps://localhost")))
    }
}

/// A database of its own on the machine's PostgreSQL (`INBOXD_TEST_POSTGRES`, default
/// `postgres://postgres@127.0.0.1:5432/postgres`: trust authentication on loopback), created
/// empty and dropped (with its connections) when this is dropped. Tests that restart or cut
/// off PostgreSQL must not use this: they need a server of their own.
pub struct PgDatabase {
    admin: String,
    name: String,
    url: String,
}

impl PgDatabase {
    pub fn create() -> io::Result<PgDatabase> {
        let admin = std::env::var("INBOXD_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "inboxd_test_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            fastrand_suffix()
        );
        psql(&admin, &format!("CREATE DATABASE {name}"))?;
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Ok(PgDatabase { admin, name, url })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs SQL in this database with `psql` (for a test's own checks or faults).
    pub fn sql(&self, sql: &str) -> io::Result<String> {
        psql(&self.url, sql)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = psql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos().into())
}

/// Runs one SQL command with `psql`; its output (unaligned, tuples only), or the error it
/// printed.
fn psql(url: &str, sql: &str) -> io::Result<String> {
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
