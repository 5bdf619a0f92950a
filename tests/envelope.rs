//! `inboxd.message.v1` from broken MIME: every input gives an envelope that validates against
//! the JSON Schema, and nothing panics. Hand-made hostile cases, then a property test over
//! mutations of them.

use inboxd::envelope::{Attachments, Envelope, JsonOptions};
use inboxd::handler::{Body, Message};
use proptest::prelude::*;

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema/inboxd.message.v1.json")).unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

fn envelope(raw: &[u8], options: &JsonOptions) -> Envelope {
    let flags = vec!["\\Seen".to_string()];
    let m = Message {
        account: "a",
        folder: "INBOX",
        uidvalidity: 1,
        uid: 1,
        key: "v1-0123abcd-1-1",
        message_id: None,
        internal_date: Some("01-Jan-2026 00:00:00 +0000"),
        flags: &flags,
        gmail: None,
        body: Body::Bytes(raw),
    };
    Envelope::build(&m, options).unwrap()
}

fn check(v: &jsonschema::Validator, raw: &[u8], options: &JsonOptions) -> serde_json::Value {
    let env = envelope(raw, options);
    let value: serde_json::Value = serde_json::from_slice(&env.to_json()).unwrap();
    let errors: Vec<String> = v
        .iter_errors(&value)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    value
}

fn samples() -> Vec<(&'static str, Vec<u8>)> {
    let mut thousand = b"Subject: many\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n".to_vec();
    for i in 0..1000 {
        thousand.extend_from_slice(
            format!("--x\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=p{i}.bin\r\n\r\npart {i}\r\n").as_bytes(),
        );
    }
    thousand.extend_from_slice(b"--x--\r\n");
    vec![
        ("empty", Vec::new()),
        ("no header block", b"just some text without any header".to_vec()),
        (
            "unknown charset",
            b"Subject: =?x-unknown?q?caf=E9?=\r\nContent-Type: text/plain; charset=x-unknown\r\n\r\ncaf\xe9\r\n".to_vec(),
        ),
        (
            "truncated multipart",
            b"Subject: cut\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhal".to_vec(),
        ),
        (
            "8-bit header bytes",
            b"Subject: Gr\xfc\xdfe \xff\xfe\r\nFrom: J\xf6rg <j@example.com>\r\n\r\nbody\r\n".to_vec(),
        ),
        (
            "nested message/rfc822",
            b"Subject: outer\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nContent-Type: multipart/mixed; boundary=i\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\ninner text\r\n--i--\r\n--o--\r\n".to_vec(),
        ),
        ("a 1,000-part message", thousand),
        (
            "bad base64 attachment",
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment\r\n\r\n!!!not base64***\r\n--b--\r\n".to_vec(),
        ),
        ("NUL bytes and bare CR", b"Subject: a\0b\rc\r\n\r\n\0\0\r\r".to_vec()),
        (
            "garbage addresses",
            b"From: <<<@@>>>, \"unterminated\r\nTo: ;;;,,,\r\nDate: not a date\r\n\r\nx".to_vec(),
        ),
    ]
}

#[test]
fn broken_mime_still_gives_a_valid_envelope() {
    let v = schema();
    let options = JsonOptions {
        attachments: Attachments::Inline,
        raw: true,
        ..JsonOptions::default()
    };
    for (name, raw) in samples() {
        let value = check(&v, &raw, &options);
        assert_eq!(value["size"], raw.len(), "{name}");
    }
    let thousand = &samples()[6].1;
    let value = check(&v, thousand, &JsonOptions::default());
    assert_eq!(value["attachments"].as_array().unwrap().len(), 1000);
    let eight_bit = check(&v, &samples()[4].1, &JsonOptions::default());
    assert!(
        eight_bit["raw_headers"][0]["value"]
            .as_str()
            .unwrap()
            .contains('\u{fffd}')
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn mutated_mime_never_panics_and_always_validates(
        pick in 0usize..10,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..24),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut raw = samples()[pick].1.clone();
        for (at, byte, op) in edits {
            if raw.is_empty() {
                raw.push(byte);
                continue;
            }
            let i = at.index(raw.len());
            match op {
                0 => raw[i] = byte,
                1 => raw.insert(i, byte),
                _ => {
                    raw.remove(i);
                }
            }
        }
        if truncate && !raw.is_empty() {
            raw.truncate(cut.index(raw.len()));
        }
        let v = schema();
        check(&v, &raw, &JsonOptions { attachments: Attachments::Inline, raw: true, ..JsonOptions::default() });
    }
}

#[test]
fn gmail_metadata_validates_and_a_wrong_shape_does_not() {
    let v = schema();
    let flags = Vec::new();
    let gmail = inboxd::imap::Gmail {
        msgid: u64::MAX,
        thrid: 1,
        labels: vec!["\\Inbox".into(), "Kunden/Müller".into()],
    };
    // Gmail's key form (one key for the message under all its labels).
    let gm_key = inboxd::core::key::gmail_key("a", gmail.msgid);
    let m = Message {
        account: "a",
        folder: "INBOX",
        uidvalidity: 1,
        uid: 1,
        key: &gm_key,
        message_id: None,
        internal_date: None,
        flags: &flags,
        gmail: Some(&gmail),
        body: Body::Bytes(b"Subject: hi\r\n\r\nbody\r\n"),
    };
    let env = Envelope::build(&m, &JsonOptions::default()).unwrap();
    let mut value: serde_json::Value = serde_json::from_slice(&env.to_json()).unwrap();
    assert!(
        v.is_valid(&value),
        "{:?}",
        v.iter_errors(&value).map(|e| e.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(value["gmail"]["msgid"], u64::MAX.to_string());
    // The schema is not a formality: a number where a decimal string belongs is refused, and
    // so is a key of neither form.
    let mut wrong = value.clone();
    wrong["key"] = serde_json::json!("gm2-00-1");
    assert!(!v.is_valid(&wrong));
    value["gmail"]["msgid"] = serde_json::json!(1);
    assert!(!v.is_valid(&value));
}
