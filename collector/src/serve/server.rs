//! The HTTP server of `anyprof serve`: connections, limits, timeouts and who is asking; the
//! endpoints themselves are in [`super::http`], the access rule in [`super::access`].
//!
//! A hostile or slow client must not take the daemon down or lock others out, so every
//! resource is bounded:
//!
//! * **Connections:** at most `--max-connections` open at once, and at most
//!   `--max-connections-per-user` for one local uid (for one address when exposed), so that
//!   one user's thousand stalled clients cannot starve the others; root is exempt from the
//!   per-user cap. A connection over either cap is closed as soon as it is accepted.
//! * **Time:** a request's headers must arrive within [`HEADER_TIMEOUT`] (also the longest
//!   a kept-alive connection may sit idle), its body within [`BODY_TIMEOUT`]; a response
//!   write that makes no progress for [`WRITE_TIMEOUT`] closes the connection, and no
//!   connection lives longer than `--max-seconds` plus [`LIFETIME_MARGIN`].
//! * **Memory:** request headers at most [`MAX_HEADER_BYTES`], bodies at most
//!   [`http::MAX_BODY`].
//! * **Threads:** connections are served by two async threads; the blocking handlers run on
//!   at most `--workers` threads for short requests (more wait their turn; one non-root
//!   user may have a quarter of them in progress, more get 503), and on at most
//!   `--max-long-requests` other threads for long ones (those that wait `?seconds=`: `profile`,
//!   `heap?seconds=`, `allocs?seconds=`), which are refused with 503 when all are taken, and
//!   of which one non-root user may hold at most a quarter. Long requests never take a short
//!   request's worker, and each kind runs at most once per process at a time
//!   ([`http::LongKind`]).
//!
//! * **Other sites:** a request a browser sends on behalf of another site's page (`Origin`,
//!   or `Sec-Fetch-Site` other than `none`/`same-origin`) is refused, so that a page cannot
//!   start profiles with the user's rights.
//!
//! When the daemon ends ([`Server::shutdown`]) it stops accepting, long requests stop waiting
//! and answer with what they have, and the responses in progress are sent (for at most 3 s)
//! before the connections close.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, HOST};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;

use super::access::{self, Token, Viewer};
use super::http::{self, Requester, Response};

/// How long a client may take to send a request's headers, and how long a kept-alive
/// connection may stay idle.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a response write may make no progress before the connection is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection lives at most the longest profile plus this.
pub const LIFETIME_MARGIN: Duration = Duration::from_secs(120);
/// Largest request head (request line and headers).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Listen backlog: connections the kernel holds until they are accepted.
const BACKLOG: u32 = 1024;

/// How the server is set up.
pub struct Config {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Threads for short requests.
    pub workers: usize,
    /// Long requests (`?seconds=`) at once.
    pub long_requests: usize,
    /// Open connections at once.
    pub max_connections: usize,
    /// Open connections of one local uid (or one remote address) at once; root is exempt.
    pub max_connections_per_user: usize,
    /// The longest `?seconds=` a request may ask for.
    pub max_seconds: u64,
    /// Some: the daemon is exposed beyond the loopback, and every request must carry this.
    pub token: Option<Token>,
}

/// The running server; [`Server::shutdown`] stops it.
pub struct Server {
    runtime: tokio::runtime::Runtime,
    shared: Arc<Shared>,
}

/// Whom a connection's caps are counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ClientKey {
    /// A local user (loopback connection whose uid the kernel told us).
    Uid(u32),
    /// A remote address, or a loopback one whose owner could not be found.
    Addr(IpAddr),
}

impl ClientKey {
    fn exempt(self) -> bool {
        self == ClientKey::Uid(0)
    }
}

/// Counts per client, with a cap; a slot gives its count back when dropped.
struct Counts {
    cap: usize,
    counts: Mutex<HashMap<ClientKey, usize>>,
}

impl Counts {
    fn new(cap: usize) -> Counts {
        Counts {
            cap: cap.max(1),
            counts: Mutex::new(HashMap::new()),
        }
    }

    fn claim(self: &Arc<Self>, key: ClientKey) -> Option<Slot> {
        let mut counts = self.counts.lock().ok()?;
        let n = counts.entry(key).or_insert(0);
        if *n >= self.cap && !key.exempt() {
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: self.clone(),
            key,
        })
    }
}

