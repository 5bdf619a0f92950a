//! Listing and fetching: sizes above the checkpoint, whole messages in batches, and large
//! messages in pieces into a writer.

use super::*;

impl Session {
    /// The UIDs above `last_uid` with their sizes (`None` when the server gave none),
    /// internal dates and flags: `UID FETCH last+1:* (UID RFC822.SIZE INTERNALDATE FLAGS)`.
    /// The caller filters: `*` may name a message below `last_uid + 1`.
    pub async fn list_above(&mut self, last_uid: u32) -> Result<Vec<Listing>, ImapError> {
        self.list_range(last_uid, None).await
    }

    /// As [`Session::list_above`], up to `upto` when given (`UID FETCH last+1:upto ...`).
    pub async fn list_range(&mut self, last_uid: u32, upto: Option<u32>) -> Result<Vec<Listing>, ImapError> {
        let mut out = Vec::new();
        let command = self.list_command(last_uid, upto);
        self.checked("UID FETCH", &command, |resp| {
            if let Response::Fetch(_, attrs) = resp
                && let Some(item) = listed_item(attrs)
            {
                out.push(item);
            }
        })
        .await?;
        Ok(out)
    }

    /// The listing command for UIDs above `last_uid`, up to `upto` or open-ended.
    pub(super) fn list_command(&self, last_uid: u32, upto: Option<u32>) -> String {
        let from = last_uid.saturating_add(1);
        let to = upto.map_or_else(|| "*".to_string(), |u| u.max(from).to_string());
        // Gmail's identity, thread and labels come with the listing where it offers them.
        let gmail = if self.has("X-GM-EXT-1") {
            " X-GM-MSGID X-GM-THRID X-GM-LABELS"
        } else {
            ""
        };
        format!("UID FETCH {from}:{to} (UID RFC822.SIZE INTERNALDATE FLAGS{gmail})")
    }

    /// Fetches whole messages by UID with `BODY.PEEK[]`, in ascending UID order. Messages the
    /// server no longer has are simply absent from the result. A UID the server sends twice,
    /// or one not asked for, is dropped as it arrives; more than `max_bytes` of bodies in all
    /// (a server lying about sizes) fails the fetch instead of growing without bound.
    pub async fn fetch(&mut self, uids: &[u32], max_bytes: u64) -> Result<Vec<Fetched>, ImapError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let wanted: HashSet<u32> = uids.iter().copied().collect();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut total = 0u64;
        let mut over = false;
        let command = format!("UID FETCH {} (UID BODY.PEEK[])", sequence_set(uids));
        self.checked("UID FETCH", &command, |resp| {
            let Response::Fetch(_, attrs) = resp else { return };
            let (uid, body) = fetched_item(attrs);
            if let (Some(uid), Some(body)) = (uid.filter(|u| wanted.contains(u)), body) {
                if over || !seen.insert(uid) {
                    return;
                }
                total = total.saturating_add(body.len() as u64);
                if total > max_bytes {
                    over = true;
                    out.clear();
                    return;
                }
                out.push(Fetched {
                    uid,
                    body: body.to_vec(),
                });
            }
        })
        .await?;
        if over {
            return Err(ImapError::Unexpected {
                command: "UID FETCH",
                detail: format!(
                    "the server sent more than {max_bytes} bytes of message bodies for {} message(s)",
                    uids.len()
                ),
            });
        }
        out.sort_by_key(|f| f.uid);
        Ok(out)
    }

    /// Fetches one message in pieces of at most `chunk` bytes (`BODY.PEEK[]<offset.chunk>`)
    /// and writes each to `out` as it arrives, so memory holds one piece whatever the
    /// message's size, and each piece is a command with its own inactivity deadline. Returns
    /// the message's length, or `None` when the server does not have it (any more). A piece
    /// larger than asked is refused before it is read (the literal limit); more than
    /// `max_bytes` in all fails the fetch.
    pub async fn fetch_into(
        &mut self,
        uid: u32,
        chunk: u32,
        max_bytes: u64,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<Option<u64>, ImapError> {
        // Never ask for more than one byte past the limit.
        let chunk = chunk.clamp(1, u32::try_from(max_bytes.saturating_add(1)).unwrap_or(u32::MAX));
        self.set_max_literal(u64::from(chunk));
        let mut offset = 0u64;
        loop {
            let command = format!("UID FETCH {uid} (UID BODY.PEEK[]<{offset}.{chunk}>)");
            let mut got: Option<u64> = None;
            let mut problem: Option<String> = None;
            self.checked("UID FETCH", &command, |resp| {
                let Response::Fetch(_, attrs) = resp else { return };
                let Some((origin, data)) = partial_item(attrs, uid) else {
                    return;
                };
                if got.is_some() || problem.is_some() {
                    return; // a repeated answer: the first one counts
                }
                if origin.is_some_and(|o| u64::from(o) != offset) {
                    problem = Some(format!(
                        "the server answered a fetch from byte {offset} with bytes from {}",
                        origin.unwrap_or(0)
                    ));
                    return;
                }
                match out.write_all(data) {
                    Ok(()) => got = Some(data.len() as u64),
                    Err(e) => problem = Some(format!("cannot write the spool file: {e}")),
                }
            })
            .await?;
            if let Some(detail) = problem {
                return Err(ImapError::Unexpected {
                    command: "UID FETCH",
                    detail,
                });
            }
            let Some(n) = got else {
                // Gone before the first piece (or expunged while being fetched).
                return Ok(None);
            };
            offset = offset.saturating_add(n);
            if offset > max_bytes {
                return Err(ImapError::Unexpected {
                    command: "UID FETCH",
                    detail: format!("uid {uid} is larger than the limit of {max_bytes} bytes"),
                });
            }
            if n < u64::from(chunk) {
                return Ok(Some(offset));
            }
        }
    }
}

