//! The web console on the admin listener: server-rendered pages of the fleet, each tenant and
//! the fleet's charts, behind a sign-in with an admin token.
//!
//! - Sign-in is a plain HTML form; the token is exchanged for a random session id in an
//!   `HttpOnly`, `SameSite=Strict` cookie that lapses after [`SESSION_IDLE`] without a request
//!   (and after [`SESSION_MAX`] in any case). Sessions live in this process's memory.
//! - Every form carries its session's CSRF token; a post without a session or with a wrong
//!   token is refused (403). Pages without a session redirect to `/signin`.
//! - Every answer carries a content security policy that allows scripts and styles only from
//!   the console's own files (no inline script), which are embedded in the binary.
//! - Live updates are short polls of HTML fragments by a small script; without it every page
//!   still works (reload, forms).

pub mod history;
mod html;

use crate::admin;
use crate::api_error::ApiError;
use crate::app::App;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use history::History;
use html::{ago, button, csrf_field, esc, page};
use otm_core::admin_api::ErrorCode;
use otm_core::{Secret, TenantId};
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A session lapses after this long without a request.
pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// A session lapses this long after sign-in, used or not.
pub const SESSION_MAX: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest go first.
const MAX_SESSIONS: usize = 1000;
/// The session cookie.
const COOKIE: &str = "otm_console";
/// The sign-in form's own CSRF cookie (there is no session yet to bind its token to).
const SIGNIN_COOKIE: &str = "otm_console_signin";

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");
const ICON: &str = include_str!("icon.svg");

/// The content security policy of every console answer: nothing from elsewhere, no inline
/// script or style, forms post only here, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Who signed in, as the token check names them.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The token's name (`admin` for the admin token).
    pub name: String,
    /// A read-only token may look but change nothing.
    pub read_only: bool,
}

#[derive(Clone, Debug)]
struct Session {
    csrf: String,
    who: Identity,
    created: Instant,
    last_seen: Instant,
    /// A message for the next page shown (what the last form did).
    flash: Option<String>,
}

/// The console's state: the app, the sessions, the metrics history.
#[derive(Debug)]
pub struct Console {
    app: Arc<App>,
    sessions: Mutex<HashMap<String, Session>>,
    history: Mutex<History>,
}

/// A signed-in request's session, as the middleware found it.
#[derive(Clone, Debug)]
struct Signed {
    id: String,
    csrf: String,
    who: Identity,
}

/// The console's routes, or `None` when it is turned off. Starts the metrics sampler, which
/// stops with the server.
pub fn router(app: Arc<App>) -> Option<Router> {
    if !app.settings().console || !app.settings().runs_orchestrator() {
        return None;
    }
    let console = Arc::new(Console {
        app: app.clone(),
        sessions: Mutex::new(HashMap::new()),
        history: Mutex::new(History::default()),
    });
    app.spawn(sample(Arc::downgrade(&console), app.shutdown().clone()));
    let signed_in = Router::new()
        .route("/", get(fleet))
        .route("/fleet/rows", get(fleet_rows))
        .route("/charts", get(charts))
        .route("/charts/live", get(charts_live))
        .route("/audit", get(audit_page))
        .route("/tenants/{id}", get(tenant))
        .route("/tenants/{id}/live", get(tenant_live))
        .route("/tenants/{id}/logs", get(logs))
        .route("/tenants/{id}/settings", post(save_settings))
        .route("/tenants/{id}/wake", post(wake))
        .route("/tenants/{id}/stop", post(stop))
        .route("/tenants/{id}/snapshots/{snapshot}/restore", post(restore))
        .route("/tenants/{id}/inbox/{seq}/retry", post(retry))
        .route("/tenants/{id}/inbox/{seq}/drop", post(drop_letter))
        .route("/signout", post(signout))
        .layer(middleware::from_fn_with_state(
            console.clone(),
            require_session,
        ));
    let open = Router::new()
        .route("/signin", get(signin_page).post(signin))
        .route(
            "/console/console.css",
            get(|| async { asset(CSS, "text/css") }),
        )
        .route(
            "/console/console.js",
            get(|| async { asset(JS, "text/javascript") }),
        )
        .route(
            "/console/icon.svg",
            get(|| async { asset(ICON, "image/svg+xml") }),
        );
    Some(
        signed_in
            .merge(open)
            .layer(middleware::map_response(security_headers))
            .with_state(console),
    )
}

/// Samples the metrics into the history every [`history::SAMPLE_EVERY`] until shutdown or until
/// the console is gone.
async fn sample(console: std::sync::Weak<Console>, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(history::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(c) = console.upgrade() else { return };
        let text = c.app.metrics().encode();
        let now = c.app.clock().now_ms();
        c.history.lock().unwrap().record(&text, now);
    }
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Console {
    /// The live session the request's cookie names, refreshed.
    fn session(&self, headers: &HeaderMap) -> Option<Signed> {
        let id = cookie_value(headers, COOKIE)?;
        let mut sessions = self.sessions.lock().unwrap();
        let now = Instant::now();
        let s = sessions.get_mut(id)?;
        if now.duration_since(s.last_seen) > SESSION_IDLE
            || now.duration_since(s.created) > SESSION_MAX
        {
            sessions.remove(id);
            return None;
        }
        s.last_seen = now;
        Some(Signed {
            id: id.to_owned(),
            csrf: s.csrf.clone(),
            who: s.who.clone(),
        })
    }

    fn open_session(&self, who: Identity) -> String {
        let id = otm_core::id::random_hex(32);
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap();
        sessions.retain(|_, s| {
            now.duration_since(s.last_seen) <= SESSION_IDLE
                && now.duration_since(s.created) <= SESSION_MAX
        });
        while sessions.len() >= MAX_SESSIONS {
            let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                csrf: otm_core::id::random_hex(32),
                who,
                created: now,
                last_seen: now,
                flash: None,
            },
        );
        id
    }

    fn flash(&self, session: &Signed, message: impl Into<String>) {
        if let Some(s) = self.sessions.lock().unwrap().get_mut(&session.id) {
            s.flash = Some(message.into());
        }
    }

    fn take_flash(&self, session: &Signed) -> Option<String> {
        self.sessions
            .lock()
            .unwrap()
            .get_mut(&session.id)
            .and_then(|s| s.flash.take())
    }
}

