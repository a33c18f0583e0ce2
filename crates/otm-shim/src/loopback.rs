//! Plain HTTP/1.1 to the agent's own loopback ports: its health checks and its webhook.
//!
//! The shim calls nothing else, so this client carries no TLS, no CA store, no proxy settings
//! and no name resolution: an address is `http://<ip>:<port>/<path>`, connected to as it is.
//! It keeps the one connection it used last (deliveries go one at a time), so that an update
//! costs the agent no new connection.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;

/// How much of an answer's body is read for an error message.
const MAX_BODY: usize = 64 << 10;

/// The client. Cheap to create; holds at most one idle connection.
#[derive(Debug, Default)]
pub struct Client {
    idle: std::sync::Mutex<Option<Idle>>,
}

#[derive(Debug)]
struct Idle {
    addr: SocketAddr,
    sender: SendRequest<Full<Bytes>>,
}

/// An answer: its status and headers; the body is read only when asked for.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    /// Given back to the client once the body is read to its end.
    conn: Option<(SocketAddr, SendRequest<Full<Bytes>>)>,
}

/// Why a call failed: the address is not one this client calls, a header is not valid, or the
/// connection failed.
#[derive(Debug)]
pub enum Error {
    Address(String),
    Request(hyper::http::Error),
    Io(std::io::Error),
    Http(hyper::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Address(url) => write!(f, "`{url}` is not an http://<ip>:<port>/ address"),
            Error::Request(e) => write!(f, "{e}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Http(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

/// A parsed `http://<ip>:<port>/<path>`.
#[derive(Debug)]
struct Target<'a> {
    addr: SocketAddr,
    authority: &'a str,
    path: &'a str,
}

fn target(url: &str) -> Result<Target<'_>, Error> {
    let bad = || Error::Address(url.to_owned());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let addr = authority.parse().map_err(|_| bad())?;
    Ok(Target {
        addr,
        authority,
        path,
    })
}

impl Client {
    /// `GET url`: the answer's status and headers.
    pub async fn get(&self, url: &str) -> Result<Response, Error> {
        self.call(Method::GET, url, &[], Bytes::new()).await
    }

    /// `POST url` with `headers` and `body`: the answer's status and headers.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(HeaderName, &str)],
        body: Bytes,
    ) -> Result<Response, Error> {
        self.call(Method::POST, url, headers, body).await
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        headers: &[(HeaderName, &str)],
        body: Bytes,
    ) -> Result<Response, Error> {
        let t = target(url)?;
        let mut req = Request::builder()
            .method(method)
            .uri(t.path)
            .header(hyper::header::HOST, t.authority)
            .header(hyper::header::ACCEPT, "*/*");
        for (name, value) in headers {
            req = req.header(name, *value);
        }
        let req = req.body(Full::new(body)).map_err(Error::Request)?;
        self.send(t.addr, req).await
    }

    /// Sends on the idle connection when it is to `addr` and still open, else on a new one. A
    /// request the idle connection gave back unsent (the agent had closed it) goes out once
    /// more on a new connection; one that was sent is never sent twice.
    async fn send(&self, addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Response, Error> {
        let idle = lock(&self.idle).take().filter(|i| i.addr == addr);
        let mut req = req;
        if let Some(Idle { mut sender, .. }) = idle
            && sender.ready().await.is_ok()
        {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(answer(resp, addr, sender)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(Error::Http(e.into_error())),
                },
            }
        }
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(Error::Io)?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(Error::Http)?;
        tokio::spawn(async move {
            // Ends when the connection closes or the last sender is dropped.
            let _ = conn.await;
        });
        let resp = sender.send_request(req).await.map_err(Error::Http)?;
        Ok(answer(resp, addr, sender))
    }

    /// Keeps a connection whose last answer was read to its end.
    fn keep(&self, addr: SocketAddr, sender: SendRequest<Full<Bytes>>) {
        if !sender.is_closed() {
            *lock(&self.idle) = Some(Idle { addr, sender });
        }
    }
}

fn answer(
    resp: hyper::Response<Incoming>,
    addr: SocketAddr,
    sender: SendRequest<Full<Bytes>>,
) -> Response {
    let (parts, body) = resp.into_parts();
    Response {
        status: parts.status,
        headers: parts.headers,
        body,
        conn: Some((addr, sender)),
    }
}

