//! Progress of `inboxd once`: a bar on a terminal (messages and bytes, rate, ETA), a plain log
//! line every ten seconds otherwise, and a summary at the end either way. Read from the
//! watches' health; it decides nothing.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use inboxd::watcher::HealthHandle;

/// Settled and still listed messages, and bytes fetched, over every watch.
fn totals(watches: &[HealthHandle]) -> (u64, u64, u64) {
    watches
        .iter()
        .map(HealthHandle::get)
        .fold((0, 0, 0), |(done, left, bytes), h| {
            (
                done + h.delivered + h.skipped + h.dead_lettered,
                left + h.backlog,
                bytes + h.fetched_bytes,
            )
        })
}

/// Follows the watches until the returned handle is finished with [`Progress::finish`].
pub struct Progress {
    task: tokio::task::JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
    watches: Vec<HealthHandle>,
    began: Instant,
}

impl Progress {
    pub fn start(watches: Vec<HealthHandle>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} messages, {msg}, {per_sec}, ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let began = Instant::now();
        let task = {
            let bar = bar.clone();
            let watches = watches.clone();
            tokio::spawn(async move {
                let mut last_line = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let (done, left, bytes) = totals(&watches);
                    match &bar {
                        Some(bar) => {
                            bar.set_length(done + left);
                            bar.set_position(done);
                            bar.set_message(format!("{} fetched", indicatif::HumanBytes(bytes)));
                        }
                        None if last_line.elapsed() >= Duration::from_secs(10) => {
                            last_line = Instant::now();
                            let secs = began.elapsed().as_secs_f64().max(0.001);
                            let rate = done as f64 / secs;
                            tracing::info!(
                                done,
                                left,
                                bytes,
                                rate = format!("{rate:.0} msg/s"),
                                eta = format!("{:.0}s", if rate > 0.0 { left as f64 / rate } else { 0.0 }),
                                "catching up"
                            );
                        }
                        None => {}
                    }
                }
            })
        };
        Progress {
            task,
            bar,
            watches,
            began,
        }
    }

    /// Stops following, and says what was done.
    pub fn finish(self) {
        self.task.abort();
        let (done, _, bytes) = totals(&self.watches);
        let secs = self.began.elapsed().as_secs_f64();
        if let Some(bar) = &self.bar {
            bar.set_length(done);
            bar.set_position(done);
            bar.finish_with_message(format!("{} fetched", indicatif::HumanBytes(bytes)));
        }
        tracing::info!(
            messages = done,
            bytes,
            seconds = format!("{secs:.1}"),
            "caught up: {done} message(s), {} in {secs:.1}s",
            indicatif::HumanBytes(bytes)
        );
    }
}
