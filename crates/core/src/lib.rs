//! The decision core of inboxd.
//!
//! Everything that makes a mailbox watcher correct is decided here, as pure functions of
//! (state, input, elapsed time): nothing in this crate does IO, spawns tasks or reads the
//! clock. The async driver in the `inboxd` crate executes these decisions.
//!
//! - [`schedule`]: the reconnect schedule (stages of "retry every X until Y") and its jitter.
//! - [`retry`]: back-off for a handler that failed on one message, and when to dead-letter it.
//! - [`checkpoint`]: the durable checkpoint and the window that advances it only over the
//!   contiguous prefix of acknowledged UIDs.
//! - [`mailbox`]: what a SELECT result means for the checkpoint (first sight, UIDVALIDITY
//!   change), the dedupe window, and IMAP sequence sets.
//! - [`wait`]: after a catch-up, whether to IDLE, poll or recycle the connection, and for how long.
//! - [`failure`]: the classes of failure and what each one means for the reconnect schedule.
//! - [`key`]: the idempotency key of a message.
//! - [`lease`]: which instance owns which watch on a shared store: renewal, local trust in a
//!   lease, fair shares.
//! - [`machine`]: the watch machine, which composes all of the above into the one sequence of
//!   steps a watcher takes: `WatchMachine::on(Input, now, jitter) -> Action`.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod checkpoint;
pub mod failure;
pub mod key;
pub mod lease;
pub mod machine;
pub mod mailbox;
pub mod retry;
pub mod schedule;
pub mod wait;
