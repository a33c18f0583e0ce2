//! Forwarding one call upstream, for both egress proxies ([`crate::egress`], the Bot API, and
//! [`crate::model_proxy`], the model provider): the upstream URL built from checked path
//! segments, only the allowed request headers passed on, the answer's status and allowed
//! headers passed back with its body streamed (or read within a cap), and an upstream that
//! cannot be reached told apart so each proxy answers it in its own error shape.
//!
//! Upstream URLs may hold a secret (the Bot API's carries the real bot token): no error that
//! leaves here carries the URL.

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use futures::TryStreamExt;
use std::time::Duration;

/// One call to send upstream.
pub(crate) struct Upstream<'a> {
    pub method: Method,
    /// From [`url`].
    pub url: String,
    /// The client's request headers; only those named in `pass` go on.
    pub headers: &'a HeaderMap,
    pub pass: &'a [&'static str],
    /// Sent as `Authorization: Bearer …` in place of whatever the client sent.
    pub bearer: Option<&'a str>,
    pub body: bytes::Bytes,
    /// For the whole call, the answer's body included.
    pub timeout: Duration,
}

/// `{root}/{segments joined by /}`, then `?{query}` when there is one. The segments are checked
/// by the caller ([`crate::proxy_path`]): nothing of the client's path goes upstream unchecked.
pub(crate) fn url<'s>(
    root: &str,
    segments: impl IntoIterator<Item = &'s str>,
    query: Option<&str>,
) -> String {
    let mut url = root.trim_end_matches('/').to_owned();
    for s in segments {
        url.push('/');
        url.push_str(s);
    }
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

impl Upstream<'_> {
    /// Sends the call. The error (upstream unreachable, or too slow to answer) carries no URL.
    pub async fn send(self, http: &reqwest::Client) -> Result<reqwest::Response, reqwest::Error> {
        let mut out = http
            .request(self.method, self.url)
            .body(self.body)
            .timeout(self.timeout);
        for name in self.pass {
            if let Some(v) = self.headers.get(*name) {
                out = out.header(*name, v.clone());
            }
        }
        if let Some(key) = self.bearer {
            out = out.bearer_auth(key);
        }
        out.send().await.map_err(reqwest::Error::without_url)
    }
}

/// The answer to pass back: upstream's status and the headers named in `keep`, with `body`
/// ([`stream`] of the answer, or what was read of it).
pub(crate) fn respond(
    status: StatusCode,
    headers: &HeaderMap,
    keep: &[&'static str],
    body: Body,
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    for name in keep {
        if let Some(v) = headers.get(*name) {
            response.headers_mut().insert(*name, v.clone());
        }
    }
    response
}

/// The answer's body as it arrives, each chunk passed to `inspect` on the way (for metering).
pub(crate) fn stream(
    resp: reqwest::Response,
    mut inspect: impl FnMut(&[u8]) + Send + 'static,
) -> Body {
    Body::from_stream(
        resp.bytes_stream()
            .map_err(std::io::Error::other)
            .map_ok(move |chunk| {
                inspect(&chunk);
                chunk
            }),
    )
}

/// At most `limit` bytes of the answer's body; the rest is dropped.
pub(crate) async fn read_capped(resp: reqwest::Response, limit: usize) -> bytes::Bytes {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn urls_join_checked_segments_under_the_root() {
        assert_eq!(
            url("https://api.example/", ["bot1:x", "sendMessage"], None),
            "https://api.example/bot1:x/sendMessage"
        );
        assert_eq!(
            url("http://m/v1", ["models"], Some("a=1")),
            "http://m/v1/models?a=1"
        );
    }
}
