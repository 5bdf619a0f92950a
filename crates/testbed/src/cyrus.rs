//! A throwaway Cyrus IMAP 3.6 on loopback, like [`crate::Dovecot`]: its own folder (two config
//! files, a sasldb with the test users, TLS certificate, mail spool), free ports, its `master`
//! as our child in its own process group, stopped with SIGTERM to that group.
//!
//! Debian's `cyrus-imapd`, `dovecot-imapd` and `courier-imap` conflict (`Provides: imap-server`):
//! installing one removes the other. So `scripts/install-deps` installs only the parts that do
//! not conflict (`cyrus-common`: `master`, `lmtpd`, the tools; `sasl2-bin`) and unpacks `imapd`
//! and `idled` from the `cyrus-imapd` package into `/opt/inboxd-cyrus` (`apt-get download` +
//! `dpkg-deb -x`); `INBOXD_CYRUS_BIN` points elsewhere. Cyrus runs its services as the `cyrus`
//! user, so the instance's folder is owned by it: starting one needs root.
//!
//! What differs from Dovecot, and what the tests meet: folders sit below `INBOX` with `/` as
//! the separator (`INBOX/Work`); IDLE is served by `idled` (without it `imapd` polls every
//! `imapidlepoll`, set to 1 s); the post-login CAPABILITY still lists LOGINDISABLED.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use inboxd::config::Account;

use crate::{USERS, free_port, make_certificates, spawn_in_group, starttls_account, stop_group, wait_listening};

/// Where `master` is (from `cyrus-common`).
const MASTER: &str = "/usr/lib/cyrus/bin/master";

/// Where `imapd` and `idled` were unpacked (`INBOXD_CYRUS_BIN` overrides).
fn bin_dir() -> PathBuf {
    std::env::var_os("INBOXD_CYRUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/inboxd-cyrus/usr/lib/cyrus/bin"))
}

/// Whether Cyrus can be started here: its binaries are installed and we are root.
pub fn cyrus_available() -> Result<(), String> {
    for p in [PathBuf::from(MASTER), bin_dir().join("imapd"), bin_dir().join("idled")] {
        if !p.exists() {
            return Err(format!(
                "{} is missing: scripts/install-deps installs Cyrus (cyrus-common, sasl2-bin, and imapd unpacked into /opt/inboxd-cyrus)",
                p.display()
            ));
        }
    }
    // SAFETY: geteuid(2) only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return Err("Cyrus runs as the `cyrus` user: starting a test instance needs root".into());
    }
    Ok(())
}

/// A running Cyrus instance. Stopped and removed on drop.
#[derive(Debug)]
pub struct Cyrus {
    dir: PathBuf,
    /// Plain port (STARTTLS offered).
    pub port: u16,
    /// Implicit TLS port.
    pub tls_port: u16,
    child: Option<Child>,
}

impl Cyrus {
    /// Starts an instance in a new temporary folder with the users `alice`, `bob` (and the
    /// admin `cyrus`); each user's INBOX is created at their first login.
    pub fn start() -> io::Result<Cyrus> {
        cyrus_available().map_err(io::Error::other)?;
        let dir = std::env::temp_dir().join(format!("inboxd-cyrus-{}-{}", std::process::id(), free_port()?));
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let mut c = Cyrus {
            dir,
            port: free_port()?,
            tls_port: free_port()?,
            child: None,
        };
        c.write_files()?;
        c.launch()?;
        Ok(c)
    }

    /// The instance's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate that verifies this instance.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }

    /// An account for a test user over STARTTLS on the plain port, trusting the instance's CA.
    pub fn account(&self, user: &str) -> Account {
        starttls_account(user, self.port, self.ca_file())
    }

    fn write_files(&self) -> io::Result<()> {
        let d = &self.dir;
        for sub in ["conf", "spool", "proc", "lock", "socket", "tls", "log"] {
            fs::create_dir_all(d.join(sub))?;
        }
        make_certificates(&d.join("tls"))?;
        let dd = d.display();
        fs::write(
            d.join("imapd.conf"),
            format!(
                "configdirectory: {dd}/conf
defaultpartition: default
partition-default: {dd}/spool
proc_path: {dd}/proc
mboxname_lockpath: {dd}/lock
lmtpsocket: {dd}/socket/lmtp
idlesocket: {dd}/socket/idle
notifysocket: {dd}/socket/notify
admins: cyrus
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {dd}/sasldb2
sasl_mech_list: PLAIN LOGIN
autocreate_quota: 0
unixhierarchysep: yes
altnamespace: no
tls_server_cert: {dd}/tls/cert.pem
tls_server_key: {dd}/tls/key.pem
syslog_prefix: inboxd-cyrus-{port}
imapidlepoll: 1
",
                port = self.port
            ),
        )?;
        let bin = bin_dir();
        let bin = bin.display();
        fs::write(
            d.join("cyrus.conf"),
            format!(
                "START {{
  recover cmd=\"ctl_cyrusdb -C {dd}/imapd.conf -r\"
}}
SERVICES {{
  imap  cmd=\"{bin}/imapd -C {dd}/imapd.conf -U 30\" listen=\"127.0.0.1:{port}\" prefork=0 maxchild=100
  imaps cmd=\"{bin}/imapd -s -C {dd}/imapd.conf -U 30\" listen=\"127.0.0.1:{tls_port}\" prefork=0 maxchild=100
}}
DAEMON {{
  idled cmd=\"{bin}/idled -C {dd}/imapd.conf\"
}}
",
                port = self.port,
                tls_port = self.tls_port
            ),
        )?;
        for (user, password) in USERS
            .iter()
            .filter(|(u, _)| *u != "quoted")
            .chain(&[("cyrus", "cyruspw")])
        {
            let mut child = Command::new("saslpasswd2")
                .args(["-p", "-c", "-f"])
                .arg(d.join("sasldb2"))
                .arg(user)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            io::Write::write_all(&mut child.stdin.take().expect("piped"), password.as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "saslpasswd2 {user}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        let status = Command::new("chown").args(["-R", "cyrus:mail"]).arg(d).status()?;
        if !status.success() {
            return Err(io::Error::other("chown -R cyrus:mail failed"));
        }
        fs::set_permissions(d.join("sasldb2"), fs::Permissions::from_mode(0o640))?;
        Ok(())
    }

    fn launch(&mut self) -> io::Result<()> {
        let d = &self.dir;
        // In the foreground (no -d): our child, in a process group of its own.
        let mut cmd = Command::new(MASTER);
        cmd.arg("-C")
            .arg(d.join("imapd.conf"))
            .arg("-M")
            .arg(d.join("cyrus.conf"))
            .arg("-p")
            .arg(d.join("master.pid"));
        self.child = Some(spawn_in_group(cmd, &d.join("stderr.log"))?);
        let idle_socket = d.join("socket/idle");
        wait_listening(
            &mut self.child,
            &[self.port, self.tls_port],
            &d.join("stderr.log"),
            "cyrus master",
            || idle_socket.exists(),
        )
    }

    /// Stops the instance (SIGTERM to its process group, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        stop_group(&mut self.child);
    }

    /// Starts the instance again after [`Cyrus::stop`], on the same ports with the same mail.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        // The idle socket of the stopped idled would make launch() think it is up.
        let _ = fs::remove_file(self.dir.join("socket/idle"));
        self.launch()
    }
}

impl Drop for Cyrus {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