struct Slot {
    counts: Arc<Counts>,
    key: ClientKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.counts.counts.lock() {
            if let Some(n) = counts.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&self.key);
                }
            }
        }
    }
}

/// What every connection shares.
struct Shared {
    state: Arc<http::State>,
    token: Option<Token>,
    connections: Arc<Semaphore>,
    max_connections: usize,
    per_client: Arc<Counts>,
    short: Arc<Semaphore>,
    short_per_client: Arc<Counts>,
    workers: usize,
    long: Arc<Semaphore>,
    long_per_client: Arc<Counts>,
    long_requests: usize,
    lifetime: Duration,
    /// Becomes true when the daemon ends: stop accepting, finish what is in progress.
    stop: tokio::sync::watch::Sender<bool>,
}

/// One accepted connection.
struct Conn {
    key: ClientKey,
    /// The local user who opened it (loopback only).
    uid: Option<u32>,
}

impl Server {
    /// Binds `config.addr` and starts serving `state`'s endpoints.
    pub fn start(config: Config, state: Arc<http::State>) -> Result<Server> {
        let workers = config.workers.max(1);
        let long_requests = config.long_requests.max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(workers + long_requests)
            .thread_name("anyprof-http")
            .enable_io()
            .enable_time()
            .build()
            .context("starting the HTTP server's threads")?;
        let listener = runtime
            .block_on(async { bind(config.addr) })
            .with_context(|| format!("cannot listen for HTTP on {}", config.addr))?;
        let shared = Arc::new(Shared {
            state,
            token: config.token,
            connections: Arc::new(Semaphore::new(config.max_connections.max(1))),
            max_connections: config.max_connections.max(1),
            per_client: Arc::new(Counts::new(config.max_connections_per_user)),
            short: Arc::new(Semaphore::new(workers)),
            short_per_client: Arc::new(Counts::new(workers / 4)),
            workers,
            long: Arc::new(Semaphore::new(long_requests)),
            long_per_client: Arc::new(Counts::new(long_requests / 4)),
            long_requests,
            lifetime: Duration::from_secs(config.max_seconds) + LIFETIME_MARGIN,
            stop: tokio::sync::watch::channel(false).0,
        });
        runtime.spawn(accept_loop(listener, shared.clone()));
        Ok(Server { runtime, shared })
    }

    /// Stops accepting and serving: long requests in progress end early (with what they
    /// have), and CPU sampling they started is stopped. Waits a little for the handlers, so
    /// that the collector they share is released.
    pub fn shutdown(self) {
        self.shared.state.stop();
        self.shared.stop.send_replace(true);
        let shared = self.shared.clone();
        // The responses in progress are sent (bounded: a client that does not read them is
        // cut off), then the connections close.
        self.runtime.block_on(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while shared.connections.available_permits() < shared.max_connections
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        self.runtime.shutdown_timeout(Duration::from_millis(500));
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As std's TcpListener: a restarted daemon can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // When each client was last told about on stderr for going over a cap (once a minute).
    let mut warned: HashMap<ClientKey, std::time::Instant> = HashMap::new();
    let mut warn = |key: ClientKey, what: String| {
        let now = std::time::Instant::now();
        if warned
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60))
        {
            return;
        }
        warned.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        warned.insert(key, now);
        eprintln!("anyprof serve: {what}: closing new ones as they come (said once a minute)");
    };
    let mut stop = shared.stop.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = async { stop.wait_for(|stop| *stop).await.map(|_| ()) } => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of descriptors or memory: let connections finish, then go on.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Who opened it: one exact lookup in the kernel's socket table, before the
        // connection counts against anything.
        let uid = match stream.local_addr() {
            Ok(local) if access::is_loopback(peer.ip()) => access::peer_uid(peer, local),
            _ => None,
        };
        let key = match uid {
            Some(uid) => ClientKey::Uid(uid),
            None => ClientKey::Addr(peer.ip()),
        };
        // Over a cap: closed at once (dropping the stream), costing no thread or timer.
        let Some(client_slot) = shared.per_client.claim(key) else {
            let who = match key {
                ClientKey::Uid(uid) => format!("uid {uid}"),
                ClientKey::Addr(ip) => format!("{ip}"),
            };
            warn(
                key,
                format!(
                    "{who} has {} HTTP connections open (--max-connections-per-user)",
                    shared.per_client.cap
                ),
            );
            continue;
        };
        let Ok(slot) = shared.connections.clone().try_acquire_owned() else {
            // Said under a key no client has (0.0.0.0 is never a peer).
            warn(
                ClientKey::Addr(IpAddr::from([0, 0, 0, 0])),
                format!(
                    "{} HTTP connections are open (--max-connections)",
                    shared.max_connections
                ),
            );
            continue;
        };
        let conn = Arc::new(Conn { key, uid });
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_connection(stream, conn, shared).await;
            drop((slot, client_slot));
        });
    }
}

