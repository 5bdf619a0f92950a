//! Waiting for news: IDLE with a silence watchdog (or a plain wait where the server has no
//! IDLE), and what unsolicited responses said in between.

use super::*;

impl Session {
    /// Drops unsolicited responses collected so far; returns whether any announced new mail
    /// (EXISTS or RECENT). The caller resyncs by UID range anyway: this is only a hint.
    pub fn drain_unsolicited(&mut self) -> bool {
        let mut news = false;
        // Bounded: at most what the library's channel holds (it drops beyond 100).
        while let Ok(r) = self.inner.unsolicited_responses.try_recv() {
            match r {
                async_imap::types::UnsolicitedResponse::Exists(n) => {
                    news |= n > self.exists;
                    self.exists = n;
                }
                async_imap::types::UnsolicitedResponse::Expunge(_) => self.exists = self.exists.saturating_sub(1),
                _ => {}
            }
        }
        self.news |= news;
        news
    }

    /// Whether the server announced new mail (EXISTS/RECENT, in any response) since the last
    /// call. A message announced in the answer to some other command would not be announced
    /// again in the next IDLE, so the watcher checks this before it waits.
    pub fn take_news(&mut self) -> bool {
        self.drain_unsolicited();
        std::mem::take(&mut self.news)
    }

    /// IDLE (RFC 2177) for at most `max`; leaves early on server activity, silence longer
    /// than `idle_silence`, or when `interrupt` completes. Ends with DONE under its deadline.
    pub async fn idle(
        self,
        max: Duration,
        interrupt: impl Future<Output = ()>,
    ) -> Result<(Session, WaitEnd), ImapError> {
        let Session {
            inner,
            caps,
            timeouts,
            selected,
            token_due,
            news,
            exists,
            meter,
            special,
            slots,
            utf8,
        } = self;
        let mut handle = inner.idle();
        deadline("IDLE", timeouts.command, async {
            handle.init().await.map_err(cmd("IDLE"))
        })
        .await?;
        let end = {
            let (wait, stop) = handle.wait_with_timeout(timeouts.idle_silence);
            tokio::pin!(wait);
            tokio::pin!(interrupt);
            let mut stop = Some(stop);
            let mut reason = None;
            let sleep = tokio::time::sleep(max);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    r = &mut wait => {
                        let r = r.map_err(cmd("IDLE"))?;
                        break match (reason, r) {
                            (Some(reason), _) => reason,
                            (None, IdleResponse::Timeout) => WaitEnd::Silence,
                            (None, IdleResponse::ManualInterrupt) => {
                                return Err(ImapError::Bye("connection closed during IDLE".into()));
                            }
                            (None, IdleResponse::NewData(data)) => {
                                if let Response::Data { status: Status::Bye, outcome } = data.parsed() {
                                    return Err(ImapError::Bye(outcome.information.as_deref().unwrap_or("").to_string()));
                                }
                                WaitEnd::Activity
                            }
                        };
                    }
                    _ = &mut sleep, if reason.is_none() => {
                        reason = Some(WaitEnd::Elapsed);
                        stop.take();
                    }
                    _ = &mut interrupt, if reason.is_none() => {
                        reason = Some(WaitEnd::Interrupted);
                        stop.take();
                    }
                }
            }
        };
        let inner = deadline("DONE", timeouts.done, async {
            handle.done().await.map_err(cmd("DONE"))
        })
        .await?;
        let mut session = Session {
            inner,
            caps,
            timeouts,
            selected,
            token_due,
            news,
            exists,
            meter,
            special,
            slots,
            utf8,
        };
        session.drain_unsolicited();
        Ok((session, end))
    }
}
