//! Secrets: values that never appear in logs, errors or `Debug` output, and where they come from.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A secret string. `Debug` and `Display` print `[redacted]`; the value is only reachable
/// through [`Secret::expose`], whose call sites are the few places that send it to a server.
/// The buffer is wiped when dropped (`zeroize`, whose volatile writes the optimiser cannot
/// remove). Equality compares values; it is used on configuration, never on what a peer sent.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(zeroize::Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(zeroize::Zeroizing::new(value.into()))
    }

    /// The secret value. Only for handing it to the server or the SASL layer.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret comes from, as written in the config:
/// `"literal"`, `{ env = "VAR" }`, `{ file = "path" }`, `{ command = ["prog", "arg"] }` or
/// `{ credential = "NAME" }` (a systemd credential: `$CREDENTIALS_DIRECTORY/NAME`, as given by
/// `LoadCredential=` or `SetCredentialEncrypted=`).
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    Literal(Secret),
    Env(String),
    File(PathBuf),
    Command(Vec<String>),
    Credential(String),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Literal(_) => f.write_str("Literal([redacted])"),
            SecretSource::Env(v) => f.debug_tuple("Env").field(v).finish(),
            SecretSource::File(p) => f.debug_tuple("File").field(p).finish(),
            SecretSource::Command(c) => f.debug_tuple("Command").field(c).finish(),
            SecretSource::Credential(n) => f.debug_tuple("Credential").field(n).finish(),
        }
    }
}

/// Why a secret could not be read. Never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} is not set or not valid UTF-8")]
    Env(String),
    #[error("cannot read secret file {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run secret command {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secret command {program} failed with {status}")]
    Command {
        program: String,
        status: std::process::ExitStatus,
    },
    #[error(
        "no systemd credential {0}: $CREDENTIALS_DIRECTORY is not set (run under systemd with LoadCredential={0}:...)"
    )]
    NoCredentials(String),
    #[error("secret from {0} is not valid UTF-8")]
    Utf8(String),
    #[error("secret command {program} did not finish within {after:?}; killed")]
    Timeout {
        program: String,
        after: std::time::Duration,
    },
    #[error("secret command {program} printed more than {limit} bytes")]
    TooLong { program: String, limit: usize },
}

/// Default deadline for a secret command (a `pass` waiting on a pinentry, a vault CLI waiting
/// on the network): after it the command's process group is killed and the attempt fails like
/// a network error, along the reconnect schedule.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Most bytes a secret command may print.
const COMMAND_OUTPUT_LIMIT: usize = 64 << 10;

impl SecretSource {
    /// Reads the secret. Files and command output lose one trailing newline (`\n` or `\r\n`),
    /// nothing else: a password may legitimately end in spaces.
    pub async fn resolve(&self) -> Result<Secret, SecretError> {
        self.resolve_within(COMMAND_TIMEOUT).await
    }

    /// As [`SecretSource::resolve`], with the deadline for a `command` source.
    pub async fn resolve_within(&self, timeout: std::time::Duration) -> Result<Secret, SecretError> {
        match self {
            SecretSource::Literal(s) => Ok(s.clone()),
            SecretSource::Env(var) => std::env::var(var)
                .map(Secret::new)
                .map_err(|_| SecretError::Env(var.clone())),
            SecretSource::File(path) => read_file(path).await,
            SecretSource::Command(argv) => {
                let program = argv.first().cloned().unwrap_or_default();
                let stdout = run_command(argv, timeout).await?;
                trimmed(stdout).ok_or(SecretError::Utf8(program))
            }
            SecretSource::Credential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| SecretError::NoCredentials(name.clone()))?;
                read_file(&Path::new(&dir).join(name)).await
            }
        }
    }

    /// Makes a `file` source relative to `base` (the config file's folder).
    pub(crate) fn relative_to(self, base: &Path) -> SecretSource {
        match self {
            SecretSource::File(p) => SecretSource::File(base.join(p)),
            other => other,
        }
    }
}

/// A secret kept in a file (a `file` source, or a systemd credential), trailing newline off.
async fn read_file(path: &Path) -> Result<Secret, SecretError> {
    let bytes = tokio::fs::read(path).await.map_err(|source| SecretError::File {
        path: path.to_path_buf(),
        source,
    })?;
    trimmed(bytes).ok_or_else(|| SecretError::Utf8(path.display().to_string()))
}

