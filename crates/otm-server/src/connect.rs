//! The egress policy's HTTP CONNECT proxy, on the egress listener.
//!
//! A tenant whose policy is `proxy` gets `HTTPS_PROXY` (and friends) pointing at its shim's
//! forwarder with its surrogate token as the proxy password. A `CONNECT host:port` is tunnelled
//! only when the surrogate is a live instance's, its tenant's policy is `proxy`, the host is on
//! the tenant's allowlist (`example.com`, or `*.example.com` for its subdomains), the port is 80
//! or 443, and every address the name resolves to is public: private, loopback, link-local,
//! carrier-grade NAT, multicast and unspecified ranges, and the metadata address, are always
//! refused. The tunnel connects to the address that was checked, never resolving again.

use crate::app::App;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tracing::Instrument;

/// Ports a tunnel may reach.
const PORTS: &[u16] = &[80, 443];

/// Why a CONNECT was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    NoCredentials,
    UnknownSurrogate,
    PolicyNone,
    NotAllowed(String),
    Port(u16),
    PrivateAddress(IpAddr),
    Unresolved(String),
}

impl Refused {
    fn status(&self) -> StatusCode {
        match self {
            Refused::NoCredentials | Refused::UnknownSurrogate => {
                StatusCode::PROXY_AUTHENTICATION_REQUIRED
            }
            Refused::Unresolved(_) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::FORBIDDEN,
        }
    }

    fn message(&self) -> String {
        match self {
            Refused::NoCredentials => "proxy credentials required".into(),
            Refused::UnknownSurrogate => "unknown or revoked instance".into(),
            Refused::PolicyNone => "this tenant's egress policy is none".into(),
            Refused::NotAllowed(h) => format!("{h} is not on this tenant's egress allowlist"),
            Refused::Port(p) => format!("port {p} is not allowed (80 and 443 are)"),
            Refused::PrivateAddress(ip) => {
                format!("{ip} is a private, loopback or link-local address")
            }
            Refused::Unresolved(h) => format!("cannot resolve {h}"),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Refused::NoCredentials | Refused::UnknownSurrogate => "connect_unauthorized",
            Refused::PolicyNone | Refused::NotAllowed(_) | Refused::Port(_) => {
                "connect_not_allowed"
            }
            Refused::PrivateAddress(_) => "connect_private_address",
            Refused::Unresolved(_) => "connect_unresolved",
        }
    }
}

/// True for an address a tunnel may reach.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (18..20).contains(&o[1]))
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x64 && s[1] == 0xff9b)
                || s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

/// True when `host` is on `allow`: equal to an entry, or below a `*.` entry.
pub fn host_allowed(host: &str, allow: &[String]) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    allow.iter().any(|a| {
        let a = a.trim().trim_end_matches('.').to_ascii_lowercase();
        match a.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() && host.ends_with(&format!(".{suffix}")),
            None => host == a,
        }
    })
}

/// The address to tunnel to, given the allowlist and what `host` resolved to: refused unless
/// every resolved address is public.
pub fn decide(
    host: &str,
    port: u16,
    allow: &[String],
    resolved: &[SocketAddr],
) -> Result<SocketAddr, Refused> {
    precheck(host, port, allow)?;
    if let Some(bad) = resolved.iter().find(|a| !is_public(a.ip())) {
        return Err(Refused::PrivateAddress(bad.ip()));
    }
    resolved
        .first()
        .copied()
        .ok_or_else(|| Refused::Unresolved(host.to_owned()))
}

/// What can be decided before resolving the name: the port, a literal address, the allowlist.
fn precheck(host: &str, port: u16, allow: &[String]) -> Result<(), Refused> {
    if !PORTS.contains(&port) {
        return Err(Refused::Port(port));
    }
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        && !is_public(ip)
    {
        return Err(Refused::PrivateAddress(ip));
    }
    if !host_allowed(host, allow) {
        return Err(Refused::NotAllowed(host.to_owned()));
    }
    Ok(())
}

/// The password of `Proxy-Authorization: Basic …` (the surrogate token).
fn basic_password(header: &str) -> Option<String> {
    let encoded = header.trim().strip_prefix("Basic ")?.trim();
    let decoded = otm_core::base64::decode(encoded)?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, p)| p.to_owned())
}

