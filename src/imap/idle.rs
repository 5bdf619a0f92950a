//! Waiting for news: IDLE with a silence watchdog (or a plain wait where the server has no
//! IDLE), and what unsolicited responses said in between.

use super::*;
use async_imap::imap_proto::RequestId;

impl Session {
    /// Drops unsolicited responses collected so far; returns whether any announced new mail
    /// (EXISTS or RECENT). The caller resyncs by UID range anyway: this is only a hint.
    pub fn drain_unsolicited(&mut self) -> bool {
        self.drain().0
    }

    /// As [`Session::drain_unsolicited`]; also whether anything came besides new mail.
    fn drain(&mut self) -> (bool, bool) {
        let (mut news, mut other) = (false, false);
        // Bounded: at most what the library's channel holds (it drops beyond 100).
        while let Ok(r) = self.inner.unsolicited_responses.try_recv() {
            match r {
                async_imap::types::UnsolicitedResponse::Exists(n) => {
                    other |= n < self.exists;
                    news |= n > self.exists;
                    self.exists = n;
                }
                async_imap::types::UnsolicitedResponse::Recent(_) => {}
                async_imap::types::UnsolicitedResponse::Expunge(_) => {
                    other = true;
                    self.exists = self.exists.saturating_sub(1);
                }
                _ => other = true,
            }
        }
        self.news |= news;
        (news, other)
    }

    /// Whether the server announced new mail (EXISTS/RECENT, in any response) since the last
    /// call. A message announced in the answer to some other command would not be announced
    /// again in the next IDLE, so the watcher checks this before it waits.
    pub fn take_news(&mut self) -> bool {
        self.drain_unsolicited();
        std::mem::take(&mut self.news)
    }

    /// IDLE (RFC 2177) for at most `max`; leaves early on server activity, silence longer
    /// than `idle_silence`, or when `interrupt` completes.
    ///
    /// The IDLE is left open: DONE goes out with the next command, written in the same go as
    /// it (on the wake path the SELECT and the listing: [`Session::select_and_list`]), so the
    /// server's answer to DONE is not one more round trip before the SELECT. Every other
    /// command ends the IDLE first and reads its answer under the `done` deadline
    /// ([`Session::end_idle`]).
    pub async fn idle(
        mut self,
        max: Duration,
        interrupt: impl Future<Output = ()>,
    ) -> Result<(Session, WaitEnd), ImapError> {
        self.end_idle().await?;
        self.idle_base = self.exists;
        let t = self.timeouts;
        let inner = &mut self.inner;
        let exists = &mut self.exists;
        // New mail announced before the server confirmed the IDLE is not announced again in
        // it: the wait ends at once then.
        let mut early = false;
        let id = begin_idle(inner, t, |other| note_unsolicited(other, exists, &mut early)).await?;
        // From here the server may end the IDLE itself (a tagged answer): then there is no
        // DONE to send.
        let mut open = true;
        let end = if early {
            WaitEnd::Activity
        } else {
            tokio::pin!(interrupt);
            let sleep = tokio::time::sleep(max);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    // `read_response` keeps what it has read in the stream's buffer when it is
                    // dropped unfinished (async-imap's own IDLE relies on the same).
                    r = tokio::time::timeout(t.idle_silence, inner.read_response()) => {
                        let Ok(r) = r else { break WaitEnd::Silence };
                        let resp = r
                            .map_err(|e| cmd("IDLE")(e.into()))?
                            .ok_or_else(|| ImapError::Bye("connection closed during IDLE".into()))?;
                        match resp.parsed() {
                            // Keep-alives ("* OK Still here") and continuations are not news.
                            Response::Data { status: Status::Ok, .. } | Response::Continue { .. } => {}
                            Response::Done { tag, status, outcome } if *tag == id => {
                                open = false;
                                tagged("IDLE", status, outcome)?;
                                break WaitEnd::Activity;
                            }
                            other => {
                                // The wake itself is the news: whatever it announced, the
                                // listing after it covers (so it is not news *during* that
                                // listing, which would make an empty one list again).
                                let new_mail = matches!(
                                    other,
                                    Response::MailboxData(MailboxDatum::Exists(n)) if *n > *exists
                                );
                                note_unsolicited(other, exists, &mut false)?;
                                break if new_mail { WaitEnd::NewMail } else { WaitEnd::Activity };
                            }
                        }
                    }
                    _ = &mut sleep => break WaitEnd::Elapsed,
                    _ = &mut interrupt => break WaitEnd::Interrupted,
                }
            }
        };
        if open {
            self.idling = Some(id);
        }
        // Anything else the library queued meanwhile makes the wake more than new mail.
        let (_, other) = self.drain();
        let end = if end == WaitEnd::NewMail && other {
            WaitEnd::Activity
        } else {
            end
        };
        Ok((self, end))
    }

    /// Leaves an IDLE left open by [`Session::idle`]: sends DONE and reads up to the IDLE's
    /// tagged answer under the `done` deadline. Nothing to do when no IDLE is open.
    pub(super) async fn end_idle(&mut self) -> Result<(), ImapError> {
        let Some(id) = self.idling.take() else {
            return Ok(());
        };
        let exists = &mut self.exists;
        let news = &mut self.news;
        finish_idle(&mut self.inner, &id, self.timeouts, |other| {
            note_unsolicited(other, exists, news)
        })
        .await
    }
}

