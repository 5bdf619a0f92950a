//! `inboxd demo`: a throwaway Dovecot, a config written for it, a watcher with an exec handler,
//! a few messages appended one by one, each shown as it is processed.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use inboxd::config::Config;
use inboxd::imap::Session;
use inboxd::watcher::{Event, Mode, Watcher};
use inboxd_testbed::{self as testbed, Dovecot};

pub async fn run(count: usize) -> anyhow::Result<()> {
    if !testbed::available() {
        bail!(
            "Dovecot is not installed; run ./scripts/demo (it installs dovecot-imapd) or apt-get install -y dovecot-imapd"
        );
    }
    let dovecot = tokio::task::spawn_blocking(Dovecot::start)
        .await?
        .context("cannot start Dovecot")?;
    println!(
        "Started a throwaway Dovecot on 127.0.0.1:{} (STARTTLS) in {}",
        dovecot.port,
        dovecot.dir().display()
    );

    let work = dovecot.dir().join("demo");
    std::fs::create_dir_all(&work)?;
    let handler = work.join("handler.sh");
    std::fs::write(
        &handler,
        "#!/bin/sh\n# Reads the raw message on stdin; records what it saw.\nsubject=$(grep -m1 -i '^Subject:' | tr -d '\\r')\necho \"uid=$INBOXD_UID key=$INBOXD_KEY size=$INBOXD_SIZE $subject\" >> processed.log\n",
    )?;
    std::fs::set_permissions(&handler, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let config_text = format!(
        r#"state = "inboxd.db"

[accounts.demo]
host = "127.0.0.1"
port = {port}
tls = "starttls"
ca_file = "{ca}"
user = "alice"
password = "alicepw"

[[watch]]
account = "demo"
folder = "INBOX"
after = "seen"
deliver = {{ exec = ["./handler.sh"] }}
"#,
        port = dovecot.port,
        ca = dovecot.ca_file().display()
    );
    let config_path = work.join("inboxd.toml");
    std::fs::write(&config_path, &config_text)?;
    println!("\nConfig ({}):\n{config_text}", config_path.display());

    let config = Config::load(&config_path)?;
    let store = crate::commands::open_store(&config).await?;
    let watcher = Watcher::start(config.watches[0].clone(), store, Mode::Forever)?;
    let mut events = watcher.subscribe();
    wait_for(&mut events, |e| matches!(e, Event::CaughtUp { .. })).await?;
    println!("Watcher connected and idle. Appending {count} message(s)...\n");

    let mut sender = Session::open(&dovecot.account("alice")).await?;
    let log = work.join("processed.log");
    for n in 1..=count {
        let msg = testbed::sample_message(n, &format!("Demo message {n}"), 600);
        let t = Instant::now();
        sender.append("INBOX", &msg).await?;
        let (key, uid) = loop {
            if let Event::Delivered { key, uid, .. } =
                wait_for(&mut events, |e| matches!(e, Event::Delivered { .. })).await?
            {
                break (key, uid);
            }
        };
        let line = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .last()
            .unwrap_or("")
            .to_string();
        println!(
            "  appended message {n} -> processed in {:>4} ms: uid {uid}, key {key}\n      handler wrote: {line}",
            t.elapsed().as_millis()
        );
    }
    sender.logout().await;
    watcher.stop().await?;

    println!("\n`inboxd status` now says:");
    crate::commands::status(&config, false, &mut std::io::stdout()).await?;
    println!("\n(Dovecot delays IDLE notifications by up to ~500 ms: most of the time above, when there is any.)");
    Ok(())
}

async fn wait_for(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    pred: impl Fn(&Event) -> bool,
) -> anyhow::Result<Event> {
    let deadline = Duration::from_secs(30);
    tokio::time::timeout(deadline, async {
        loop {
            match events.recv().await {
                Ok(e) if pred(&e) => return Ok(e),
                Ok(Event::Disconnected { error: Some(err), .. }) => bail!("watcher failed: {err}"),
                Ok(_) => {}
                Err(e) => bail!("event stream ended: {e}"),
            }
        }
    })
    .await
    .context("timed out waiting for the watcher")?
}