/// UID and size from one answer to `UID FETCH n:* (UID RFC822.SIZE)`.
pub(super) fn listed_item(attrs: &[AttributeValue<'_>]) -> Option<Listing> {
    let uid = attrs
        .iter()
        .find_map(|a| if let AttributeValue::Uid(u) = a { Some(*u) } else { None })?;
    let mut item = Listing {
        uid,
        size: None,
        internal_date: None,
        flags: Vec::new(),
        gmail: None,
    };
    for a in attrs {
        match a {
            AttributeValue::Rfc822Size(n) => item.size = Some(*n),
            AttributeValue::InternalDate(d) => item.internal_date = Some(clip(d.to_string(), 64)),
            AttributeValue::Flags(f) => {
                item.flags = f.iter().take(MAX_FLAGS).map(|f| clip(f.to_string(), 256)).collect();
            }
            AttributeValue::GmailMsgId(id) => item.gmail.get_or_insert_with(Gmail::default).msgid = *id,
            AttributeValue::GmailThrId(id) => item.gmail.get_or_insert_with(Gmail::default).thrid = *id,
            AttributeValue::GmailLabels(labels) => {
                // Labels are mailbox names: modified UTF-7 (Gmail offers no UTF8=ACCEPT).
                item.gmail.get_or_insert_with(Gmail::default).labels = labels
                    .iter()
                    .take(MAX_FLAGS)
                    .map(|l| {
                        let l = unescape(l);
                        clip(mutf7::decode(&l).unwrap_or(l), 256)
                    })
                    .collect();
            }
            _ => {}
        }
    }
    Some(item)
}

/// Flags kept per message (a server may send any number).
const MAX_FLAGS: usize = 64;

/// UID and whole body from one answer to `UID FETCH set (UID BODY.PEEK[])`.
pub(super) fn fetched_item<'a>(attrs: &'a [AttributeValue<'a>]) -> (Option<u32>, Option<&'a [u8]>) {
    let uid = attrs
        .iter()
        .find_map(|a| if let AttributeValue::Uid(u) = a { Some(*u) } else { None });
    let body = attrs.iter().find_map(|a| match a {
        AttributeValue::BodySection {
            section: None,
            data: Some(d),
            ..
        } => Some(d.as_ref()),
        AttributeValue::Rfc822(Some(d)) => Some(d.as_ref()),
        _ => None,
    });
    (uid, body)
}

/// Origin and data of the whole-message section from one answer to
/// `UID FETCH uid (UID BODY.PEEK[]<offset.length>)`, if it is for `uid`. A NIL section is
/// empty data (RFC 3501: a start past the end gives an empty string).
pub(super) fn partial_item<'a>(attrs: &'a [AttributeValue<'a>], uid: u32) -> Option<(Option<u32>, &'a [u8])> {
    let (got, _) = fetched_item(attrs);
    if got != Some(uid) {
        return None;
    }
    attrs.iter().find_map(|a| match a {
        AttributeValue::BodySection {
            section: None,
            index,
            data,
        } => Some((*index, data.as_deref().unwrap_or(&[]))),
        _ => None,
    })
}
