//! NOTIFY (RFC 5465): one session told of changes in many folders, so that an account's
//! folders need not each hold an IDLE session of their own (see `crate::notify`).

use super::*;

impl Session {
    /// `NOTIFY SET (personal (MessageNew MessageExpunge MailboxName))`: news in any folder of
    /// the user's personal namespace (see `crate::notify` for why not a list of folders). A
    /// folder named by a response meanwhile goes to `heard`. Needs the `NOTIFY` capability.
    pub async fn notify_set(&mut self, heard: &mut (dyn FnMut(String) + Send)) -> Result<(), ImapError> {
        let utf8 = self.utf8;
        self.checked_inner(
            "NOTIFY",
            "NOTIFY SET (personal (MessageNew MessageExpunge MailboxName))",
            false,
            |resp| {
                if let Some(name) = named_folder(resp, utf8) {
                    heard(name);
                }
            },
        )
        .await
    }

    /// `NOOP` on a session with `NOTIFY SET` that another session is replacing: each folder
    /// named by a notification the server sent this one before the answer goes to `heard`.
    /// Called once the other session's `NOTIFY SET` is answered, it leaves no gap between the
    /// two: news until then reached this session, news after it the other.
    pub async fn notify_drain(&mut self, heard: &mut (dyn FnMut(String) + Send)) -> Result<(), ImapError> {
        let utf8 = self.utf8;
        self.checked_inner("NOOP", "NOOP", false, |resp| {
            if let Some(name) = named_folder(resp, utf8) {
                heard(name);
            }
        })
        .await
    }

    /// IDLE for at most `max` after a `NOTIFY SET`, passing each folder a notification names
    /// (`* STATUS`, `* LIST`) to `heard` as it comes, until `max` elapses, `interrupt`
    /// completes, or `idle_silence` passes without a byte; then DONE (its answer read under
    /// the `done` deadline, notifications in it passed on too). Unlike [`Session::idle`] a
    /// notification does not end the wait: one session serves every folder.
    pub async fn notify_wait(
        &mut self,
        max: Duration,
        interrupt: impl Future<Output = ()>,
        heard: &mut (dyn FnMut(String) + Send),
    ) -> Result<WaitEnd, ImapError> {
        self.end_idle().await?;
        let t = self.timeouts;
        let utf8 = self.utf8;
        let inner = &mut self.inner;
        let mut pass_on = |resp: &Response<'_>| {
            if let resp @ Response::Data {
                status: Status::Bye, ..
            } = resp
            {
                return Err(bye(resp));
            }
            if let Some(name) = named_folder(resp, utf8) {
                heard(name);
            }
            Ok(())
        };
        let id = idle::begin_idle(inner, t, &mut pass_on).await?;
        tokio::pin!(interrupt);
        let sleep = tokio::time::sleep(max);
        tokio::pin!(sleep);
        let end = loop {
            tokio::select! {
                r = tokio::time::timeout(t.idle_silence, inner.read_response()) => {
                    let Ok(r) = r else {
                        return Err(ImapError::Timeout {
                            phase: "IDLE",
                            after: t.idle_silence,
                        });
                    };
                    let resp = r
                        .map_err(|e| cmd("IDLE")(e.into()))?
                        .ok_or_else(|| ImapError::Bye("connection closed during IDLE".into()))?;
                    match resp.parsed() {
                        // The server ended the IDLE itself: no DONE to send.
                        Response::Done { tag, status, outcome } if *tag == id => {
                            tagged("IDLE", status, outcome)?;
                            return Ok(WaitEnd::Elapsed);
                        }
                        other => pass_on(other)?,
                    }
                }
                _ = &mut sleep => break WaitEnd::Elapsed,
                _ = &mut interrupt => break WaitEnd::Interrupted,
            }
        };
        idle::finish_idle(inner, &id, t, pass_on).await?;
        Ok(end)
    }
}

/// The folder (as people read it) a notification names: `* STATUS name (...)` (new or
/// expunged mail) or `* LIST (...) sep name` (created, deleted, renamed). A name that is not
/// valid modified UTF-7 is taken as it is (Dovecot 2.3 sends UTF-8 there).
fn named_folder(resp: &Response<'_>, utf8: bool) -> Option<String> {
    let name = match resp {
        Response::MailboxData(MailboxDatum::Status { mailbox, .. }) => unescape(mailbox),
        Response::MailboxData(MailboxDatum::List(list)) => unescape(&list.name),
        _ => return None,
    };
    Some(readable(utf8, name))
}