/// Sends IDLE and reads up to the server's continuation under the `command` deadline; every
/// other response goes to `other`. A tagged answer instead (refused, or ended at once) is an
/// error: there is no IDLE to leave then.
pub(super) async fn begin_idle(
    inner: &mut Inner,
    t: Timeouts,
    mut other: impl FnMut(&Response<'_>) -> Result<(), ImapError>,
) -> Result<RequestId, ImapError> {
    deadline("IDLE", t.command, async {
        let id = inner.run_command("IDLE").await.map_err(cmd("IDLE"))?;
        loop {
            let resp = inner
                .read_response()
                .await
                .map_err(|e| cmd("IDLE")(e.into()))?
                .ok_or_else(|| ImapError::Bye("connection closed before IDLE began".into()))?;
            match resp.parsed() {
                Response::Continue { .. } => return Ok(id),
                Response::Done { tag, status, outcome } if *tag == id => {
                    tagged("IDLE", status, outcome)?;
                    return Err(ImapError::Unexpected {
                        command: "IDLE",
                        detail: "the server ended IDLE before it began".into(),
                    });
                }
                resp => other(resp)?,
            }
        }
    })
    .await
}

/// Sends DONE and reads up to the tagged answer of the IDLE `id` under the `done` deadline;
/// every other response goes to `other`.
pub(super) async fn finish_idle(
    inner: &mut Inner,
    id: &RequestId,
    t: Timeouts,
    mut other: impl FnMut(&Response<'_>) -> Result<(), ImapError>,
) -> Result<(), ImapError> {
    deadline("DONE", t.done, async {
        inner.run_command_untagged("DONE").await.map_err(cmd("DONE"))?;
        loop {
            let resp = inner
                .read_response()
                .await
                .map_err(|e| cmd("DONE")(e.into()))?
                .ok_or_else(|| ImapError::Bye("connection closed during DONE".into()))?;
            match resp.parsed() {
                Response::Done { tag, status, outcome } if tag == id => return tagged("DONE", status, outcome),
                resp => other(resp)?,
            }
        }
    })
    .await
}

/// What an untagged response outside a command's own answers says about the selected folder:
/// an EXISTS above the known count is news, an EXPUNGE lowers the count, a BYE ends the
/// session; the rest is ignored.
pub(super) fn note_unsolicited(resp: &Response<'_>, exists: &mut u32, news: &mut bool) -> Result<(), ImapError> {
    match resp {
        Response::MailboxData(MailboxDatum::Exists(n)) => {
            if *n > *exists {
                *news = true;
            }
            *exists = *n;
        }
        Response::Expunge(_) => *exists = exists.saturating_sub(1),
        Response::Data {
            status: Status::Bye, ..
        } => return Err(bye(resp)),
        _ => {}
    }
    Ok(())
}
