//! inboxd watches IMAP mailboxes and hands every new message, exactly once and in order, to
//! whatever must process it.
pub mod config;
pub mod imap;
pub mod secret;
pub mod store;
