//! A real HTTP receiver for webhook tests (axum on loopback). It verifies every request's
//! Standard Webhooks signature with the convention's own Rust library (`standardwebhooks`),
//! records what arrived, deduplicates by `webhook-id` as a careful receiver does, and can be
//! told to answer something else than 200 for a while.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

/// `whsec_` + base64 of "inboxd-test-signing-key-32-bytes".
pub const SECRET: &str = "whsec_aW5ib3hkLXRlc3Qtc2lnbmluZy1rZXktMzItYnl0ZXM=";

#[derive(Clone, Debug)]
pub struct Received {
    pub id: String,
    pub content_type: String,
    pub body: Vec<u8>,
    /// The signature verified with the standardwebhooks library.
    pub verified: bool,
}

#[derive(Default)]
pub struct Inner {
    /// Every request, in order (repeats included).
    pub requests: Vec<Received>,
    /// Answers to give before the normal 200, one per request: (status, Retry-After).
    pub script: std::collections::VecDeque<(u16, Option<u64>)>,
    /// Answer this status to every request for these ids (e.g. 410 for one message).
    pub refuse: Vec<(String, u16)>,
}

#[derive(Clone)]
pub struct Receiver {
    pub inner: Arc<Mutex<Inner>>,
    pub url: String,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .route(
                "/moved",
                axum::routing::post(|| async { (StatusCode::FOUND, [("location", "http://127.0.0.1:9/elsewhere")]) }),
            )
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            inner,
            url: format!("http://127.0.0.1:{port}/hook"),
        }
    }

    /// Distinct ids that were answered 200, in first-arrival order (what a deduplicating
    /// receiver processed).
    pub fn accepted_ids(&self) -> Vec<String> {
        let inner = self.inner.lock().unwrap();
        let mut out: Vec<String> = Vec::new();
        for r in &inner.requests {
            if r.verified && !out.contains(&r.id) {
                out.push(r.id.clone());
            }
        }
        out
    }

    pub fn requests(&self) -> Vec<Received> {
        self.inner.lock().unwrap().requests.clone()
    }
}

async fn hook(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> Response {
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    // The library verifies UTF-8 payloads only (JSON always is).
    let verified = wh.verify(&body, &headers).is_ok();
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut inner = inner.lock().unwrap();
    let refused = inner.refuse.iter().find(|(i, _)| *i == id).map(|(_, s)| *s);
    let scripted = if refused.is_none() {
        inner.script.pop_front()
    } else {
        None
    };
    let answer = refused.map(|s| (s, None)).or(scripted);
    inner.requests.push(Received {
        id,
        content_type,
        body: body.to_vec(),
        verified: verified && answer.is_none(),
    });
    match answer {
        Some((status, retry_after)) => {
            let status = StatusCode::from_u16(status).unwrap();
            match retry_after {
                Some(s) => (status, [("retry-after", s.to_string())], "not now").into_response(),
                None => (status, "refused").into_response(),
            }
        }
        None if verified => StatusCode::NO_CONTENT.into_response(),
        None => (StatusCode::UNAUTHORIZED, "bad signature").into_response(),
    }
}