/// Pages without a session go to the sign-in page; anything else without one is refused.
async fn require_session(State(c): State<Arc<Console>>, mut req: Request, next: Next) -> Response {
    match c.session(req.headers()) {
        Some(s) => {
            req.extensions_mut().insert(s);
            next.run(req).await
        }
        None if req.method() == Method::GET || req.method() == Method::HEAD => {
            Redirect::to("/signin").into_response()
        }
        None => refused("Sign in first: this form needs a console session."),
    }
}

fn refused(message: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        axum::response::Html(page(
            "Refused",
            None,
            None,
            &format!(
                "<h1>Refused</h1><p>{}</p><p><a href=\"/\">Back to the console</a></p>",
                esc(message)
            ),
        )),
    )
        .into_response()
}

/// A form post's checks: its CSRF token, and that the session may write. Answers the refusal.
fn check_post(s: &Signed, form: &HashMap<String, String>) -> Result<(), Box<Response>> {
    let given = form.get("csrf").map(String::as_str).unwrap_or("");
    if !Secret::new(s.csrf.clone()).matches(given) {
        return Err(Box::new(refused(
            "This form is out of date or did not come from this console; reload the page and try again.",
        )));
    }
    if s.who.read_only {
        return Err(Box::new(refused(&format!(
            "The token `{}` is read-only: it can look at the fleet but not change it.",
            s.who.name
        ))));
    }
    Ok(())
}

fn html(body: String) -> Response {
    axum::response::Html(body).into_response()
}

fn nav(s: &Signed) -> Option<(&str, &str)> {
    Some((&s.csrf, &s.who.name))
}

// ---------------------------------------------------------------------------------------------
// Hooks into the audit trail, named tokens and dead-letter handling.

/// Which token `presented` is, if any: the admin token or a named one (read-only or not).
async fn identify(app: &App, presented: &str) -> Option<Identity> {
    match app.authenticate(presented).await {
        Ok(caller) => caller.map(|c| Identity {
            name: c.name,
            read_only: c.read_only,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "console sign-in: the token could not be checked");
            None
        }
    }
}

/// Appends one console write to the audit trail: who (a token's name, `unknown` for a failed
/// sign-in), the method and the console's route, the tenant, the HTTP status it amounted to.
async fn audit(app: &App, who: &str, method: &str, route: &str, tenant: Option<&str>, status: u16) {
    app.audit(who, method, route, tenant, status).await;
}

/// Puts dead letter `seq` back at the head of `tenant`'s inbox, to be delivered at once.
async fn retry_dead_letter(app: &Arc<App>, tenant: &TenantId, seq: i64) -> Result<(), ApiError> {
    app.retry_dead_letters(tenant, otm_core::DeadLetters::One(seq))
        .await?;
    Ok(())
}

/// Drops dead letter `seq` of `tenant`.
async fn drop_dead_letter(app: &Arc<App>, tenant: &TenantId, seq: i64) -> Result<(), ApiError> {
    app.drop_dead_letters(tenant, otm_core::DeadLetters::One(seq))
        .await?;
    Ok(())
}

/// The audit trail's latest entries as table rows.
async fn audit_rows(app: &App) -> Option<String> {
    let entries = match app.registry().audit_list(200, None).await {
        Ok(e) => e,
        Err(e) => {
            return Some(format!(
                "<tr><td colspan=\"5\" class=\"bad\">{}</td></tr>",
                esc(&e.to_string())
            ));
        }
    };
    let now = app.clock().now_ms();
    let mut out = String::new();
    for e in entries {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{} <code>{}</code></td><td>{}</td><td class=\"num{}\">{}</td></tr>",
            ago(now, e.at_ms),
            esc(&e.who),
            esc(&e.method),
            esc(&e.route),
            esc(e.tenant.as_deref().unwrap_or("")),
            if e.status >= 400 { " bad" } else { "" },
            e.status
        );
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Sign-in.

async fn signin_page(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if c.session(&headers).is_some() {
        return Redirect::to("/").into_response();
    }
    signin_form(StatusCode::OK, None)
}

fn signin_form(status: StatusCode, error: Option<&str>) -> Response {
    let csrf = otm_core::id::random_hex(16);
    let body = format!(
        "<h1>Sign in</h1>\
         <form class=\"signin\" method=\"post\" action=\"/signin\">{}\
         <label for=\"token\">Admin token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required autofocus>\
         <button type=\"submit\">Sign in</button></form>\
         <p class=\"hint\">The admin token is in <code>&lt;data-dir&gt;/admin.token</code>, or what \
         <code>OTM_ADMIN_TOKEN</code> says.</p>",
        csrf_field(&csrf)
    );
    let mut resp = (
        status,
        axum::response::Html(page("Sign in", None, error, &body)),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{SIGNIN_COOKIE}={csrf}; Path=/signin; HttpOnly; SameSite=Strict; Max-Age=600"
    )) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

async fn signin(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let given = form.get("csrf").map(String::as_str).unwrap_or("");
    let expected = cookie_value(&headers, SIGNIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !Secret::new(expected).matches(given) {
        return refused("The sign-in form is out of date; reload it and try again.");
    }
    let token = form.get("token").map(|t| t.trim()).unwrap_or("");
    let Some(who) = identify(&c.app, token).await else {
        tracing::warn!("console sign-in with a wrong token");
        audit(&c.app, "unknown", "POST", "/signin", None, 401).await;
        return signin_form(
            StatusCode::UNAUTHORIZED,
            Some("That token is not valid here."),
        );
    };
    tracing::info!(who = %who.name, "console sign-in");
    audit(&c.app, &who.name, "POST", "/signin", None, 303).await;
    let id = c.open_session(who);
    let mut resp = Redirect::to("/").into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_MAX.as_secs()
    )) {
        h.append(header::SET_COOKIE, v);
    }
    h.append(
        header::SET_COOKIE,
        HeaderValue::from_static("otm_console_signin=; Path=/signin; Max-Age=0"),
    );
    resp
}

