//! The OAuth2 test bed: a Dovecot that validates JWT access tokens itself, and the
//! authorization server in `tests/oauth2/` (oauth2-mock-server behind a policy wrapper).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use inboxd_testbed::{Dovecot, Options};

pub struct AuthServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl AuthServer {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.url())
    }

    /// Calls a test control endpoint, e.g. `/test/fail-next?status=503&count=3`.
    pub async fn control(&self, path: &str) -> serde_json::Value {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", self.url()))
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    }

    pub async fn stats(&self) -> serde_json::Value {
        self.control("/test/stats").await
    }

    /// A client-credentials token for `client`, fetched directly (for the token command).
    pub async fn fetch_token(&self, client: &str, secret: &str) -> String {
        let r = reqwest::Client::new()
            .post(self.token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client),
                ("client_secret", secret),
            ])
            .send()
            .await
            .unwrap();
        let j: serde_json::Value = r.json().await.unwrap();
        j["access_token"].as_str().unwrap().to_string()
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Dovecot (accepting tokens from the issuer) and the authorization server. `clients`,
/// `service_accounts` and `refresh_tokens` are the JSON maps the wrapper takes.
pub fn start(extra: serde_json::Value) -> (Dovecot, AuthServer) {
    let port = super::free_port();
    let dv = Dovecot::start_with(Options {
        oauth2_issuer: Some(format!("http://127.0.0.1:{port}")),
        ..Default::default()
    })
    .expect("start dovecot");
    let dir = tempfile::tempdir().unwrap();
    let mut config = serde_json::json!({ "port": port, "keys_dir": dv.oauth2_keys_dir() });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    let cfg = dir.path().join("auth.json");
    std::fs::write(&cfg, config.to_string()).unwrap();
    // The repository root, also from the tests of crates/cli.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest
        .ancestors()
        .find(|d| d.join("tests/oauth2").is_dir())
        .unwrap_or(manifest);
    let script = root.join("tests/oauth2/mock-oauth2.mjs");
    let mut child = Command::new("node")
        .arg(&script)
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node is needed for the OAuth2 tests (scripts/install-deps installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("READY "),
        "authorization server did not start: {line:?} (did `npm ci` run in tests/oauth2?)"
    );
    (dv, AuthServer { child, port, _dir: dir })
}

/// A self-signed certificate and its RSA key (PKCS#8 PEM), and the public key.
pub struct KeyPair {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub public: PathBuf,
}

pub fn keypair(dir: &Path, name: &str) -> KeyPair {
    let (cert, key, public) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    );
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=inboxd-test-app",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let ok = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    KeyPair { cert, key, public }
}
