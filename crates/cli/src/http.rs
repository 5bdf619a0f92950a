//! The HTTP endpoint of `inboxd run` (`[http]`): Prometheus metrics, liveness, readiness, the
//! watches' health and the dead letters as JSON, and the replay of a dead letter. Off unless
//! configured; on loopback by default; every path but `/healthz` needs the bearer token when
//! one is set (always, off loopback). The one action must be a same-origin JSON request; no
//! response carries a secret.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use inboxd::config::Http;
use inboxd::watcher::{Health, HealthHandle};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Refuses a state-changing request a browser may have sent on another site's behalf: it must
/// be JSON (a cross-site form cannot send `application/json` without a preflight, which this
/// endpoint never grants), and an `Origin` or `Sec-Fetch-Site` it carries must say same-origin.
async fn same_origin(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let json = text(header::CONTENT_TYPE).is_some_and(|t| t.starts_with("application/json"));
    let host = text(header::HOST).unwrap_or_default();
    let origin_ok = text(header::ORIGIN).is_none_or(|o| o == format!("http://{host}"));
    let site_ok = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v == "same-origin" || v == "none");
    if !(json && origin_ok && site_ok) {
        return (
            StatusCode::FORBIDDEN,
            "a state-changing request must be `Content-Type: application/json` from this origin\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// One watch as the endpoint sees it.
#[derive(Clone)]
pub struct WatchView {
    pub account: String,
    pub folder: String,
    pub health: HealthHandle,
}

/// A reload asked over HTTP, and where its outcome goes.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<String, String>>;

/// The running watches, replaced when the config is reloaded.
pub type Views = Arc<std::sync::RwLock<Vec<WatchView>>>;

struct AppState {
    watches: Views,
    /// OAuth2 credentials, one per token cache: (name, source).
    credentials: Vec<(String, inboxd::oauth2::TokenSource)>,
    store: Arc<dyn inboxd::store::Store>,
    /// The running configuration (replaced on reload), for replays.
    config: Arc<std::sync::RwLock<inboxd::config::Config>>,
    reloads: tokio::sync::mpsc::Sender<ReloadRequest>,
    token: Option<inboxd::secret::Secret>,
    unready_after: Duration,
    unready_on_dead_letters: bool,
}

/// Binds the endpoint and serves it until the returned task is aborted. Fails (before any
/// watch starts) if the address cannot be bound or the token cannot be read.
pub async fn serve(
    config: &Http,
    watches: Views,
    credentials: Vec<(String, inboxd::oauth2::TokenSource)>,
    store: Arc<dyn inboxd::store::Store>,
    running_config: Arc<std::sync::RwLock<inboxd::config::Config>>,
    reloads: tokio::sync::mpsc::Sender<ReloadRequest>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let token = match &config.token {
        Some(source) => Some(source.resolve().await.map_err(|e| anyhow::anyhow!("http.token: {e}"))?),
        None => None,
    };
    let state = Arc::new(AppState {
        watches,
        credentials,
        store,
        config: running_config,
        reloads,
        token,
        unready_after: config.unready_after,
        unready_on_dead_letters: config.unready_on_dead_letters,
    });
    let protected = axum::Router::new()
        .route("/", axum::routing::get(page))
        .route("/metrics", axum::routing::get(metrics))
        .route("/readyz", axum::routing::get(readyz))
        .route("/api/v1/watches", axum::routing::get(watches_json))
        .route("/api/v1/dead-letters", axum::routing::get(dead_letters))
        .route(
            "/api/v1/dead-letters/{key}/replay",
            axum::routing::post(replay).route_layer(axum::middleware::from_fn(same_origin)),
        )
        .route(
            "/api/v1/reload",
            axum::routing::post(reload).route_layer(axum::middleware::from_fn(same_origin)),
        )
        .route(
            "/api/v1/accounts",
            axum::routing::get(accounts_json)
                .post(add_account)
                .route_layer(axum::middleware::from_fn(same_origin_for_changes)),
        )
        .route(
            "/api/v1/accounts/{name}",
            axum::routing::delete(remove_account).route_layer(axum::middleware::from_fn(same_origin)),
        )
        .route(
            "/api/v1/dead-letters/{key}/ack",
            axum::routing::post(acknowledge).route_layer(axum::middleware::from_fn(same_origin)),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authorize));
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .merge(protected)
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("http.listen: cannot listen on {}: {e}", config.listen))?;
    let bound: SocketAddr = listener.local_addr()?;
    tracing::info!(listen = %bound, "HTTP endpoint up (/metrics, /healthz, /readyz, /api/v1/watches)");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP endpoint stopped");
        }
    }))
}

