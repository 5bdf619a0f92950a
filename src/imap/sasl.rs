//! XOAUTH2 and OAUTHBEARER (RFC 7628) as SASL authenticators.
//!
//! On failure the server sends a second challenge carrying a base64 JSON error (e.g.
//! `{"status":"401","schemes":"bearer","scope":"mail"}`). The client must answer it with an
//! empty response (XOAUTH2) or `\x01` (OAUTHBEARER, RFC 7628 §3.2.3) to get the final NO; the
//! JSON is kept so the error can say what the server objected to.

use std::sync::{Arc, Mutex};

use crate::secret::Secret;

/// The SASL mechanism carrying the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    XOAuth2,
    OAuthBearer,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::XOAuth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }
}

/// The initial client response of a mechanism.
pub fn initial_response(mechanism: Mechanism, user: &str, host: &str, port: u16, token: &Secret) -> Vec<u8> {
    match mechanism {
        Mechanism::XOAuth2 => format!("user={user}\x01auth=Bearer {}\x01\x01", token.expose()).into_bytes(),
        Mechanism::OAuthBearer => {
            // GS2 header: no channel binding, authzid = the user (commas and '=' escaped, RFC 5801).
            let authzid = user.replace('=', "=3D").replace(',', "=2C");
            format!(
                "n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {}\x01\x01",
                token.expose()
            )
            .into_bytes()
        }
    }
}

/// An authenticator that sends the token once and records the server's error challenge.
pub struct Authenticator {
    first: Option<Vec<u8>>,
    mechanism: Mechanism,
    error: Arc<Mutex<Option<String>>>,
}

impl Authenticator {
    pub fn new(mechanism: Mechanism, initial: Vec<u8>) -> (Authenticator, Arc<Mutex<Option<String>>>) {
        let error = Arc::new(Mutex::new(None));
        (
            Authenticator {
                first: Some(initial),
                mechanism,
                error: error.clone(),
            },
            error,
        )
    }
}

impl async_imap::Authenticator for Authenticator {
    type Response = Vec<u8>;

    fn process(&mut self, challenge: &[u8]) -> Vec<u8> {
        if let Some(first) = self.first.take() {
            return first;
        }
        if let Ok(mut e) = self.error.lock() {
            *e = Some(String::from_utf8_lossy(challenge).into_owned());
        }
        match self.mechanism {
            Mechanism::XOAuth2 => Vec::new(),
            Mechanism::OAuthBearer => vec![1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_imap::Authenticator as _;

    #[test]
    fn initial_responses_follow_the_specs() {
        let t = Secret::new("tok");
        assert_eq!(
            initial_response(Mechanism::XOAuth2, "a@b", "h", 993, &t),
            b"user=a@b\x01auth=Bearer tok\x01\x01"
        );
        assert_eq!(
            initial_response(Mechanism::OAuthBearer, "a,b=c", "h", 993, &t),
            b"n,a=a=2Cb=3Dc,\x01host=h\x01port=993\x01auth=Bearer tok\x01\x01"
        );
    }

    #[test]
    fn the_error_challenge_is_answered_and_kept() {
        let (mut a, err) = Authenticator::new(Mechanism::OAuthBearer, b"first".to_vec());
        assert_eq!(a.process(b""), b"first");
        assert_eq!(a.process(br#"{"status":"invalid_token"}"#), vec![1]);
        assert_eq!(err.lock().unwrap().as_deref(), Some(r#"{"status":"invalid_token"}"#));
        let (mut x, _) = Authenticator::new(Mechanism::XOAuth2, b"first".to_vec());
        x.process(b"");
        assert!(x.process(b"{}").is_empty());
    }
}
