//! The seed's one-shot mode as a library call.

use crate::config::Account;
use crate::imap::Session;

/// The seed's one-shot mode: connect, log in, select `folder`, run `f` on the session, log out.
///
/// ```no_run
/// use inboxd::config::{Account, TlsMode};
/// use inboxd::secret::SecretSource;
///
/// # async fn demo() -> Result<(), inboxd::imap::ImapError> {
/// let account = Account::new("demo", "imap.example.com", 993, TlsMode::Implicit, "alice",
///                            SecretSource::Env("IMAP_PASSWORD".into()));
/// let unseen = inboxd::once_with(&account, "INBOX", async |s| s.search("UNSEEN").await).await??;
/// println!("{} unseen messages", unseen.len());
/// # Ok(()) }
/// ```
pub async fn once_with<T>(
    account: &Account,
    folder: &str,
    f: impl AsyncFnOnce(&mut Session) -> T,
) -> Result<T, crate::imap::ImapError> {
    let mut session = Session::open(account).await?;
    session.select(folder).await?;
    let out = f(&mut session).await;
    session.logout().await;
    Ok(out)
}
