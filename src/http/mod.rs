//! The HTTP surface: one file per resource, the route list (which is also the OpenAPI
//! document), the middleware every response passes, and the server loop.

pub mod activity;
pub mod answer;
pub mod body;
pub mod conn;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod ops;
pub mod peer;
pub mod pending;
pub mod push;
pub mod registry;
mod rejections;
pub mod shed;
pub mod uploads;

use std::{
    future::Future,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, LazyLock,
    },
    time::Duration,
};

use axum::{
    http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    Router,
};
use bytes::Bytes;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::AsyncWriteExt,
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tower::ServiceExt;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Auth, config::LimitArgs, db::Db, fetched::FetchedStamps, longpoll::Hub, slots::Slots,
    spool::SpoolMemory, staging::Stager, storage::Storage,
};

/// What every handler shares, behind one `Arc`: a request's futures hold a pointer, not a
/// copy of every setting (a long poll holds its state for up to a minute, 10,000 times over).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub db: Db,
    pub auth: Auth,
    pub storage: Storage,
    pub stager: Stager,
    pub limits: LimitArgs,
    pub spool_dir: PathBuf,
    pub spool_memory: SpoolMemory,
    pub push: push::Pusher,
    /// False once shutdown starts (`stop_accepting`): /readyz answers 503 so load balancers
    /// drain us first, and long polls stop waiting.
    pub accepting: Arc<AtomicBool>,
    pub upload_slots: Slots,
    /// Relays to push workspaces, apart from staged uploads' slots.
    pub push_slots: Slots,
    pub download_slots: Slots,
    /// Long polls waiting (SPEC §10: each upload wakes its workspace's into a query each).
    pub long_poll_slots: Slots,
    pub deadlines: Deadlines,
    pub hub: Hub,
    /// fetched_at stamps of handed-over downloads, written in batches.
    pub fetched: FetchedStamps,
    /// Registrations without a claim on the workspace (REGISTRATIONS_PER_MINUTE).
    pub registrations: crate::rate::RateLimit,
    /// The same per client address (REGISTRATIONS_PER_MINUTE_PER_CLIENT).
    pub registrations_per_client: crate::rate::PerClient,
    /// TRUSTED_PROXIES: whose X-Forwarded-For names the client.
    pub trusted_proxies: crate::networks::Networks,
    /// /readyz's shared check.
    pub ready: ops::ReadyCheck,
    /// MAX_STORED_BYTES: what the fleet keeps.
    pub stored: Arc<crate::stored::Stored>,
    /// MAX_WORKSPACES.
    pub workspace_cap: Arc<registry::WorkspaceCap>,
}

/// How long clients may take (SPEC §10).
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// A JSON body must arrive whole within this.
    pub request_body: Duration,
    /// How an upload body must keep coming.
    pub upload: body::Pace,
}

impl AppState {
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// Shutdown starts: /readyz answers 503, and every waiting long poll answers now, as a
    /// wait that ended does, so its client asks another replica (held to the end of its
    /// wait, up to a minute, it would keep the drain for its whole deadline and then be cut
    /// without an answer). The flag is set before the wake: a poll that subscribes after the
    /// wake sees it before it waits.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        self.hub.wake_all();
    }
}

/// Every route, once: the router and the OpenAPI document are both derived from this list.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::limits))
        .routes(routes!(registry::register))
        .routes(routes!(registry::create))
        .routes(routes!(registry::get_workspace, registry::delete_workspace))
        .routes(routes!(registry::mint_token))
        .routes(routes!(registry::revoke_token))
        .routes(routes!(uploads::chat_upload))
        .routes(routes!(activity::list))
        .routes(routes!(pending::list))
        .routes(routes!(pending::content, pending::content_head))
        .routes(routes!(pending::ack))
}

/// The OpenAPI document as served at /openapi.json and committed as deploy/openapi.json.
/// Shared, not copied: a connection that asks for it and does not read its answer holds a
/// reference, not 51 KB of its own (3,000 such connections took 200 MiB, a resource probe).
pub fn document() -> Bytes {
    static DOC: LazyLock<Bytes> =
        LazyLock::new(|| Bytes::from(openapi::render(routes().into_openapi())));
    DOC.clone()
}