/// Runs a secret command: no stdin, stderr to inboxd's, inboxd's environment without the
/// variables that hold secrets ([`crate::process`]), its own process group killed at the
/// deadline, output capped.
async fn run_command(argv: &[String], timeout: std::time::Duration) -> Result<Vec<u8>, SecretError> {
    use tokio::io::AsyncReadExt;
    let program = argv.first().cloned().unwrap_or_default();
    let mut cmd = tokio::process::Command::new(&program);
    crate::process::confine_tool(&mut cmd);
    cmd.args(&argv[1.min(argv.len())..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    let mut child = cmd.spawn().map_err(|source| SecretError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pgid = child.id();
    let mut stdout = child.stdout.take();
    let work = async {
        let mut out = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let mut limited = s.take(COMMAND_OUTPUT_LIMIT as u64 + 1);
            let _ = limited.read_to_end(&mut out).await;
        }
        if out.len() > COMMAND_OUTPUT_LIMIT {
            // It would block on a full pipe for ever: stop it now.
            crate::process::kill_group(pgid);
        }
        (out, child.wait().await)
    };
    let result = tokio::time::timeout(timeout, work).await;
    crate::process::kill_group(pgid);
    let (out, status) = result.map_err(|_| SecretError::Timeout {
        program: program.clone(),
        after: timeout,
    })?;
    let status = status.map_err(|source| SecretError::Spawn {
        program: program.clone(),
        source,
    })?;
    if out.len() > COMMAND_OUTPUT_LIMIT {
        return Err(SecretError::TooLong {
            program,
            limit: COMMAND_OUTPUT_LIMIT,
        });
    }
    if !status.success() {
        return Err(SecretError::Command { program, status });
    }
    Ok(out)
}

fn trimmed(mut bytes: Vec<u8>) -> Option<Secret> {
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    String::from_utf8(bytes).ok().map(Secret::new)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretTable {
    env: Option<String>,
    file: Option<PathBuf>,
    command: Option<Vec<String>>,
    credential: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSecret {
    Literal(String),
    Table(SecretTable),
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = RawSecret::deserialize(d).map_err(|_| {
            D::Error::custom(
                "expected a string, { env = \"VAR\" }, { file = \"path\" }, { command = [..] } or { credential = \"NAME\" }",
            )
        })?;
        match raw {
            RawSecret::Literal(s) => Ok(SecretSource::Literal(Secret::new(s))),
            RawSecret::Table(SecretTable {
                env: Some(v),
                file: None,
                command: None,
                credential: None,
            }) => {
                crate::process::register_secret_env(&v);
                Ok(SecretSource::Env(v))
            }
            RawSecret::Table(SecretTable {
                env: None,
                file: Some(p),
                command: None,
                credential: None,
            }) => Ok(SecretSource::File(p)),
            RawSecret::Table(SecretTable {
                env: None,
                file: None,
                command: None,
                credential: Some(name),
            }) => {
                // A name, not a path: systemd's credential names cannot hold `/`.
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(D::Error::custom(format!("{name:?} is not a credential name")));
                }
                Ok(SecretSource::Credential(name))
            }
            RawSecret::Table(SecretTable {
                env: None,
                file: None,
                command: Some(c),
                credential: None,
            }) => {
                if c.is_empty() {
                    return Err(D::Error::custom("`command` needs at least a program"));
                }
                Ok(SecretSource::Command(c))
            }
            RawSecret::Table(_) => Err(D::Error::custom(
                "give exactly one of `env`, `file`, `command` or `credential`",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = SecretSource::Literal(Secret::new("hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{:?} {}", Secret::new("hunter2"), Secret::new("hunter2")).contains("hunter2"));
    }

    #[tokio::test]
    async fn file_and_command_lose_one_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "a b \n").unwrap();
        let got = SecretSource::File(p).resolve().await.unwrap();
        assert_eq!(got.expose(), "a b ");
        let cmd = SecretSource::Command(vec!["printf".into(), "x\\r\\n".into()]);
        assert_eq!(cmd.resolve().await.unwrap().expose(), "x");
    }

    #[tokio::test]
    async fn a_hanging_command_is_killed_at_its_deadline_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let cmd = SecretSource::Command(vec!["sh".into(), "-c".into(), script]);
        let e = cmd
            .resolve_within(std::time::Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(matches!(e, SecretError::Timeout { .. }), "{e:?}");
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let alive = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).is_ok_and(|s| !s.contains(") Z"));
        assert!(!alive, "the command's child survived its deadline");
    }

    #[tokio::test]
    async fn a_command_that_prints_without_end_is_capped() {
        let cmd = SecretSource::Command(vec!["yes".into()]);
        let e = cmd.resolve().await.unwrap_err();
        assert!(matches!(e, SecretError::TooLong { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn a_command_keeps_inboxd_environment_but_not_its_secrets() {
        if std::env::var_os("HOME").is_none() || std::env::var_os("PATH").is_none() {
            return;
        }
        // As if the config said `password = { env = "HOME" }`.
        crate::process::register_secret_env("HOME");
        let cmd = SecretSource::Command(vec![
            "sh".into(),
            "-c".into(),
            "echo ${HOME:-gone}:${PATH:+kept}".into(),
        ]);
        assert_eq!(cmd.resolve().await.unwrap().expose(), "gone:kept");
    }
}
