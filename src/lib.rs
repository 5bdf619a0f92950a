//! inboxd watches IMAP mailboxes and hands every new message, in order and with a stable
//! idempotency key, to whatever must process it: at-least-once with that key, so exactly-once
//! in effect wherever the target deduplicates on it.
//!
//! The parts, from the inside out:
//! - `inboxd_core` (re-exported as [`core`]): the pure decisions (reconnect schedule, retry,
//!   checkpoint window, UIDVALIDITY, waits, keys). No IO, no clock.
//! - [`imap`]: the IMAP session layer over `async-imap`, with a deadline on every phase.
//! - [`oauth2`]: token sources for every grant, the shared token cache, XOAUTH2/OAUTHBEARER.
//! - [`store`]: checkpoints and the delivery log (SQLite).
//! - [`handler`]: where messages go (`exec`, `maildir`, or your own [`handler::Handler`]).
//! - [`watcher`]: one task per (account, folder) that drives the core; [`watcher::Watcher`] is
//!   the long-running handle with events, `queue` and `stop`.
//! - [`daemon`]: the CLI's commands as functions, and [`once_with`], the one-shot mode.
//! - [`config`], [`secret`], [`message`]: configuration, secrets, message identity.
//!
//! A long-running watcher with a handler of your own:
//!
//! ```no_run
//! use std::sync::Arc;
//! use futures::future::BoxFuture;
//! use inboxd::handler::{Handler, HandlerError, Message};
//! use inboxd::watcher::{Event, Mode, Watcher};
//!
//! struct Print;
//! impl Handler for Print {
//!     fn deliver<'a>(&'a mut self, m: &'a Message<'a>) -> BoxFuture<'a, Result<(), HandlerError>> {
//!         Box::pin(async move {
//!             println!("{} uid {}: {} bytes", m.key, m.uid, m.body.len());
//!             Ok(())
//!         })
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = inboxd::config::Config::load("inboxd.toml".as_ref())?;
//! let store = inboxd::store::open(&config.state).await?;
//! let watcher = Watcher::with_handler(config.watches[0].clone(), store, Box::new(Print), Mode::Forever);
//! let mut events = watcher.subscribe();
//! while let Ok(event) = events.recv().await {
//!     if let Event::CaughtUp { .. } = event { break; }
//! }
//! let exists = watcher.queue(|s| Box::pin(async move { s.search("ALL").await.map(|v| v.len()) })).await??;
//! println!("{exists} messages in the folder");
//! watcher.stop().await?;
//! # Ok(()) }
//! ```

pub use inboxd_core as core;

pub mod config;
pub mod envelope;
pub mod handler;
pub mod imap;
pub mod message;
mod notify;
pub mod oauth2;
mod once;
pub mod process;
pub mod route;
pub mod sealed;
pub mod secret;
mod spawn;
pub mod spool;
pub mod store;
pub mod watcher;

pub use once::once_with;

/// The README's Rust examples are compiled as doc tests so they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
