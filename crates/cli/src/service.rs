//! Talking to a service manager (systemd `Type=notify`): `READY=1` once every watch has
//! started, a one-line `STATUS=` kept current, `WATCHDOG=1` pings while the runtime runs, and
//! `STOPPING=1` at shutdown. Without `$NOTIFY_SOCKET` every call does nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use inboxd::watcher::Health;
use sd_notify::NotifyState;

/// How long `READY=1` waits for watches that have neither connected nor failed yet: a server
/// that does not answer must not hold the unit in "activating" until systemd gives up.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// How often `STATUS=` is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Whether a watch has started: it connected, or its first attempt failed (it then retries
/// along its schedule, which is a state of a running service, not a start-up).
fn started(h: &Health) -> bool {
    h.connected || h.last_sync.is_some() || h.last_error.is_some() || h.state == "failed"
}

/// `12 watches: 11 idle, 1 reconnecting`.
pub fn summary(healths: &[Health]) -> String {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for h in healths {
        let s = h.state.as_str();
        let kind = if s == "idle" || s == "polling" {
            "idle"
        } else if s.starts_with("waiting") {
            "reconnecting"
        } else if s.starts_with("retrying") {
            "retrying a message"
        } else {
            s
        };
        *by.entry(kind).or_default() += 1;
    }
    let parts: Vec<String> = by.iter().map(|(k, n)| format!("{n} {k}")).collect();
    format!(
        "{} watch{}: {}",
        healths.len(),
        if healths.len() == 1 { "" } else { "es" },
        parts.join(", ")
    )
}

fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Starts the notifications, if a service manager listens. The task ends with the process.
pub fn start(watches: crate::http::Views) -> Option<tokio::task::JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    if let Some(period) = sd_notify::watchdog_enabled() {
        // Pinged from the runtime itself: a wedged runtime stops the pings, and systemd acts.
        let every = (period / 2).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                notify(&[NotifyState::Watchdog]);
            }
        });
    }
    Some(tokio::spawn(async move {
        let healths = || {
            watches
                .read()
                .map(|w| w.iter().map(|v| v.health.get()).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let begun = tokio::time::Instant::now();
        while !healths().iter().all(started) && begun.elapsed() < READY_WITHIN {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = summary(&healths());
        notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        let mut last = status;
        loop {
            tokio::time::sleep(STATUS_EVERY).await;
            let status = summary(&healths());
            if status != last {
                notify(&[NotifyState::Status(&status)]);
                last = status;
            }
        }
    }))
}

/// Tells the service manager that the config is being reloaded.
pub fn reloading() {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => notify(&[NotifyState::Reloading, now]),
            Err(_) => notify(&[NotifyState::Reloading]),
        }
    }
}

/// Tells the service manager that the reload is over.
pub fn reloaded() {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        notify(&[NotifyState::Ready]);
    }
}

/// Tells the service manager that the service is stopping.
pub fn stopping() {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        notify(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: finishing deliveries in flight"),
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_counts_watches_by_what_they_do() {
        let h = |state: &str| Health {
            state: state.into(),
            ..Health::default()
        };
        let all = [h("idle"), h("polling"), h("waiting 60s to reconnect"), h("catching up")];
        assert_eq!(summary(&all), "4 watches: 1 catching up, 2 idle, 1 reconnecting");
        assert_eq!(summary(&all[..1]), "1 watch: 1 idle");
    }
}