async fn signout(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let given = form.get("csrf").map(String::as_str).unwrap_or("");
    if !Secret::new(s.csrf.clone()).matches(given) {
        return refused("This form is out of date; reload the page and try again.");
    }
    c.sessions.lock().unwrap().remove(&s.id);
    let mut resp = Redirect::to("/signin").into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static("otm_console=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}

// ---------------------------------------------------------------------------------------------
// The fleet.

/// One tenant as the fleet table shows it.
struct Row {
    id: TenantId,
    state: String,
    profile: String,
    last_active_ms: i64,
    pending: u64,
    oldest_ms: Option<i64>,
    dead: usize,
    last_wake: Option<crate::app::LastWake>,
}

/// What the console calls a tenant's state: awake, asleep, waking, stopping, failed (its last
/// wake failed), or the registry's own word for any other.
fn state_of(app: &App, id: &TenantId, status: &str) -> String {
    match status {
        "running" => "awake".into(),
        "provisioning" => "waking".into(),
        "idle" => match app.last_wake(id) {
            Some(w) if w.error.is_some() => "failed".into(),
            _ => "asleep".into(),
        },
        other => other.to_owned(),
    }
}

const STATES: [&str; 6] = ["awake", "frozen", "asleep", "waking", "stopping", "failed"];

async fn rows(app: &App) -> Result<Vec<Row>, ApiError> {
    let mut out = Vec::new();
    for t in app.registry().list_tenants().await? {
        let inbox = app.registry().inbox_view(&t.id, None, 1000).await?;
        let pending = app
            .registry()
            .inbox_depth(&t.id)
            .await
            .unwrap_or(inbox.pending.len() as u64);
        out.push(Row {
            state: state_of(app, &t.id, t.status.as_str()),
            profile: t.profile.clone(),
            last_active_ms: t.last_active_ms,
            pending,
            oldest_ms: inbox.pending.iter().map(|i| i.accepted_at_ms).min(),
            dead: inbox.dead.len(),
            last_wake: app.last_wake(&t.id),
            id: t.id,
        });
    }
    Ok(out)
}

#[derive(serde::Deserialize, Default)]
struct FleetQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    sort: String,
}

fn filter_and_sort(mut rows: Vec<Row>, q: &FleetQuery) -> Vec<Row> {
    let needle = q.q.trim().to_ascii_lowercase();
    rows.retain(|r| {
        (needle.is_empty() || r.id.as_str().contains(&needle) || r.profile.contains(&needle))
            && (q.state.is_empty() || r.state == q.state)
    });
    let (key, desc) = match q.sort.strip_prefix('-') {
        Some(k) => (k, true),
        None => (q.sort.as_str(), false),
    };
    rows.sort_by(|a, b| {
        let o = match key {
            "state" => a.state.cmp(&b.state),
            "profile" => a.profile.cmp(&b.profile),
            "active" => a.last_active_ms.cmp(&b.last_active_ms),
            "inbox" => a.pending.cmp(&b.pending),
            "age" => b
                .oldest_ms
                .unwrap_or(i64::MAX)
                .cmp(&a.oldest_ms.unwrap_or(i64::MAX)),
            "dead" => a.dead.cmp(&b.dead),
            "wake" => a
                .last_wake
                .as_ref()
                .map_or(0, |w| w.total_ms)
                .cmp(&b.last_wake.as_ref().map_or(0, |w| w.total_ms)),
            _ => std::cmp::Ordering::Equal,
        };
        let o = o.then_with(|| a.id.as_str().cmp(b.id.as_str()));
        if desc { o.reverse() } else { o }
    });
    rows
}

fn phases(w: &crate::app::LastWake) -> String {
    if let Some(e) = &w.error {
        return format!("<span class=\"bad\" title=\"{}\">failed</span>", esc(e));
    }
    let parts: Vec<String> = w
        .phases
        .iter()
        .map(|(p, ms)| format!("{} {ms}", esc(p)))
        .collect();
    format!(
        "{} {} ms <small>{}</small>",
        esc(&w.path),
        w.total_ms,
        parts.join(" · ")
    )
}

fn rows_html(app: &App, rows: &[Row]) -> String {
    let now = app.clock().now_ms();
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("<tr><td colspan=\"8\">No tenants match.</td></tr>");
    }
    for r in rows {
        let _ = write!(
            out,
            "<tr data-tenant=\"{id}\" data-state=\"{state}\">\
             <th scope=\"row\"><a href=\"/tenants/{id}\">{id}</a></th>\
             <td><span class=\"state state-{state}\">{state}</span></td>\
             <td>{profile}</td><td>{active}</td><td class=\"num\">{pending}</td><td>{age}</td>\
             <td class=\"num{deadclass}\">{dead}</td><td>{wake}</td></tr>",
            id = esc(r.id.as_str()),
            state = esc(&r.state),
            profile = esc(&r.profile),
            active = ago(now, r.last_active_ms),
            pending = r.pending,
            age = r
                .oldest_ms
                .map(|t| html::duration(((now - t).max(0) / 1000) as u64))
                .unwrap_or_else(|| "–".into()),
            deadclass = if r.dead > 0 { " bad" } else { "" },
            dead = r.dead,
            wake = r.last_wake.as_ref().map(phases).unwrap_or_default(),
        );
    }
    out
}