async fn serve_connection(stream: TcpStream, conn: Arc<Conn>, shared: Arc<Shared>) {
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let io = TokioIo::new(Box::pin(stream));
    let lifetime = shared.lifetime;
    let mut stop = shared.stop.subscribe();
    let service = service_fn(move |request| {
        let (conn, shared) = (conn.clone(), shared.clone());
        async move {
            let response = respond(request, &conn, &shared).await;
            Ok::<_, Infallible>(into_hyper(response))
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(io, service);
    let run = async {
        tokio::pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => {}
            _ = async { stop.wait_for(|stop| *stop).await.map(|_| ()) } => {
                // The daemon ends: answer the request in progress, then close.
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    };
    let _ = tokio::time::timeout(lifetime, run).await;
}

fn into_hyper(r: Response) -> hyper::Response<Full<Bytes>> {
    let mut out = hyper::Response::new(Full::new(Bytes::from(r.body)));
    *out.status_mut() =
        hyper::StatusCode::from_u16(r.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in r.headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            out.headers_mut().append(name, value);
        }
    }
    out
}

/// The value of query parameter `key` in `url`, if present.
fn query_param<'a>(url: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = url.split_once('?')?;
    query
        .split('&')
        .filter_map(|p| p.split_once('=').or(Some((p, ""))))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

/// Checks who asks (Host header, token or uid), reads the body, and runs the handler on a
/// worker of the right kind.
async fn respond(request: hyper::Request<Incoming>, conn: &Conn, shared: &Shared) -> Response {
    let url = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let who = match identify(&request, &url, conn, shared) {
        Ok(who) => who,
        Err(response) => return response,
    };
    let post = request.method() == hyper::Method::POST;
    let body = if post {
        let limited = Limited::new(request.into_body(), http::MAX_BODY);
        match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes().to_vec(),
            Ok(Err(_)) => {
                return Response::error(
                    413,
                    &format!(
                        "request body too large or broken: at most {} bytes",
                        http::MAX_BODY
                    ),
                )
            }
            Err(_) => {
                return Response::error(
                    408,
                    &format!("request body not received within {BODY_TIMEOUT:?}"),
                )
            }
        }
    } else {
        Vec::new()
    };
    let long = http::long_kind(&url).is_some();
    let state = shared.state.clone();
    let work = move || http::handle(&state, &who, post, &url, &body);
    if long {
        let (Some(client_slot), Ok(permit)) = (
            shared.long_per_client.claim(conn.key),
            shared.long.clone().try_acquire_owned(),
        ) else {
            return Response::error(
                503,
                &format!(
                    "too many long requests (?seconds=) in progress: at most {} at once, a \
                     quarter of them per user (anyprof serve --max-long-requests); try again \
                     when one has finished",
                    shared.long_requests
                ),
            );
        };
        // The slots go with the work: a client that hangs up does not free them early.
        run_blocking(move || {
            let response = work();
            drop((permit, client_slot));
            response
        })
        .await
    } else {
        // One user may hold a quarter of the workers, so that it cannot keep everyone
        // else waiting (each request also copies a process's data while it works).
        let Some(client_slot) = shared.short_per_client.claim(conn.key) else {
            return Response::error(
                503,
                &format!(
                    "too many requests of yours in progress: one user may have a quarter of \
                     the {} workers at once (anyprof serve --workers); try again when one has \
                     finished",
                    shared.workers
                ),
            );
        };
        let Ok(permit) = shared.short.clone().acquire_owned().await else {
            return Response::error(503, "the server is shutting down");
        };
        run_blocking(move || {
            let response = work();
            drop((permit, client_slot));
            response
        })
        .await
    }
}

async fn run_blocking(work: impl FnOnce() -> Response + Send + 'static) -> Response {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|_| Response::error(500, "the request's handler failed"))
}

/// Who the request is from, or the response that refuses it.
fn identify(
    request: &hyper::Request<Incoming>,
    url: &str,
    conn: &Conn,
    shared: &Shared,
) -> Result<Requester, Response> {
    if let Some(token) = &shared.token {
        let bearer = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let in_query = query_param(url, "token");
        if bearer.is_some_and(|t| token.matches(t)) {
            return Ok(Requester {
                viewer: Viewer::All,
                token_in_query: None,
            });
        }
        if let Some(t) = in_query.filter(|t| token.matches(t)) {
            return Ok(Requester {
                viewer: Viewer::All,
                token_in_query: Some(t.to_string()),
            });
        }
        let mut refusal = Response::error(
            401,
            &format!(
                "this anyprof serve is exposed to the network and answers only requests that \
                 carry its token: add ?token=TOKEN to the URL or send `Authorization: Bearer \
                 TOKEN`; the token is in {} (readable by root and the anyprof group)",
                token.file().display()
            ),
        );
        refusal
            .headers
            .push(("WWW-Authenticate", "Bearer realm=\"anyprof\"".into()));
        return Err(refusal);
    }
    // Loopback: a browser tricked by DNS rebinding sends the attacker's host name.
    // (and an absolute request target names a host too).
    let hosts = [
        request
            .headers()
            .get(HOST)
            .map(|h| h.to_str().unwrap_or("(not text)").to_string()),
        request.uri().authority().map(|a| a.as_str().to_string()),
    ];
    if let Some(host) = hosts
        .into_iter()
        .flatten()
        .find(|h| !access::host_is_loopback(h))
    {
        return Err(Response::error(
            403,
            &format!(
                "Host {host:?} is not a loopback name: anyprof serve answers only requests \
                 addressed to 127.0.0.1, [::1] or localhost (with any port), so that a web \
                 page cannot reach it through a DNS name it points at this host (DNS \
                 rebinding)"
            ),
        ));
    }
    // A page the user's browser shows on another site may send requests here (an <img> to
    // `/debug/pprof/profile?seconds=300`): it cannot read the answer, but it would start
    // profiles and dumps with the user's rights. Browsers say where a request comes from;
    // `go tool pprof` and curl send neither header.
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("(not text)").to_string())
    };
    if let Some(from) = from_another_site(header("origin"), header("sec-fetch-site")) {
        return Err(Response::error(
            403,
            &format!(
                "this request came from a web page ({from}): anyprof serve answers only \
                 requests made directly (go tool pprof, curl, the address bar) or from its own \
                 pages, so that another site cannot start profiles in your processes"
            ),
        ));
    }
    match conn.uid {
        Some(0) => Ok(Requester {
            viewer: Viewer::All,
            token_in_query: None,
        }),
        Some(uid) => Ok(Requester {
            viewer: Viewer::Uid(uid),
            token_in_query: None,
        }),
        None => Err(Response::error(
            403,
            "could not tell which local user opened this connection (the kernel's socket \
             table has no entry for it), so no profile is shown",
        )),
    }
}