pub fn router(state: AppState, cors_origins: &[String]) -> Router {
    let (router, _) = routes().split_for_parts();
    let mut router = router
        .route("/openapi.json", axum::routing::get(openapi::serve))
        .fallback(ops::not_found);
    // Inside the middleware, so the preflight answers it gives get `nosniff` too.
    let cors = cors_layer(cors_origins).map(Arc::new);
    if let Some(cors) = &cors {
        router = router.layer(CorsLayer::clone(cors));
    }
    router
        .layer(axum::middleware::from_fn_with_state(cors, every_request))
        .with_state(state)
}

/// Marks a response whose body is not ours to rewrite (a push workspace's own answer).
#[derive(Debug, Clone, Copy)]
pub struct Relayed;

/// The one middleware (one layer: a long poll holds its state for up to a minute, so each
/// layer's per-request future and service clone count 10,000 times): framework rejections
/// become JSON, every answer gets `X-Content-Type-Options: nosniff`, the latency is recorded,
/// and an unread request body is drained.
///
/// A plain function returning the future, so the future holds only what it needs after the
/// call (an `async fn` would keep its `req` and `next` arguments for its whole life, beside
/// the copy the inner call holds).
fn every_request(
    axum::extract::State(cors): axum::extract::State<Option<Arc<CorsLayer>>>,
    matched: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> impl Future<Output = Response> + Send {
    let method = method_label(req.method());
    let connection = req.extensions().get::<Arc<shed::Connection>>().cloned();
    let unsupported = unsupported_transfer_coding(req.headers());
    let (req, unread) = body::watch_unread(req);
    // Boxed: the refusal's future is three times the size of the router's, and every
    // request's future (a long poll's for up to a minute) would be as large as the larger.
    let inner = if unsupported {
        futures::future::Either::Left(Box::pin(unsupported_coding(cors, req)))
    } else {
        futures::future::Either::Right(next.run(req))
    };
    async move {
        let started = std::time::Instant::now();
        let mut resp = json_rejections(inner.await);
        // Bodies here are files anyone may have uploaded and push workspaces' own answers,
        // each with the type it was given: a browser must not read one as something else.
        resp.headers_mut().insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        // the route template, never the raw path: ids would explode the labels
        let route = matched.as_ref().map_or("unmatched", |m| m.as_str());
        crate::metrics::metrics()
            .http_request_duration
            .with_label_values(&[route, method, resp.status().as_str()])
            .observe(started.elapsed().as_secs_f64());
        let mut resp = body::drain_unread(resp, unread, connection.clone()).await;
        if connection.is_some_and(|c| !c.may_stay_open()) {
            crate::metrics::metrics().large_buffer_closes.inc();
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// A body sent in a transfer coding besides `chunked` (`Transfer-Encoding: gzip, chunked`; a
/// request's here, a push workspace's answer in `push`): hyper takes off the chunks and hands
/// on the rest as it came, so a compressed upload was parsed, stored or relayed as if it were
/// plain (RFC 9112 §6.1: 501; Go's server, the platform's, answers the same). A request whose
/// last coding is not `chunked` is hyper's own 400.
pub(crate) fn unsupported_transfer_coding(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii);
    match codings.next() {
        None => false,
        Some(first) => !first.eq_ignore_ascii_case(b"chunked") || codings.next().is_some(),
    }
}

/// The 501 of [`unsupported_transfer_coding`], answered before the router (whose handlers
/// would read the body), through the CORS layer the router has: without its headers a browser
/// reads the refusal as a network error.
fn unsupported_coding(
    cors: Option<Arc<CorsLayer>>,
    req: axum::extract::Request,
) -> impl Future<Output = Response> + Send {
    use futures::future::Either;
    use tower::Layer;
    let refuse = tower::service_fn(|_req: axum::extract::Request| async {
        Ok::<_, std::convert::Infallible>(
            error::ApiError::Rejected {
                status: StatusCode::NOT_IMPLEMENTED,
                message: "unsupported transfer encoding".into(),
            }
            .into_response(),
        )
    });
    let answer = match cors {
        Some(cors) => Either::Left(cors.layer(refuse).oneshot(req)),
        None => Either::Right(refuse.oneshot(req)),
    };
    async move {
        match answer.await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }
}

/// Framework-level rejections (bad path encoding, 405, 413, 415, ...) answer JSON
/// `{"error": ...}` like every other error (SPEC §10).
fn json_rejections(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error())
        || is_json
        || resp.extensions().get::<Relayed>().is_some()
    {
        return resp;
    }
    let message = status
        .canonical_reason()
        .unwrap_or("request refused")
        .to_ascii_lowercase();
    let mut out = error::ApiError::Rejected { status, message }.into_response();
    // Keep what the client needs to act on (405's Allow, for one), and the CORS layer's
    // headers (it runs inside this middleware): without them a browser reads the answer as
    // a network error.
    for (name, value) in resp.headers() {
        let cors = name.as_str().starts_with("access-control-") || name == header::VARY;
        if cors || name == header::ALLOW || name == header::RETRY_AFTER {
            out.headers_mut().append(name, value.clone());
        }
    }
    out
}

/// HTTP methods that get their own metric label; anything else is `other` (SPEC §10: label
/// values come only from known sets).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// CORS for the browser canvas (SPEC §4 Operations): listed origins are echoed (never `*`),
/// with credentials, since the canvas sends `credentials: "include"`. An unlisted origin is
/// not refused — workspace runtimes send `Origin` on every call — it just gets no CORS
/// headers.
fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    // Checked at start-up (`ServeArgs::validate`); an entry that is not an origin is left out.
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| crate::config::cors_origin(o).ok().flatten())
        .filter_map(|o| HeaderValue::from_str(&o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    let h = HeaderName::from_static;
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_credentials(true)
            .allow_methods([
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::RANGE,
                header::IF_MATCH,
                header::IF_NONE_MATCH,
                header::IF_RANGE,
                h("x-molecule-org-slug"),
                h("x-molecule-org-id"),
                h("x-workspace-id"),
                h("x-confirm-name"),
            ])
            .expose_headers([
                header::CONTENT_DISPOSITION,
                header::CONTENT_LENGTH,
                header::CONTENT_RANGE,
                header::ETAG,
                h("repr-digest"),
                header::RETRY_AFTER,
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Connection-level settings of [`serve`].
#[derive(Clone)]
pub struct ServeOptions {
    /// After shutdown starts, in-flight requests get this long to finish.
    pub drain_deadline: Duration,
    /// How a client must take its responses.
    pub response: conn::ResponsePace,
    /// A request head must arrive within this.
    pub header_read: Duration,
    /// Open connections at most; when all are taken, a new one sheds the one idle longest
    /// between requests (else it waits, and more in the listen backlog).
    pub max_connections: usize,
    /// Open connections per client address; more are answered 429 and closed.
    pub per_client: Arc<peer::ConnectionsPerClient>,
    /// Connections whose read buffer grew kept alive at most (see
    /// [`shed::Connection::may_stay_open`]).
    pub max_large_buffer_connections: usize,
}

/// Largest request head, start line included (beyond: 431, as for more than hyper's 100
/// headers). hyper's read buffer bound alone does not hold a head: one read may take a whole
/// head of any size the buffer's capacity has room for, and only a partial head is checked.
const HEAD_MAX: usize = 64 * 1024;

/// Largest read buffer of a connection (hyper grows it only while reads fill it): an upload
/// body arrives in chunks up to this size — small
/// chunks cost a parser and spool round per chunk. Below jemalloc's `oversize_threshold`
/// (512 KiB, `main.rs`): hyper allocates a new buffer of about this size whenever the chunks
/// it handed on are still alive, and blocks of 512 KiB and more come back as fresh pages every
/// time (~260 page faults per 1 MiB upload at 512 KiB), while smaller ones are reused.
const READ_BUFFER_MAX: usize = 256 * 1024;

/// Serves HTTP/1.1 with Title-Case header names (SPEC §4: client scripts grep them
/// case-sensitively), until `shutdown` resolves; then drains in-flight requests for at most
/// `drain_deadline`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    cut_drain: impl Future<Output = ()>,
    opts: ServeOptions,
) -> std::io::Result<()> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read)
        .max_header_size(HEAD_MAX)
        .max_buf_size(READ_BUFFER_MAX);
    // Every connection's task holds a place until it ends: the drain waits for all of them.
    let places = opts.max_connections.clamp(1, u32::MAX as usize);
    let connections = Arc::new(Semaphore::new(places));
    let idle = Arc::new(shed::Idle::new(opts.max_large_buffer_connections));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(place) = opts.per_client.open(peer.ip()) else {
            // Answered without reading the request, then closed. The refusal keeps a free
            // connection place for at most a second, so refused connections cannot add up;
            // it never sheds another client's connection (without a free place it is closed
            // unanswered).
            crate::metrics::metrics().connections_refused.inc();
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                continue;
            };
            tokio::spawn(async move {
                let _permit = permit;
                let mut stream = stream;
                let refuse = async {
                    stream.write_all(peer::TOO_MANY_CONNECTIONS).await?;
                    stream.shutdown().await
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), refuse).await;
            });
            continue;
        };
        let permit = tokio::select! {
            permit = connection_place(&connections, &idle) => permit,
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let client = conn::ClientStream::new(stream, opts.response);
        let watch = client.watch();
        let standing = idle.add(client.large_reads(), opts.per_client.is_proxy(peer.ip()));
        let io = rejections::JsonRejections::new(client, standing.clone());
        let peer_ip = peer::Peer(peer.ip());
        let (begins, ends) = (standing.clone(), standing.clone());
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    begins.begin();
                    req.extensions_mut().insert(peer_ip);
                    req.extensions_mut().insert(begins.clone());
                    req.extensions_mut().insert(watch.clone());
                    req
                })
                .map_response(move |resp: Response| {
                    let ends = ends.clone();
                    resp.map(|body| axum::body::Body::new(shed::Tracked::new(body, ends)))
                }),
        );
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _place = place;
            let mut conn = std::pin::pin!(conn);
            let mut closing = false;
            let ended = loop {
                // The connection first: a head already here begins its request, and a shed
                // then waits for its answer instead of dropping it.
                tokio::select! {
                    biased;
                    ended = conn.as_mut() => break ended,
                    how = standing.shed(), if !closing => {
                        // Counted, logged at debug only: a flood of connections is what makes
                        // sheds, one per new connection, and must not flood the log too.
                        crate::metrics::metrics().connections_shed.inc();
                        tracing::debug!(event = "connection_shed", %peer, how = ?how, "every connection place taken: closed the connection idle longest");
                        if how == shed::Shed::Drop {
                            return;
                        }
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = stopping.changed(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            };
            if let Err(e) = ended {
                match conn::ResponseCut::of(&e) {
                    Some(cut) => {
                        crate::metrics::metrics()
                            .responses_cut
                            .with_label_values(&[cut.reason()])
                            .inc();
                        tracing::info!(event = "response_cut", reason = cut.reason(), %peer, "{cut}: response cut off");
                    }
                    None => tracing::debug!(%peer, error = %e, "connection ended with error"),
                }
            }
        });
    }
    drop(listener);
    let open = places - connections.available_permits();
    tracing::info!(in_flight = open, "draining connections");
    let _ = stop.send(true);
    let all_closed = connections.acquire_many(places as u32);
    tokio::select! {
        drained = tokio::time::timeout(opts.drain_deadline, all_closed) => {
            if drained.is_err() {
                tracing::warn!("drain deadline passed; closing remaining connections");
            }
        }
        () = cut_drain => {
            tracing::warn!(in_flight = places - connections.available_permits(), "a second shutdown signal: closing remaining connections now");
        }
    }
    Ok(())
}

/// A place for a new connection. When all are taken, the connection idle longest between
/// requests (for [`shed::MIN_IDLE`] at least) is told to close; asked again every 200 ms
/// while no place frees.
async fn connection_place(connections: &Arc<Semaphore>, idle: &shed::Idle) -> OwnedSemaphorePermit {
    loop {
        if let Ok(permit) = connections.clone().try_acquire_owned() {
            return permit;
        }
        idle.shed_oldest(shed::MIN_IDLE);
        let wait = connections.clone().acquire_owned();
        if let Ok(Ok(permit)) = tokio::time::timeout(Duration::from_millis(200), wait).await {
            return permit;
        }
    }
}

/// A 200 JSON answer of `T` with its Content-Length (the common success shape).
pub fn ok_json<T: serde::Serialize>(value: T) -> Response {
    (StatusCode::OK, axum::Json(value)).into_response()
}