fn sort_link(q: &FleetQuery, key: &str, label: &str) -> String {
    let next = if q.sort == key {
        format!("-{key}")
    } else {
        key.to_owned()
    };
    let mark = if q.sort == key {
        " ▲"
    } else if q.sort == format!("-{key}") {
        " ▼"
    } else {
        ""
    };
    let aria = if q.sort == key {
        " aria-sort=\"ascending\""
    } else if q.sort == format!("-{key}") {
        " aria-sort=\"descending\""
    } else {
        ""
    };
    format!(
        "<th scope=\"col\"{aria}><a href=\"/?q={}&amp;state={}&amp;sort={}\">{}{mark}</a></th>",
        html::query_value(&q.q),
        html::query_value(&q.state),
        html::query_value(&next),
        esc(label)
    )
}

async fn fleet(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
    Query(q): Query<FleetQuery>,
) -> Response {
    let rows = match rows(&c.app).await {
        Ok(r) => filter_and_sort(r, &q),
        Err(e) => return error_page(&s, &e),
    };
    let mut body = String::from("<h1>Fleet</h1>");
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/\" role=\"search\" data-filter>\
         <label for=\"q\">Tenant or profile</label><input id=\"q\" name=\"q\" type=\"search\" value=\"{}\">\
         <label for=\"state\">State</label><select id=\"state\" name=\"state\"><option value=\"\">any</option>",
        esc(&q.q)
    );
    for st in STATES {
        let _ = write!(
            body,
            "<option{}>{st}</option>",
            if q.state == st { " selected" } else { "" }
        );
    }
    let _ = write!(
        body,
        "</select><input type=\"hidden\" name=\"sort\" value=\"{}\"><button type=\"submit\">Filter</button></form>\
         <div class=\"scroll\"><table class=\"fleet\"><caption>Tenants, live</caption><thead><tr>{}{}{}{}{}{}{}{}</tr></thead>\
         <tbody id=\"fleet-rows\" data-live=\"/fleet/rows\" data-every=\"2000\">{}</tbody></table></div>",
        esc(&q.sort),
        sort_link(&q, "id", "Tenant"),
        sort_link(&q, "state", "State"),
        sort_link(&q, "profile", "Profile"),
        sort_link(&q, "active", "Last activity"),
        sort_link(&q, "inbox", "Inbox"),
        sort_link(&q, "age", "Oldest pending"),
        sort_link(&q, "dead", "Dead letters"),
        sort_link(&q, "wake", "Last wake (ms by phase)"),
        rows_html(&c.app, &rows)
    );
    html(page("Fleet", nav(&s), c.take_flash(&s).as_deref(), &body))
}

async fn fleet_rows(State(c): State<Arc<Console>>, Query(q): Query<FleetQuery>) -> Response {
    match rows(&c.app).await {
        Ok(r) => html(rows_html(&c.app, &filter_and_sort(r, &q))),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.message).into_response(),
    }
}