/// Where a request came from, if a browser sent it for another site's page: it carries an
/// `Origin` or a `Sec-Fetch-Site` other than `none` (typed or bookmarked) and `same-origin`
/// (our own index page's links).
fn from_another_site(origin: Option<String>, fetch_site: Option<String>) -> Option<String> {
    if fetch_site.as_deref() == Some("same-origin") {
        return None;
    }
    origin.or(fetch_site.filter(|site| site != "none"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn requests_for_other_sites_pages_are_told_apart() {
        use super::from_another_site;
        let s = |v: &str| Some(v.to_string());
        assert_eq!(from_another_site(None, None), None, "curl, go tool pprof");
        assert_eq!(from_another_site(None, s("none")), None, "the address bar");
        assert_eq!(
            from_another_site(s("http://127.0.0.1:6060"), s("same-origin")),
            None,
            "our own page"
        );
        assert_eq!(
            from_another_site(None, s("cross-site")),
            s("cross-site"),
            "an <img> on another site"
        );
        assert_eq!(
            from_another_site(s("https://evil.example"), None),
            s("https://evil.example"),
            "an older browser's cross-origin POST"
        );
        assert!(from_another_site(s("null"), s("same-site")).is_some());
    }

    use super::query_param;

    #[test]
    fn query_params() {
        assert_eq!(query_param("/x?a=1&token=abc", "token"), Some("abc"));
        assert_eq!(query_param("/x?token=a&token=b", "token"), Some("b"));
        assert_eq!(query_param("/x?tokens=a", "token"), None);
        assert_eq!(query_param("/x", "token"), None);
    }
}