/// Answers one CONNECT.
pub async fn handle(app: Arc<App>, req: Request) -> Response {
    // Only owned values across the awaits below: the request itself is not `Sync`.
    let auth = req
        .headers()
        .get("proxy-authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let uri = req.uri().clone();
    match open(&app, auth.as_deref(), &uri).await {
        Err(r) => {
            app.metrics().egress(r.label());
            tracing::info!(target = %uri, reason = %r.message(), "CONNECT refused");
            (r.status(), r.message()).into_response()
        }
        Ok((tenant, addr)) => {
            tracing::Span::current().record("tenant", tracing::field::display(&tenant));
            app.metrics().egress("connect_tunnelled");
            let upgrade = hyper::upgrade::on(req);
            // Tracked, and cut at shutdown: a tunnel may stay open for as long as the agent
            // likes, and shutdown waits only for what ends.
            let shutdown = app.shutdown().clone();
            let tunnel = async move {
                let Ok(upgraded) = upgrade.await else { return };
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(mut upstream) => {
                        let mut client = TokioIo::new(upgraded);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                    Err(e) => tracing::warn!(%tenant, %addr, error = %e, "CONNECT upstream failed"),
                }
            };
            app.spawn(
                async move {
                    tokio::select! {
                        _ = tunnel => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
                .instrument(tracing::Span::current()),
            );
            Response::builder()
                .status(StatusCode::OK)
                .body(Body::empty())
                .expect("response")
        }
    }
}

async fn open(
    app: &App,
    auth: Option<&str>,
    uri: &axum::http::Uri,
) -> Result<(otm_core::TenantId, SocketAddr), Refused> {
    let password = auth
        .and_then(basic_password)
        .ok_or(Refused::NoCredentials)?;
    let tenant = crate::surrogate::tenant_by_surrogate(app, &password)
        .await
        .map_err(|_| Refused::UnknownSurrogate)?;
    let allow = match &tenant.limits.egress_allow {
        Some(a) if !a.is_empty() => a.clone(),
        _ => return Err(Refused::PolicyNone),
    };
    let authority = uri
        .authority()
        .ok_or(Refused::Unresolved(uri.to_string()))?;
    let host = authority.host().to_owned();
    let port = authority.port_u16().unwrap_or(443);
    // Checked before any lookup, so a refused name is never even resolved.
    precheck(&host, port, &allow)?;
    let resolved: Vec<SocketAddr> = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    .map_err(|_| Refused::Unresolved(host.clone()))?
    .map_err(|_| Refused::Unresolved(host.clone()))?
    .collect();
    let addr = decide(&host, port, &allow, &resolved)?;
    Ok((tenant.id, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_public_addresses_of_allowed_hosts_on_web_ports() {
        let public: SocketAddr = "93.184.215.14:443".parse().unwrap();
        let list = allow(&["example.com", "*.wikipedia.org"]);
        assert_eq!(decide("example.com", 443, &list, &[public]), Ok(public));
        assert_eq!(
            decide("en.wikipedia.org", 443, &list, &[public]),
            Ok(public)
        );
        assert!(matches!(
            decide("wikipedia.org", 443, &list, &[public]),
            Err(Refused::NotAllowed(_))
        ));
        assert!(matches!(
            decide("evil.com", 443, &list, &[public]),
            Err(Refused::NotAllowed(_))
        ));
        assert!(matches!(
            decide("example.com", 22, &list, &[public]),
            Err(Refused::Port(22))
        ));
        for private in [
            "127.0.0.1:443",
            "10.1.2.3:443",
            "172.16.0.1:443",
            "192.168.1.1:443",
            "169.254.169.254:80",
            "100.64.0.1:443",
            "[::1]:443",
            "[fd00::1]:443",
            "[fe80::1]:443",
            "[::ffff:10.0.0.1]:443",
            "0.0.0.0:443",
        ] {
            let a: SocketAddr = private.parse().unwrap();
            assert!(
                matches!(
                    decide("example.com", a.port(), &list, &[public, a]),
                    Err(Refused::PrivateAddress(_))
                ),
                "{private}"
            );
        }
        // An allowlisted literal private address is still refused.
        let list = allow(&["169.254.169.254", "127.0.0.1"]);
        assert!(matches!(
            decide("169.254.169.254", 80, &list, &[]),
            Err(Refused::PrivateAddress(_))
        ));
        assert!(matches!(
            decide("127.0.0.1", 443, &list, &[]),
            Err(Refused::PrivateAddress(_))
        ));
    }

    #[test]
    fn basic_credentials_decode() {
        // "otm:1:abcdef"
        assert_eq!(
            basic_password("Basic b3RtOjE6YWJjZGVm").as_deref(),
            Some("1:abcdef")
        );
        assert_eq!(basic_password("Bearer x"), None);
        assert_eq!(basic_password("Basic !!!"), None);
    }
}