impl Response {
    /// Gives the connection back to `client` when the body has already arrived whole (an
    /// answer without a body, or a short one), without waiting for anything; otherwise the
    /// connection is closed.
    pub fn finish(mut self, client: &Client) {
        loop {
            if hyper::body::Body::is_end_stream(&self.body) {
                break;
            }
            match futures::FutureExt::now_or_never(self.body.frame()) {
                Some(Some(Ok(_))) => {}
                Some(None) => break,
                _ => return,
            }
        }
        if let Some((addr, sender)) = self.conn.take() {
            client.keep(addr, sender);
        }
    }

    /// The body as text (invalid UTF-8 replaced), its first [`MAX_BODY`] bytes; empty when it
    /// cannot be read. The connection goes back to `client` when the body was read whole.
    pub async fn text(mut self, client: &Client) -> String {
        let mut buf = Vec::new();
        let whole = loop {
            match self.body.frame().await {
                None => break true,
                Some(Err(_)) => return String::new(),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let room = MAX_BODY - buf.len();
                        buf.extend_from_slice(&data[..data.len().min(room)]);
                        if data.len() > room {
                            break false;
                        }
                    }
                }
            }
        };
        if whole && let Some((addr, sender)) = self.conn.take() {
            client.keep(addr, sender);
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// A std mutex's guard, whether or not a holder panicked.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a header value is `value` (a value that is not text is not).
/// The address an `http://<ip>:<port>/…` URL names.
pub fn address(url: &str) -> Result<SocketAddr, Error> {
    Ok(target(url)?.addr)
}

pub fn header_is(headers: &HeaderMap, name: &str, value: &str) -> bool {
    headers
        .get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        == Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A keep-alive HTTP/1.1 server on loopback that answers every request with `answer`; counts
    /// the connections it accepted and the requests it answered.
    async fn server(answer: &'static [u8]) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (conns, reqs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, r) = (conns.clone(), reqs.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One whole request: its head, then as many bytes as it says.
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < end + 4 + len {
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + 4 + len);
                        r.fetch_add(1, Ordering::SeqCst);
                        if tcp.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, conns, reqs)
    }

    #[tokio::test]
    async fn updates_in_a_row_share_one_connection_to_the_agent() {
        let (url, conns, reqs) = server(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").await;
        let client = Client::default();
        for i in 0..3 {
            let body = Bytes::from(format!("{{\"update_id\":{i}}}"));
            let resp = client.post(&url, &[], body).await.unwrap();
            assert_eq!(resp.status, StatusCode::OK);
            resp.finish(&client);
        }
        assert_eq!(reqs.load(Ordering::SeqCst), 3);
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refusal_gives_its_status_headers_and_text() {
        let (url, _, _) = server(
            b"HTTP/1.1 409 Conflict\r\nx-why: busy\r\ncontent-length: 14\r\n\r\nnot now, sorry",
        )
        .await;
        let client = Client::default();
        let resp = client.get(&url).await.unwrap();
        assert_eq!(resp.status, StatusCode::CONFLICT);
        assert!(header_is(&resp.headers, "x-why", "busy"));
        assert!(!header_is(&resp.headers, "x-why", "idle"));
        assert_eq!(resp.text(&client).await, "not now, sorry");
        // The connection was kept: the next call goes through on it.
        assert_eq!(client.get(&url).await.unwrap().status, StatusCode::CONFLICT);
    }

    #[tokio::test]
    async fn an_agent_that_is_gone_is_an_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/webhook");
        let e = Client::default().get(&url).await.unwrap_err();
        assert!(matches!(e, Error::Io(_)), "{e}");
    }

    #[test]
    fn only_plain_http_to_an_address_is_called() {
        let t = target("http://127.0.0.1:4000/webhook").unwrap();
        assert_eq!(
            (t.addr.port(), t.authority, t.path),
            (4000, "127.0.0.1:4000", "/webhook")
        );
        assert_eq!(target("http://[::1]:4000").unwrap().path, "/");
        for url in [
            "https://127.0.0.1:4000/webhook",
            "http://localhost:4000/webhook",
            "http://127.0.0.1/webhook",
        ] {
            assert!(matches!(target(url), Err(Error::Address(_))), "{url}");
        }
    }
}