fn error_page(s: &Signed, e: &ApiError) -> Response {
    (
        e.status,
        axum::response::Html(page(
            "Error",
            nav(s),
            None,
            &format!(
                "<h1>Something went wrong</h1><p>{}</p><p><a href=\"/\">Back to the fleet</a></p>",
                esc(&e.message)
            ),
        )),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// A tenant.

async fn tenant(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    let t = match admin::load(&c.app, &id).await {
        Ok(t) => t,
        Err(e) => return error_page(&s, &e),
    };
    let view = admin::view(&c.app, &t).await;
    let live = match tenant_live_html(&c.app, &s, &t.id).await {
        Ok(l) => l,
        Err(e) => return error_page(&s, &e),
    };
    let id = esc(t.id.as_str());
    let mut body = format!(
        "<p class=\"crumbs\"><a href=\"/\">Fleet</a> / {id}</p><h1>{id}</h1>\
         <section aria-labelledby=\"h-actions\"><h2 id=\"h-actions\">Actions</h2>{}{}</section>\
         <div id=\"tenant-live\" data-live=\"/tenants/{id}/live\" data-every=\"2000\">{live}</div>",
        button(&format!("/tenants/{id}/wake"), &s.csrf, "Wake", "primary"),
        button(&format!("/tenants/{id}/stop"), &s.csrf, "Stop", ""),
    );
    let _ = write!(
        body,
        "<section aria-labelledby=\"h-logs\"><h2 id=\"h-logs\">Agent log</h2>\
         <pre id=\"log\" class=\"log\" data-logs=\"/tenants/{id}/logs\" tabindex=\"0\" aria-live=\"polite\">\
         </pre><noscript><p><a href=\"/tenants/{id}/logs?tail=200\">The last 200 lines</a></p></noscript></section>"
    );
    body.push_str(&settings_form(&c.app, &s, &view));
    body.push_str(&snapshots_html(&c.app, &s, &t.id).await);
    html(page(
        t.id.as_str(),
        nav(&s),
        c.take_flash(&s).as_deref(),
        &body,
    ))
}

async fn tenant_live(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    let id = match TenantId::parse(&id) {
        Ok(id) => id,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    match tenant_live_html(&c.app, &s, &id).await {
        Ok(l) => html(l),
        Err(e) => (e.status, e.message).into_response(),
    }
}

/// The parts of a tenant's page that change by themselves: its state and its inbox.
async fn tenant_live_html(app: &App, s: &Signed, id: &TenantId) -> Result<String, ApiError> {
    let t = admin::load(app, id.as_str()).await?;
    let now = app.clock().now_ms();
    let state = state_of(app, &t.id, t.status.as_str());
    let instance = app
        .registry()
        .instance_of(&t.id)
        .await
        .ok()
        .flatten()
        .map(|i| i.id.to_string())
        .unwrap_or_else(|| "none".into());
    let mut out = format!(
        "<section aria-labelledby=\"h-state\"><h2 id=\"h-state\">State</h2><dl class=\"facts\">\
         <dt>State</dt><dd><span class=\"state state-{st}\" data-state=\"{st}\">{st}</span></dd>\
         <dt>Profile</dt><dd>{}</dd><dt>Instance</dt><dd>{}</dd>\
         <dt>Last activity</dt><dd>{}</dd><dt>Last wake</dt><dd>{}</dd>",
        esc(&t.profile),
        esc(&instance),
        ago(now, t.last_active_ms),
        app.last_wake(&t.id)
            .map(|w| format!("{} ({})", phases(&w), ago(now, w.at_ms)))
            .unwrap_or_else(|| "none seen by this server".into()),
        st = esc(&state),
    );
    if let Some(k) = app.last_limit_kill(&t.id) {
        let _ = write!(
            out,
            "<dt>Last limit kill</dt><dd class=\"bad\">{:?}: {} ({})</dd>",
            k.limit,
            esc(&k.detail),
            ago(now, k.at_ms)
        );
    }
    out.push_str("</dl></section>");
    let inbox = app.registry().inbox_view(&t.id, None, 200).await?;
    let idq = esc(t.id.as_str());
    let _ = write!(
        out,
        "<section aria-labelledby=\"h-inbox\"><h2 id=\"h-inbox\">Inbox</h2>\
         <p>{} pending{}</p>",
        inbox.pending.len(),
        inbox
            .pending
            .iter()
            .map(|i| i.accepted_at_ms)
            .min()
            .map(|t| format!(
                ", the oldest for {}",
                html::duration(((now - t).max(0) / 1000) as u64)
            ))
            .unwrap_or_default()
    );
    let _ = write!(
        out,
        "<h3>Dead letters</h3>{}",
        if inbox.dead.is_empty() {
            "<p id=\"no-dead-letters\">None.</p>".to_owned()
        } else {
            String::new()
        }
    );
    if !inbox.dead.is_empty() {
        out.push_str(
            "<div class=\"scroll\"><table class=\"dead\"><thead><tr><th scope=\"col\">Seq</th><th scope=\"col\">Update</th>\
             <th scope=\"col\">Attempts</th><th scope=\"col\">Accepted</th><th scope=\"col\">Last error</th>\
             <th scope=\"col\">Actions</th></tr></thead><tbody>",
        );
        for d in &inbox.dead {
            let (kind, text) = d.failure();
            let _ = write!(
                out,
                "<tr data-seq=\"{seq}\"><td>{seq}</td><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td><td>{}{}</td></tr>",
                d.update_id,
                d.attempts,
                ago(now, d.accepted_at_ms),
                kind.map(|k| format!("<strong>{k}</strong> "))
                    .unwrap_or_default(),
                esc(text.unwrap_or("")),
                button(
                    &format!("/tenants/{idq}/inbox/{}/retry", d.seq),
                    &s.csrf,
                    "Retry",
                    "primary"
                ),
                button(
                    &format!("/tenants/{idq}/inbox/{}/drop", d.seq),
                    &s.csrf,
                    "Drop",
                    "danger"
                ),
                seq = d.seq,
            );
        }
        out.push_str("</tbody></table></div>");
    }
    out.push_str("</section>");
    Ok(out)
}

fn settings_form(app: &App, s: &Signed, v: &otm_core::admin_api::TenantView) -> String {
    let id = esc(v.id.as_str());
    let own = &v.own_limits;
    let num = |o: Option<u64>| o.map(|n| n.to_string()).unwrap_or_default();
    let mut profiles = String::new();
    for p in otm_shim::known_profiles() {
        if *p == otm_shim::profile::PROBE_PROFILE
            && !app.settings().allow_probe_profile
            && v.profile != *p
        {
            continue;
        }
        let _ = write!(
            profiles,
            "<option{}>{}</option>",
            if v.profile == *p { " selected" } else { "" },
            esc(p)
        );
    }
    let field = |name: &str, label: &str, value: &str, hint: &str| {
        format!(
            "<label for=\"f-{name}\">{label}</label><input id=\"f-{name}\" name=\"{name}\" value=\"{}\" placeholder=\"{}\">",
            esc(value),
            esc(hint)
        )
    };
    format!(
        "<section aria-labelledby=\"h-settings\"><h2 id=\"h-settings\">Settings</h2>\
         <form class=\"settings\" method=\"post\" action=\"/tenants/{id}/settings\">{csrf}\
         <label for=\"f-profile\">Profile</label><select id=\"f-profile\" name=\"profile\">{profiles}</select>\
         <label for=\"f-idle\">Idle timeout (s)</label><input id=\"f-idle\" name=\"idle_timeout_s\" type=\"number\" min=\"1\" value=\"{idle}\">\
         <label for=\"f-notice\">Cold-start notice</label><select id=\"f-notice\" name=\"cold_start_notice\">\
         <option value=\"false\"{no}>off</option><option value=\"true\"{yes}>on</option></select>\
         {memory}{cpu}{pids}{disk}\
         <label for=\"f-egress\">Egress</label><select id=\"f-egress\" name=\"egress\">\
         <option{enone}>none</option><option{eproxy}>proxy</option></select>\
         {allow}{users}{rpm}{tpd}\
         <label for=\"f-bot\">Bot token <small>(write-only; {bot})</small></label>\
         <input id=\"f-bot\" name=\"bot_token\" type=\"password\" autocomplete=\"off\" placeholder=\"unchanged\">\
         <label for=\"f-key\">Model API key <small>(write-only; {key})</small></label>\
         <input id=\"f-key\" name=\"model_api_key\" type=\"password\" autocomplete=\"off\" placeholder=\"unchanged\">\
         <button type=\"submit\" class=\"primary\">Save settings</button></form></section>",
        csrf = csrf_field(&s.csrf),
        idle = v.idle_timeout_s,
        no = if v.cold_start_notice { "" } else { " selected" },
        yes = if v.cold_start_notice { " selected" } else { "" },
        memory = field(
            "memory",
            "Memory",
            &num(own.memory_bytes),
            &format!("default ({} bytes)", v.limits.memory_bytes)
        ),
        cpu = field(
            "cpu",
            "CPU",
            &own.cpu_millis.map(|m| format!("{m}m")).unwrap_or_default(),
            &format!("default ({}m)", v.limits.cpu_millis)
        ),
        pids = field(
            "pids",
            "Processes",
            &num(own.pids.map(u64::from)),
            &format!("default ({})", v.limits.pids)
        ),
        disk = field(
            "disk",
            "Disk",
            &num(own.disk_bytes),
            &format!("default ({} bytes)", v.limits.disk_bytes)
        ),
        enone = if v.egress == "none" { " selected" } else { "" },
        eproxy = if v.egress == "proxy" { " selected" } else { "" },
        allow = field(
            "egress_allow",
            "Egress hosts (comma-separated)",
            &v.egress_allow.join(", "),
            "example.com, *.example.org"
        ),
        // The list as shown goes back too: an untouched field changes nothing (an empty list
        // never set is the profile's default, one set on purpose is nobody).
        users = format_args!(
            "{}<input type=\"hidden\" name=\"allowed_users_was\" value=\"{}\">",
            field(
                "allowed_users",
                "Allowed users (comma-separated ids, or *)",
                &v.allowed_users.join(", "),
                if v.dm_policy == "open" {
                    "anyone"
                } else {
                    "nobody"
                }
            ),
            esc(&v.allowed_users.join(", "))
        ),
        rpm = field(
            "model_requests_per_minute",
            "Model requests a minute",
            &num(own.model_requests_per_minute.map(u64::from)),
            "default"
        ),
        tpd = field(
            "model_tokens_per_day",
            "Model tokens a day",
            &num(own.model_tokens_per_day),
            "default"
        ),
        bot = if v.has_bot_token { "set" } else { "not set" },
        key = if v.has_model_api_key {
            "set"
        } else {
            "not set"
        },
    )
}

async fn snapshots_html(app: &App, s: &Signed, id: &TenantId) -> String {
    let head = app.state().head(id).await.ok().flatten().map(|h| h.id);
    let list = match app.state().list(id).await {
        Ok(l) => l,
        Err(e) => {
            return format!(
                "<section><h2>Snapshots</h2><p class=\"bad\">{}</p></section>",
                esc(&e.to_string())
            );
        }
    };
    let now = app.clock().now_ms();
    let mut out = String::from(
        "<section aria-labelledby=\"h-snapshots\"><h2 id=\"h-snapshots\">Snapshots</h2>",
    );
    if list.is_empty() {
        out.push_str("<p>None yet: the first is taken when the tenant goes to sleep.</p>");
    } else {
        out.push_str(
            "<div class=\"scroll\"><table class=\"snapshots\"><thead><tr><th scope=\"col\">Snapshot</th>\
             <th scope=\"col\">Taken</th><th scope=\"col\">Reason</th><th scope=\"col\">Size</th><th scope=\"col\"></th></tr></thead><tbody>",
        );
        for m in list.iter().rev() {
            let is_head = Some(&m.id) == head.as_ref();
            let _ = write!(
                out,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                esc(&m.id.to_string()),
                ago(now, m.created_at_ms),
                esc(&m.reason),
                m.size,
                if is_head {
                    "<strong>restored on the next wake</strong>".to_owned()
                } else {
                    button(
                        &format!(
                            "/tenants/{}/snapshots/{}/restore",
                            esc(id.as_str()),
                            esc(&m.id.to_string())
                        ),
                        &s.csrf,
                        "Restore this one",
                        "",
                    )
                }
            );
        }
        out.push_str("</tbody></table></div>");
    }
    out.push_str("</section>");
    out
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    tail: Option<usize>,
    #[serde(default)]
    follow: bool,
}

/// The agent's log as plain text, followed while `follow` is set. A tenant without an instance
/// answers one line that says so (the page's script asks again a moment later).
async fn logs(
    State(c): State<Arc<Console>>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Response {
    let text = |status: StatusCode, body: String| {
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response()
    };
    let t = match admin::load(&c.app, &id).await {
        Ok(t) => t,
        Err(e) => return text(e.status, e.message),
    };
    let rec = match c.app.registry().instance_of(&t.id).await {
        Ok(Some(rec)) => rec,
        Ok(None) => {
            return text(
                StatusCode::OK,
                format!(
                    "(tenant {} is not running; its log shows when it wakes)\n",
                    t.id
                ),
            );
        }
        Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let shim = otm_shim::ShimClient::new(rec.address.clone(), rec.shim_token.clone());
    match shim.logs(q.tail.unwrap_or(200).min(5000), q.follow).await {
        Ok(stream) => {
            let body = axum::body::Body::from_stream(futures::StreamExt::map(stream, |r| {
                r.map_err(std::io::Error::other)
            }));
            (
                [
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                body,
            )
                .into_response()
        }
        Err(e) => text(
            StatusCode::OK,
            format!("(the log of tenant {} cannot be read now: {e})\n", t.id),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The forms.

/// Runs one console write after its checks, audits it under its console `route`, leaves its
/// outcome as the next page's notice and sends the browser back to the tenant's page.
async fn write_action<F>(
    c: &Console,
    s: &Signed,
    form: &HashMap<String, String>,
    tenant: &str,
    route: &str,
    act: F,
) -> Response
where
    F: std::future::Future<Output = Result<String, ApiError>>,
{
    let audited = TenantId::parse(tenant).ok();
    let audited = audited.as_ref().map(TenantId::as_str);
    if let Err(refusal) = check_post(s, form) {
        audit(&c.app, &s.who.name, "POST", route, audited, 403).await;
        return *refusal;
    }
    let (notice, status) = match act.await {
        Ok(done) => (done, 200),
        Err(e) => (format!("Failed: {}", e.message), e.status.as_u16()),
    };
    audit(&c.app, &s.who.name, "POST", route, audited, status).await;
    c.flash(s, notice);
    let back = match TenantId::parse(tenant) {
        Ok(id) => format!("/tenants/{id}"),
        Err(_) => "/".to_owned(),
    };
    Redirect::to(&back).into_response()
}

async fn wake(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let app = c.app.clone();
    write_action(&c, &s, &form, &id, "/tenants/{id}/wake", async {
        let t = admin::load(&app, &id).await?;
        let w = app.wake(&t.id, None).await?;
        Ok(format!(
            "{} is awake ({} wake, {} ms).",
            t.id,
            w.path.as_str(),
            w.total_ms
        ))
    })
    .await
}

async fn stop(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let app = c.app.clone();
    write_action(&c, &s, &form, &id, "/tenants/{id}/stop", async {
        let t = admin::load(&app, &id).await?;
        let stopped = crate::orchestrator::stop(&app, &t.id, "admin").await?;
        Ok(if stopped {
            format!("{} was stopped; its state is in a snapshot.", t.id)
        } else {
            format!("{} was not running.", t.id)
        })
    })
    .await
}

async fn restore(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
    Path((id, snapshot)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let app = c.app.clone();
    write_action(
        &c,
        &s,
        &form,
        &id,
        "/tenants/{id}/snapshots/{snapshot}/restore",
        async {
            let t = admin::load(&app, &id).await?;
            let snap = otm_core::SnapshotId::parse(&snapshot)?;
            crate::orchestrator::restore_snapshot(&app, &t.id, &snap).await?;
            Ok(format!(
                "Snapshot {snap} is the head now: the next wake of {} restores it.",
                t.id
            ))
        },
    )
    .await
}

async fn retry(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
    Path((id, seq)): Path<(String, i64)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let app = c.app.clone();
    write_action(
        &c,
        &s,
        &form,
        &id,
        "/tenants/{id}/inbox/{seq}/retry",
        async {
            let t = admin::load(&app, &id).await?;
            retry_dead_letter(&app, &t.id, seq).await?;
            Ok(format!(
                "Update {seq} is back at the head of {}'s inbox.",
                t.id
            ))
        },
    )
    .await
}

async fn drop_letter(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
    Path((id, seq)): Path<(String, i64)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let app = c.app.clone();
    write_action(
        &c,
        &s,
        &form,
        &id,
        "/tenants/{id}/inbox/{seq}/drop",
        async {
            let t = admin::load(&app, &id).await?;
            drop_dead_letter(&app, &t.id, seq).await?;
            Ok(format!("Dead letter {seq} of {} was dropped.", t.id))
        },
    )
    .await
}

/// The settings form as the admin API's patch body: empty fields are left as they are, lists
/// are comma-separated, secrets only when given.
fn patch_of(form: &HashMap<String, String>) -> Result<otm_core::admin_api::PatchTenant, String> {
    use serde_json::{Map, Value};
    let mut body = Map::new();
    let given = |k: &str| form.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let list = |v: &str| -> Vec<Value> {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.to_owned()))
            .collect()
    };
    for k in ["profile", "bot_token", "model_api_key", "egress"] {
        if let Some(v) = given(k) {
            body.insert(k.into(), Value::String(v.to_owned()));
        }
    }
    for k in [
        "memory",
        "cpu",
        "pids",
        "disk",
        "model_requests_per_minute",
        "model_tokens_per_day",
    ] {
        if let Some(v) = given(k) {
            let value = match v.parse::<u64>() {
                Ok(n) => Value::from(n),
                Err(_) => Value::String(v.to_owned()),
            };
            body.insert(k.into(), value);
        }
    }
    if let Some(v) = given("idle_timeout_s") {
        let n: u64 = v
            .parse()
            .map_err(|_| format!("idle timeout: `{v}` is not a number of seconds"))?;
        body.insert("idle_timeout_s".into(), Value::from(n));
    }
    if let Some(v) = given("cold_start_notice") {
        body.insert("cold_start_notice".into(), Value::Bool(v == "true"));
    }
    if given("egress") == Some("proxy") {
        body.insert(
            "egress_allow".into(),
            Value::Array(list(given("egress_allow").unwrap_or(""))),
        );
    }
    if let Some(v) = form.get("allowed_users") {
        let was = form.get("allowed_users_was").map(|w| list(w));
        if was.as_ref() != Some(&list(v)) {
            body.insert("allowed_users".into(), Value::Array(list(v)));
        }
    }
    serde_json::from_value(Value::Object(body)).map_err(|e| e.to_string())
}

async fn save_settings(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let app = c.app.clone();
    let patch = patch_of(&form);
    write_action(&c, &s, &form, &id, "/tenants/{id}/settings", async {
        let patch = patch
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, e))?;
        admin::patch(&app, &id, patch).await?;
        Ok(format!("Settings of {id} saved."))
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Charts and the audit trail.

fn charts_html(c: &Console) -> String {
    let history = c.history.lock().unwrap();
    let to = c.app.clock().now_ms();
    let from = to - (history::POINTS as i64) * history::SAMPLE_EVERY.as_millis() as i64;
    let samples: Vec<&history::Sample> = history.samples().collect();
    let series_of = |keys: Vec<String>, get: &dyn Fn(&history::Sample, &str) -> Option<f64>| {
        keys.into_iter()
            .map(|k| html::Series {
                points: samples.iter().map(|s| (s.at_ms, get(s, &k))).collect(),
                name: k,
            })
            .collect::<Vec<_>>()
    };
    let keys = |f: &dyn Fn(&history::Sample) -> Vec<String>| {
        let mut k: Vec<String> = samples.iter().flat_map(|s| f(s)).collect();
        k.sort();
        k.dedup();
        k
    };
    let wake_keys = keys(&|s| s.wake_ms.keys().cloned().collect());
    let phase_keys = keys(&|s| s.phase_ms.keys().cloned().collect());
    let state_keys = keys(&|s| s.instances.keys().cloned().collect());
    let mut out = String::new();
    out.push_str(&html::chart(
        "Wake latency by path",
        "ms, mean over 10 s",
        from,
        to,
        &series_of(wake_keys, &|s, k| s.wake_ms.get(k).copied()),
    ));
    out.push_str(&html::chart(
        "Wake latency by path and phase",
        "ms, mean over 10 s",
        from,
        to,
        &series_of(phase_keys, &|s, k| s.phase_ms.get(k).copied()),
    ));
    out.push_str(&html::chart(
        "Updates accepted",
        "per second",
        from,
        to,
        &[html::Series {
            name: "accepts/s".into(),
            points: samples
                .iter()
                .map(|s| (s.at_ms, Some(s.accepts_per_s)))
                .collect(),
        }],
    ));
    out.push_str(&html::chart(
        "Instances by state",
        "count",
        from,
        to,
        &series_of(state_keys, &|s, k| s.instances.get(k).copied()),
    ));
    let _ = write!(
        out,
        "<p class=\"hint\">{} samples, one every {} s, kept in this server's memory for an hour.</p>",
        samples.len(),
        history::SAMPLE_EVERY.as_secs()
    );
    out
}

async fn charts(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
) -> Response {
    let body = format!(
        "<h1>Charts</h1><div id=\"charts\" class=\"charts\" data-live=\"/charts/live\" data-every=\"10000\">{}</div>",
        charts_html(&c)
    );
    html(page("Charts", nav(&s), None, &body))
}

async fn charts_live(State(c): State<Arc<Console>>) -> Response {
    html(charts_html(&c))
}

async fn audit_page(
    State(c): State<Arc<Console>>,
    axum::Extension(s): axum::Extension<Signed>,
) -> Response {
    let body = match audit_rows(&c.app).await {
        Some(rows) => format!(
            "<h1>Audit trail</h1><div class=\"scroll\"><table class=\"audit\"><thead><tr>\
             <th scope=\"col\">When</th><th scope=\"col\">Who</th><th scope=\"col\">What</th>\
             <th scope=\"col\">Tenant</th><th scope=\"col\">Status</th></tr></thead><tbody>{rows}</tbody></table></div>"
        ),
        None => "<h1>Audit trail</h1><p>This server keeps no audit trail.</p>".to_owned(),
    };
    html(page("Audit trail", nav(&s), None, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_form_becomes_a_patch_of_what_was_filled_in() {
        let form: HashMap<String, String> = [
            ("csrf", "x"),
            ("profile", "reference"),
            ("idle_timeout_s", "90"),
            ("cold_start_notice", "true"),
            ("memory", "256Mi"),
            ("pids", "128"),
            ("cpu", ""),
            ("egress", "proxy"),
            ("egress_allow", "example.com, *.example.org"),
            ("allowed_users", ""),
            ("allowed_users_was", "501"),
            ("bot_token", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let p = patch_of(&form).unwrap();
        assert_eq!(p.idle_timeout_s, Some(90));
        assert_eq!(p.cold_start_notice, Some(true));
        assert_eq!(p.memory, Some(serde_json::json!("256Mi")));
        assert_eq!(p.pids, Some(serde_json::json!(128)));
        assert_eq!(p.cpu, None, "an empty field leaves the setting alone");
        assert_eq!(
            p.bot_token, None,
            "an empty secret field leaves the secret alone"
        );
        assert_eq!(
            p.egress_allow,
            Some(vec!["example.com".to_owned(), "*.example.org".to_owned()])
        );
        assert_eq!(p.allowed_users, Some(vec![]), "emptied: nobody");
        let untouched: HashMap<String, String> = [("allowed_users", ""), ("allowed_users_was", "")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(
            patch_of(&untouched).unwrap().allowed_users,
            None,
            "an untouched list changes nothing"
        );
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; otm_console=abc; b=2"),
        );
        assert_eq!(cookie_value(&h, COOKIE), Some("abc"));
        assert_eq!(cookie_value(&h, "c"), None);
    }
}