/// Lets a request through when no token is configured, or when it carries it as
/// `Authorization: Bearer <token>` (compared in constant time).
async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.expose().as_bytes()).into();
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a bearer token is required\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    account: String,
    folder: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    account: String,
    folder: String,
    class: String,
}

/// A watch's histogram as it is at the scrape: its buckets are filled from [`Health`], not
/// observed here (prometheus-client's own histogram can only observe).
#[derive(Debug, Default)]
struct HistogramSnapshot(std::sync::Mutex<inboxd::watcher::Histogram>);

impl prometheus_client::metrics::TypedMetric for HistogramSnapshot {
    const TYPE: prometheus_client::metrics::MetricType = prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for HistogramSnapshot {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = self.0.lock().map(|h| h.clone()).unwrap_or_default();
        // The last bucket is +Inf.
        let buckets: Vec<(f64, u64)> = inboxd::watcher::LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(h.counts.iter().copied())
            .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            h.sum_micros as f64 / 1e6,
            h.count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    credential: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// The metrics of every watch, in the OpenMetrics text format, from the watches' health at
/// this moment (counters are the watches' own totals since the process started).
fn encode(watches: &[(WatchLabels, Health)], tokens: &[(String, (u64, u64))]) -> String {
    let mut registry = Registry::with_prefix("inboxd");
    let counter = |registry: &mut Registry, name: &str, help: &str, value: &dyn Fn(&Health) -> u64| {
        let family = Family::<WatchLabels, Counter>::default();
        for (labels, h) in watches {
            family.get_or_create(labels).inc_by(value(h));
        }
        registry.register(name, help, family);
    };
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: &dyn Fn(&Health) -> Option<i64>| {
        let family = Family::<WatchLabels, Gauge>::default();
        for (labels, h) in watches {
            if let Some(v) = value(h) {
                family.get_or_create(labels).set(v);
            }
        }
        registry.register(name, help, family);
    };
    counter(
        &mut registry,
        "messages_delivered",
        "Messages every target of their route acknowledged",
        &|h| h.delivered,
    );
    counter(
        &mut registry,
        "delivery_failures",
        "Failed delivery attempts (each retry counts)",
        &|h| h.failed,
    );
    counter(
        &mut registry,
        "messages_dead_lettered",
        "Messages given up on and dead-lettered",
        &|h| h.dead_lettered,
    );
    counter(
        &mut registry,
        "messages_skipped",
        "Messages settled without delivery (routing skip, duplicate after a UIDVALIDITY change)",
        &|h| h.skipped,
    );
    counter(
        &mut registry,
        "fetched_bytes",
        "Message bytes fetched from the server",
        &|h| h.fetched_bytes,
    );
    counter(
        &mut registry,
        "panics",
        "Panics caught in the watcher or a handler",
        &|h| h.panics,
    );
    let reconnects = Family::<ClassLabels, Counter>::default();
    for (labels, h) in watches {
        for (class, n) in &h.reconnects_by_class {
            reconnects
                .get_or_create(&ClassLabels {
                    account: labels.account.clone(),
                    folder: labels.folder.clone(),
                    class: (*class).to_string(),
                })
                .inc_by(*n);
        }
    }
    registry.register("reconnects", "Sessions lost, by failure class", reconnects);
    let as_i64 = |v: u64| i64::try_from(v).ok();
    gauge(
        &mut registry,
        "watch_connected",
        "1 while the watch has a session, else 0",
        &|h| Some(i64::from(h.connected)),
    );
    gauge(
        &mut registry,
        "backlog_messages",
        "Messages listed above the checkpoint and not yet settled",
        &|h| as_i64(h.backlog),
    );
    gauge(
        &mut registry,
        "oldest_pending_timestamp_seconds",
        "The server's INTERNALDATE of the oldest message listed and not yet settled (absent when none)",
        &|h| h.oldest_pending,
    );
    gauge(
        &mut registry,
        "last_sync_timestamp_seconds",
        "When the watch last caught up with its folder (Unix time)",
        &|h| h.last_sync.and_then(as_i64),
    );
    gauge(
        &mut registry,
        "last_delivery_timestamp_seconds",
        "When a message was last delivered (Unix time)",
        &|h| h.last_delivery.and_then(as_i64),
    );
    gauge(
        &mut registry,
        "disconnected_since_timestamp_seconds",
        "Since when the watch has had no session (Unix time); absent while connected",
        &|h| h.disconnected_since.and_then(as_i64),
    );
    for (name, help, pick) in [
        (
            "handler_duration_seconds",
            "How long each delivery to the targets took",
            (|h: &Health| h.handler_seconds.clone()) as fn(&Health) -> inboxd::watcher::Histogram,
        ),
        (
            "new_mail_latency_seconds",
            "From the server's notification of new mail in IDLE to the message acknowledged",
            |h: &Health| h.new_mail_seconds.clone(),
        ),
    ] {
        let family = Family::<WatchLabels, HistogramSnapshot>::default();
        for (labels, h) in watches {
            if let Ok(mut slot) = family.get_or_create(labels).0.lock() {
                *slot = pick(h);
            }
        }
        registry.register(name, help, family);
    }
    let refreshes = Family::<TokenLabels, Counter>::default();
    for (credential, (ok, failed)) in tokens {
        for (result, n) in [("ok", ok), ("error", failed)] {
            refreshes
                .get_or_create(&TokenLabels {
                    credential: credential.clone(),
                    result: result.into(),
                })
                .inc_by(*n);
        }
    }
    registry.register(
        "token_refreshes",
        "OAuth2 access tokens requested from the token endpoint, by result",
        refreshes,
    );
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .set(1);
    registry.register("build_info", "The running inboxd's version", build);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

fn snapshot(state: &AppState) -> Vec<(WatchLabels, Health)> {
    let watches = state.watches.read().map(|w| w.clone()).unwrap_or_default();
    watches
        .iter()
        .map(|w| {
            (
                WatchLabels {
                    account: w.account.clone(),
                    folder: w.folder.clone(),
                },
                w.health.get(),
            )
        })
        .collect()
}

/// OpenMetrics to a scraper that asks for it (Prometheus does), else the classic text format
/// (what `promtool check metrics`, older scrapers and people read).
async fn metrics(State(state): State<Arc<AppState>>, request_headers: HeaderMap) -> Response {
    let open_metrics = request_headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let tokens: Vec<(String, (u64, u64))> = state
        .credentials
        .iter()
        .map(|(name, source)| (name.clone(), source.refreshes()))
        .collect();
    let text = encode(&snapshot(&state), &tokens);
    let mut headers = HeaderMap::new();
    if open_metrics {
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        (headers, text).into_response()
    } else {
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        (headers, classic(&text)).into_response()
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics text: a counter's `# HELP` and
/// `# TYPE` name its `_total` series, and there is no `# EOF`. (The client library encodes
/// OpenMetrics only; these are the two differences for the metric types used here.)
fn classic(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Why a watch is not ready, if it is not.
fn unready(h: &Health, now: u64, unready_after: Duration) -> Option<String> {
    let error = h.last_error.as_deref().unwrap_or("no error recorded");
    if h.state == "failed" {
        return Some(format!("failed: {error}"));
    }
    match h.disconnected_since {
        Some(since) if now.saturating_sub(since) > unready_after.as_secs() => Some(format!(
            "disconnected for {}s (more than {}s): {error}",
            now.saturating_sub(since),
            unready_after.as_secs()
        )),
        _ => None,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Dead letters no operator acknowledged, per watch, when they count against readiness.
async fn unacknowledged(state: &AppState) -> Vec<(String, String, u64)> {
    if !state.unready_on_dead_letters {
        return Vec::new();
    }
    state.store.unacknowledged_dead().await.unwrap_or_default()
}

/// 200 when every watch is ready; 503 with one line per watch that is not.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let now = unix_now();
    let mut reasons: Vec<String> = snapshot(&state)
        .iter()
        .filter_map(|(l, h)| {
            unready(h, now, state.unready_after).map(|why| format!("{}/{}: {why}", l.account, l.folder))
        })
        .collect();
    for (account, folder, n) in unacknowledged(&state).await {
        reasons.push(format!(
            "{account}/{folder}: {n} dead letter(s) not acknowledged (replay them, or `inboxd ack KEY`)"
        ));
    }
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", reasons.join("\n"))).into_response()
    }
}

/// The dead letters, newest first, with the targets that already have each.
async fn dead_letters(State(state): State<Arc<AppState>>) -> Response {
    let rows = match state.store.by_status(inboxd::store::DeliveryStatus::Dead, 1000).await {
        Ok(rows) => rows,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    };
    let mut list = Vec::new();
    for d in rows {
        let done = state.store.targets_done(&d.key).await.unwrap_or_default();
        list.push(serde_json::json!({
            "key": d.key,
            "account": d.account,
            "folder": d.folder,
            "uid": d.uid,
            "message_id": d.message_id,
            "target_key": (!d.target_key.is_empty()).then_some(&d.target_key),
            "attempts": d.attempts,
            "last_error": d.last_error,
            "route": d.route,
            "targets_done": done,
            "acknowledged": d.acknowledged,
            "updated_at": d.updated_at,
        }));
    }
    axum::Json(serde_json::json!({ "dead_letters": list })).into_response()
}

/// Reloads the config (as SIGHUP does) and answers how it went: 200, or 409 when refused.
async fn reload(State(state): State<Arc<AppState>>) -> Response {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if state.reloads.send(tx).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "inboxd is stopping\n").into_response();
    }
    match rx.await {
        Ok(Ok(done)) => axum::Json(serde_json::json!({ "reloaded": done })).into_response(),
        Ok(Err(refused)) => (StatusCode::CONFLICT, format!("{refused}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "inboxd is stopping\n").into_response(),
    }
}

/// `same_origin` for every method but GET.
async fn same_origin_for_changes(request: Request, next: Next) -> Response {
    if request.method() == axum::http::Method::GET {
        return next.run(request).await;
    }
    same_origin(request, next).await
}

fn config_path(state: &AppState) -> Option<std::path::PathBuf> {
    state.config.read().ok().map(|c| c.path.clone())
}

/// The accounts of the config file and of the database (as `inboxd account list --json`).
async fn accounts_json(State(state): State<Arc<AppState>>) -> Response {
    let Some(path) = config_path(&state) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let mut out = Vec::new();
    match crate::accounts::list_command(&path, true, &mut out).await {
        Ok(()) => ([(header::CONTENT_TYPE, "application/json")], out).into_response(),
        Err(e) => (StatusCode::CONFLICT, format!("{e:#}\n")).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct AccountBody {
    /// The account's config text (TOML), as `inboxd account add` reads it.
    config: String,
    #[serde(default)]
    replace: bool,
}

/// Stores an account (as `inboxd account add` does): 201, 409 if it exists and `replace` is
/// not set, 422 if its text is not a valid account.
async fn add_account(State(state): State<Arc<AppState>>, body: axum::Json<AccountBody>) -> Response {
    let Some(path) = config_path(&state) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    match crate::accounts::store(&path, &body.config, body.replace).await {
        Ok(crate::accounts::Stored::Done(message)) => (
            StatusCode::CREATED,
            axum::Json(serde_json::json!({ "stored": message })),
        )
            .into_response(),
        Ok(crate::accounts::Stored::Exists(name)) => (
            StatusCode::CONFLICT,
            format!("account {name} is already stored; send \"replace\": true to replace it\n"),
        )
            .into_response(),
        Err(e) if e.downcast_ref::<inboxd::store::StoreError>().is_some() => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")).into_response()
        }
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}\n")).into_response(),
    }
}

/// Removes a stored account (as `inboxd account remove` does).
async fn remove_account(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    let Some(path) = config_path(&state) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    match crate::accounts::remove(&path, &name).await {
        Ok(true) => axum::Json(serde_json::json!({ "removed": name })).into_response(),
        Ok(false) => (StatusCode::NOT_FOUND, format!("no account {name} is stored\n")).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")).into_response(),
    }
}

/// Marks a dead letter as seen (as `inboxd ack KEY` does).
async fn acknowledge(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(key): axum::extract::Path<String>,
) -> Response {
    match state.store.acknowledge(&key).await {
        Ok(true) => axum::Json(serde_json::json!({ "acknowledged": key })).into_response(),
        Ok(false) => (StatusCode::NOT_FOUND, format!("no dead letter with key {key}\n")).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// Delivers a dead letter again (as `inboxd replay KEY` does).
async fn replay(State(state): State<Arc<AppState>>, axum::extract::Path(key): axum::extract::Path<String>) -> Response {
    let config = match state.config.read() {
        Ok(c) => c.clone(),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    match state.store.delivery(&key).await {
        Ok(Some(d)) if d.status == inboxd::store::DeliveryStatus::Dead => {}
        Ok(_) => return (StatusCode::NOT_FOUND, format!("no dead letter with key {key}\n")).into_response(),
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
    match crate::commands::replay_with(&config, &state.store, &key).await {
        Ok(()) => {
            tracing::info!(key = %key, "dead letter replayed over HTTP");
            axum::Json(serde_json::json!({ "replayed": key })).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("{e:#}\n")).into_response(),
    }
}

/// How often the status page reloads itself.
const PAGE_REFRESH_SECS: u64 = 5;

/// The status page: one row per watch, what is retrying, the dead letters with a replay
/// button. Server-rendered (a minijinja template, escaped), refreshing itself.
async fn page(State(state): State<Arc<AppState>>) -> Response {
    let now = unix_now();
    let healths = snapshot(&state);
    let summary = crate::service::summary(&healths.iter().map(|(_, h)| h.clone()).collect::<Vec<_>>());
    let watches: Vec<serde_json::Value> = healths
        .iter()
        .map(|(l, h)| {
            let class = if unready(h, now, state.unready_after).is_some() {
                "bad"
            } else if h.connected && (h.state == "idle" || h.state == "polling" || h.state == "catching up") {
                "ok"
            } else {
                "warn"
            };
            serde_json::json!({
                "name": format!("{}/{}", l.account, l.folder),
                "state": h.state,
                "class": class,
                "last_mail": h.last_delivery.map_or("-".to_string(), |t| crate::commands::utc(t as i64)),
                "backlog": h.backlog,
                "delivered": h.delivered,
                "last_error": h.last_error.clone().unwrap_or_default(),
            })
        })
        .collect();
    let rows = |status| {
        let store = state.store.clone();
        async move {
            store
                .by_status(status, 200)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|d| {
                    serde_json::json!({
                        "key": d.key,
                        "watch": format!("{}/{}", d.account, d.folder),
                        "uid": d.uid,
                        "attempts": d.attempts,
                        "error": d.last_error,
                        "acknowledged": d.acknowledged,
                    })
                })
                .collect::<Vec<_>>()
        }
    };
    let retrying = rows(inboxd::store::DeliveryStatus::Failed).await;
    let dead = rows(inboxd::store::DeliveryStatus::Dead).await;
    let mut env = minijinja::Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    let rendered = env
        .template_from_str(include_str!("../templates/status.html"))
        .and_then(|t| {
            t.render(minijinja::context! {
                refresh => PAGE_REFRESH_SECS,
                summary => summary,
                now => crate::commands::utc(now as i64),
                watches => minijinja::Value::from(minijinja::value::Serde(&watches)),
                retrying => minijinja::Value::from(minijinja::value::Serde(&retrying)),
                dead => minijinja::Value::from(minijinja::value::Serde(&dead)),
            })
        });
    match rendered {
        Ok(html) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            html,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the page could not be rendered: {e}\n"),
        )
            .into_response(),
    }
}

/// The health of every watch, as JSON.
async fn watches_json(State(state): State<Arc<AppState>>) -> Response {
    let now = unix_now();
    let list: Vec<serde_json::Value> = snapshot(&state)
        .into_iter()
        .map(|(l, h)| {
            serde_json::json!({
                "account": l.account,
                "folder": l.folder,
                "state": h.state,
                "connected": h.connected,
                "ready": unready(&h, now, state.unready_after).is_none(),
                "unready_reason": unready(&h, now, state.unready_after),
                "last_error": h.last_error,
                "delivered": h.delivered,
                "failed": h.failed,
                "dead_lettered": h.dead_lettered,
                "skipped": h.skipped,
                "reconnects": h.reconnects,
                "reconnects_by_class": h.reconnects_by_class,
                "panics": h.panics,
                "backlog": h.backlog,
                "oldest_pending": h.oldest_pending,
                "fetched_bytes": h.fetched_bytes,
                "last_sync": h.last_sync,
                "last_delivery": h.last_delivery,
                "disconnected_since": h.disconnected_since,
            })
        })
        .collect();
    axum::Json(serde_json::json!({ "watches": list })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_format_names_counters_by_their_total() {
        let om = "# HELP inboxd_x Things.\n# TYPE inboxd_x counter\ninboxd_x_total{a=\"b\"} 3\n# HELP inboxd_g G.\n# TYPE inboxd_g gauge\ninboxd_g 1\n# EOF\n";
        assert_eq!(
            classic(om),
            "# HELP inboxd_x_total Things.\n# TYPE inboxd_x_total counter\ninboxd_x_total{a=\"b\"} 3\n# HELP inboxd_g G.\n# TYPE inboxd_g gauge\ninboxd_g 1\n"
        );
    }

    #[test]
    fn token_refreshes_and_the_oldest_pending_message_are_encoded() {
        let labels = WatchLabels {
            account: "a".into(),
            folder: "INBOX".into(),
        };
        let h = Health {
            oldest_pending: Some(1_796_035_372),
            ..Health::default()
        };
        let text = classic(&encode(&[(labels, h)], &[("cred".into(), (3, 1))]));
        for line in [
            "inboxd_token_refreshes_total{credential=\"cred\",result=\"ok\"} 3",
            "inboxd_token_refreshes_total{credential=\"cred\",result=\"error\"} 1",
            "inboxd_oldest_pending_timestamp_seconds{account=\"a\",folder=\"INBOX\"} 1796035372",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }

    #[test]
    fn readiness_fails_for_a_failed_or_long_disconnected_watch() {
        let ok = Health {
            state: "idle".into(),
            connected: true,
            ..Health::default()
        };
        assert_eq!(unready(&ok, 1000, Duration::from_secs(60)), None);
        let down = Health {
            state: "waiting 60s to reconnect".into(),
            disconnected_since: Some(900),
            last_error: Some("connection refused".into()),
            ..Health::default()
        };
        assert_eq!(unready(&down, 950, Duration::from_secs(60)), None, "not yet");
        let why = unready(&down, 1000, Duration::from_secs(60)).unwrap();
        assert!(
            why.contains("disconnected for 100s") && why.contains("connection refused"),
            "{why}"
        );
        let failed = Health {
            state: "failed".into(),
            ..Health::default()
        };
        assert!(
            unready(&failed, 0, Duration::from_secs(60))
                .unwrap()
                .starts_with("failed")
        );
    }
}
