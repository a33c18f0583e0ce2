//! The admin API under `/v1/` (bearer token) and `/metrics`. Errors are
//! `{"error": {"code", "message"}}`. Secrets are write-only: no answer contains one.

use crate::api_error::{ApiError, ApiResult};
use crate::app::App;
use crate::orchestrator;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use otm_core::admin_api::{
    AuditPage, CreateTenant, CreateToken, DropAnswer, ErrorCode, InboxAnswer, InstanceView,
    LimitsBody, NewToken, PatchTenant, PutConfig, RestoreView, RetryAnswer, RotateAnswer,
    RotateRequest, SnapshotEntry, SnapshotList, StatusView, StopView, TenantView, TokenView,
    WakeView,
};
use otm_core::{Error, FleetSettings, InstanceRecord, Secret, Tenant, TenantId};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

/// JSON bodies that fail to parse answer in the API's error shape.
struct ApiJson<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

pub fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/tenants", get(list_tenants).post(create_tenant))
        .route(
            "/tenants/{id}",
            get(get_tenant).patch(patch_tenant).delete(delete_tenant),
        )
        .route("/tenants/{id}/wake", post(wake_tenant))
        .route("/tenants/{id}/stop", post(stop_tenant))
        .route("/tenants/{id}/inbox", get(inbox))
        .route("/tenants/{id}/inbox/{seq}", delete(drop_dead_letters))
        .route("/tenants/{id}/inbox/{seq}/retry", post(retry_dead_letters))
        .route("/tenants/{id}/snapshots", get(snapshots))
        .route("/tenants/{id}/export", get(export))
        .route(
            "/tenants/{id}/snapshots/{snapshot}/restore",
            post(restore_snapshot),
        )
        .route("/tenants/{id}/logs", get(logs))
        .route("/instances", get(instances))
        .route("/config", get(get_config).put(put_config))
        .route("/status", get(status))
        .route("/secrets/rotate", post(rotate_secrets))
        .route("/audit", get(audit))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{name}", delete(revoke_token))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
        })
        // Authentication wraps every /v1 route, the fallback included.
        .layer(middleware::from_fn_with_state(app.clone(), authorize));
    let internal = Router::new()
        .route("/wake/{id}", post(internal_wake))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            authorize_service,
        ));
    let base = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }));
    if !app.settings().runs_orchestrator() {
        // A router serves no admin API: tenants and instances are the orchestrators' business.
        let elsewhere = || async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "this is a router; the admin API is served by the orchestrators",
            )
        };
        return base
            .nest("/v1", Router::new().fallback(elsewhere))
            .with_state(app);
    }
    base.nest("/v1", v1)
        .nest("/internal/v1", internal)
        .with_state(app)
}

/// Routers present the shared service token; in the `all` role the admin token works too.
async fn authorize_service(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = match (presented, &app.settings().service_token) {
        (Some(t), Some(service)) => service.matches(t),
        (Some(t), None) => app.admin_token().matches(t),
        (None, _) => false,
    };
    if ok {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or wrong service token",
        )
        .into_response()
    }
}

async fn internal_wake(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<crate::remote::WakeRequest>,
) -> ApiResult<Json<crate::remote::WakeAnswer>> {
    let t = load(&app, &id).await?;
    let woken = app.wake(&t.id, body.chat).await?;
    Ok(Json(crate::remote::WakeAnswer::from(&woken)))
}

/// Re-encrypts every tenant's secrets under a new key (see [`otm_store::secrets::rotate`]).
/// An empty body is the defaults.
async fn rotate_secrets(
    State(app): State<Arc<App>>,
    body: axum::body::Bytes,
) -> ApiResult<Json<RotateAnswer>> {
    let req: RotateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RotateRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(e.to_string()))?
    };
    let _one_at_a_time = app.rotation_lock().lock().await;
    let done = app
        .sealed()
        .rotate(req.new_key, req.retire_old_keys)
        .await?;
    tracing::info!(key = %done.key_id, new_key = done.new_key, reencrypted = done.reencrypted, failed = done.failed.len(), retired = ?done.retired, "secrets rotated");
    let otm_store::secrets::Rotation {
        key_id,
        new_key,
        reencrypted,
        unchanged,
        failed,
        retired,
    } = done;
    Ok(Json(RotateAnswer {
        key_id,
        new_key,
        reencrypted,
        unchanged,
        failed,
        retired,
    }))
}

/// Authenticates every `/v1` call, refuses writes of read-only tokens, and records every write
/// (and every failed sign-in) in the audit trail.
async fn authorize(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    // Under `nest("/v1", …)` the path arrives without its prefix; the trail names it whole.
    let path = match req.uri().path() {
        p if p.starts_with("/v1/") => p.to_owned(),
        p => format!("/v1{p}"),
    };
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| path.clone());
    let tenant = path
        .strip_prefix("/v1/tenants/")
        .and_then(|rest| rest.split('/').next())
        .filter(|id| !id.is_empty())
        .map(str::to_owned);
    let write = !matches!(method, Method::GET | Method::HEAD);
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_owned());
    let refuse = |status: StatusCode, code: ErrorCode, message: &str| {
        ApiError::new(status, code, message).into_response()
    };
    let caller = match presented {
        None => None,
        Some(t) => match app.authenticate(&t).await {
            Ok(c) => c,
            Err(e) => return ApiError::from(e).into_response(),
        },
    };
    let Some(caller) = caller else {
        let response = if req.headers().contains_key("authorization") {
            refuse(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "wrong or revoked admin token",
            )
        } else {
            refuse(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing admin token: send Authorization: Bearer <token> (see <data-dir>/admin.token)",
            )
        };
        app.audit(
            crate::app::UNKNOWN_CALLER,
            method.as_str(),
            &route,
            tenant.as_deref(),
            response.status().as_u16(),
        )
        .await;
        return response;
    };
    let response = if write && caller.read_only {
        refuse(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            &format!(
                "the token `{}` is read-only: it may read everything and change nothing",
                caller.name
            ),
        )
    } else {
        req.extensions_mut().insert(caller.clone());
        next.run(req).await
    };
    if write {
        app.audit(
            &caller.name,
            method.as_str(),
            &route,
            tenant.as_deref(),
            response.status().as_u16(),
        )
        .await;
    }
    response
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
    before: Option<i64>,
}

/// The audit trail, newest first: at most `limit` entries (100 by default, 1000 at most), older
/// than the entry `before` names.
async fn audit(
    State(app): State<Arc<App>>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<AuditPage>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let entries = app.registry().audit_list(limit, q.before).await?;
    let next_before = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(AuditPage {
        entries,
        next_before,
    }))
}

/// A token name: lowercase letters, digits, `-` and `_`, up to 63, not one of the reserved.
fn check_token_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(ApiError::bad_request(format!(
            "`{name}` is not a token name: use 1 to 63 lowercase letters, digits, - and _"
        )));
    }
    if name == crate::app::ADMIN_NAME || name == crate::app::UNKNOWN_CALLER {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::AlreadyExists,
            format!("the token name `{name}` is reserved"),
        ));
    }
    Ok(())
}

async fn create_token(
    State(app): State<Arc<App>>,
    ApiJson(body): ApiJson<CreateToken>,
) -> ApiResult<(StatusCode, Json<NewToken>)> {
    check_token_name(&body.name)?;
    let token = otm_core::id::random_hex(32);
    let record = otm_core::AdminToken {
        name: body.name.clone(),
        digest: otm_core::secret::digest(&token),
        read_only: body.read_only,
        created_at_ms: app.clock().now_ms(),
    };
    app.registry().token_create(&record).await?;
    tracing::info!(name = %record.name, read_only = record.read_only, "admin token created");
    Ok((
        StatusCode::CREATED,
        Json(NewToken {
            name: record.name,
            read_only: record.read_only,
            created_at_ms: record.created_at_ms,
            token,
        }),
    ))
}

async fn list_tokens(State(app): State<Arc<App>>) -> ApiResult<Json<Vec<TokenView>>> {
    let list = app.registry().token_list().await?;
    Ok(Json(
        list.into_iter()
            .map(|t| TokenView {
                name: t.name,
                read_only: t.read_only,
                created_at_ms: t.created_at_ms,
            })
            .collect(),
    ))
}

async fn revoke_token(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    if app.registry().token_revoke(&name).await? {
        tracing::info!(%name, "admin token revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(&format!("admin token {name}")))
    }
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        app.metrics().encode(),
    )
}

pub(crate) async fn view(app: &App, t: &Tenant) -> TenantView {
    let defaults = app
        .registry()
        .get_settings()
        .await
        .map(|s| s.default_limits)
        .unwrap_or_default();
    view_with(app, t, &defaults).await
}

/// [`view`] with the fleet's default limits already read (once for a whole list).
async fn view_with(app: &App, t: &Tenant, defaults: &otm_core::ResourceLimits) -> TenantView {
    let instance = app
        .registry()
        .instance_of(&t.id)
        .await
        .ok()
        .flatten()
        .map(|i| i.id.to_string());
    TenantView {
        id: t.id.clone(),
        profile: t.profile.clone(),
        status: t.status,
        idle_timeout_s: t.idle_timeout_s,
        freeze_after_s: t.limits.freeze_after_s(),
        cold_start_notice: t.cold_start_notice,
        has_bot_token: t.bot_token.is_some(),
        webhook_url: app.webhook_url(&t.id),
        created_at_ms: t.created_at_ms,
        last_active_ms: t.last_active_ms,
        instance,
        inbox_pending: app.registry().inbox_depth(&t.id).await.unwrap_or(0),
        limits: t.limits.over(defaults),
        own_limits: t.limits.without_secrets(),
        egress: t.limits.egress().to_owned(),
        egress_allow: t.limits.egress_allow.clone().unwrap_or_default(),
        allowed_users: t.limits.allowed_users.clone().unwrap_or_default(),
        dm_policy: dm_policy(t).to_owned(),
        has_model_api_key: t.limits.model_api_key.is_some(),
        model_budget: app.model_budget_view(t),
        last_limit_kill: app.last_limit_kill(&t.id),
        last_restore_fallback: app.last_restore_fallback(&t.id),
    }
}

/// The DM policy a tenant's agent applies: what `allowed_users` says, and where it was never set,
/// the profile's own default (OpenClaw answers nobody; the reference agent, which has no tools,
/// answers anyone).
fn dm_policy(t: &Tenant) -> &'static str {
    if t.limits.allowed_users.is_none() && t.profile != "openclaw" {
        return otm_core::DmPolicy::Anyone.openclaw_name();
    }
    t.limits.dm_policy().openclaw_name()
}

/// The limit fields of a create or patch body, which name them one by one (`deny_unknown_fields`
/// does not go with `flatten`).
macro_rules! limits_body {
    ($b:expr) => {
        LimitsBody {
            memory: $b.memory.clone(),
            cpu: $b.cpu.clone(),
            pids: $b.pids.clone(),
            disk: $b.disk.clone(),
            egress: $b.egress.clone(),
            egress_allow: $b.egress_allow.clone(),
            allowed_users: $b.allowed_users.clone(),
        }
    };
}

/// Resource limits as the API takes them (see [`otm_core::admin_api::CreateTenant`]).
trait ApplyLimits {
    fn apply(&self, to: &mut otm_core::TenantLimits) -> ApiResult<()>;
}

impl ApplyLimits for LimitsBody {
    fn apply(&self, to: &mut otm_core::TenantLimits) -> ApiResult<()> {
        fn text(v: &Value) -> Option<String> {
            match v {
                Value::Null => None,
                Value::String(s) if s == "default" => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            }
        }
        let bad = |name: &str, e: String| ApiError::bad_request(format!("{name}: {e}"));
        if let Some(v) = &self.memory {
            to.memory_bytes = text(v)
                .map(|s| otm_core::quantity::parse_bytes(&s))
                .transpose()
                .map_err(|e| bad("memory", e))?;
            if to.memory_bytes.is_some_and(|m| m < 16 << 20) {
                return Err(ApiError::bad_request("memory must be at least 16Mi"));
            }
        }
        if let Some(v) = &self.disk {
            to.disk_bytes = text(v)
                .map(|s| otm_core::quantity::parse_bytes(&s))
                .transpose()
                .map_err(|e| bad("disk", e))?;
        }
        if let Some(v) = &self.cpu {
            to.cpu_millis = text(v)
                .map(|s| otm_core::quantity::parse_cpu(&s))
                .transpose()
                .map_err(|e| bad("cpu", e))?;
        }
        if let Some(list) = &self.egress_allow {
            for h in list {
                let name = h.strip_prefix("*.").unwrap_or(h);
                let ok = !name.is_empty()
                    && name.len() <= 253
                    && name.split('.').all(|l| {
                        !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    })
                    && name.parse::<std::net::IpAddr>().is_err();
                if !ok {
                    return Err(ApiError::bad_request(format!(
                        "egress_allow: `{h}` is not a host name (example.com, or *.example.com for its subdomains)"
                    )));
                }
            }
            to.egress_allow = Some(list.iter().map(|h| h.to_ascii_lowercase()).collect())
                .filter(|l: &Vec<String>| !l.is_empty());
        }
        if let Some(list) = &self.allowed_users {
            let mut users = Vec::new();
            for v in list {
                let entry = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => other.to_string(),
                };
                let user = otm_core::check_allowed_user(&entry)
                    .map_err(|e| ApiError::bad_request(format!("allowed_users: {e}")))?;
                if !users.contains(&user) {
                    users.push(user);
                }
            }
            // Kept even when empty: an empty list set on purpose is nobody, for every profile,
            // while a list never set leaves each agent to its own default.
            to.allowed_users = Some(users);
        }
        match self.egress.as_deref() {
            None => {}
            Some("none") => to.egress_allow = None,
            Some("proxy") if to.egress_allow.as_ref().is_some_and(|a| !a.is_empty()) => {}
            Some("proxy") => {
                return Err(ApiError::bad_request(
                    "egress `proxy` needs egress_allow: the host names it may reach",
                ));
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "egress: `{other}` is not none or proxy"
                )));
            }
        }
        if let Some(v) = &self.pids {
            to.pids = text(v)
                .map(|s| {
                    s.trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (8..=1_000_000).contains(n))
                        .ok_or("a count from 8 to 1000000".to_owned())
                })
                .transpose()
                .map_err(|e| bad("pids", e))?;
        }
        Ok(())
    }
}

/// The model settings of a create or patch body: budgets as numbers (0: no limit, `"default"`:
/// the server's), the key as a string (empty: none of its own any more).
fn apply_model_settings(
    to: &mut otm_core::TenantLimits,
    rpm: Option<&Value>,
    tpd: Option<&Value>,
    key: Option<&str>,
) -> ApiResult<()> {
    fn number(name: &str, v: &Value) -> ApiResult<Option<u64>> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) if s == "default" => Ok(None),
            Value::Number(n) if n.as_u64().is_some() => Ok(n.as_u64()),
            Value::String(s) if s.trim().parse::<u64>().is_ok() => Ok(s.trim().parse().ok()),
            _ => Err(ApiError::bad_request(format!(
                "{name}: a whole number (0: no limit) or \"default\" (the server's)"
            ))),
        }
    }
    if let Some(v) = rpm {
        to.model_requests_per_minute =
            number("model_requests_per_minute", v)?.map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    }
    if let Some(v) = tpd {
        to.model_tokens_per_day = number("model_tokens_per_day", v)?;
    }
    if let Some(k) = key {
        let k = k.trim();
        if k.is_empty() {
            to.model_api_key = None;
        } else if k.len() > 4096 || !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::bad_request(
                "model_api_key must be printable ASCII without spaces, at most 4096 characters",
            ));
        } else {
            to.model_api_key = Some(Secret::new(k));
        }
    }
    Ok(())
}

fn parse_id(id: &str) -> ApiResult<TenantId> {
    TenantId::parse(id).map_err(|e| ApiError::bad_request(e.to_string()))
}

pub(crate) async fn load(app: &App, id: &str) -> ApiResult<Tenant> {
    let id = parse_id(id)?;
    app.registry()
        .get_tenant(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("tenant {id}")))
}

fn check_profile(app: &App, p: &str) -> ApiResult<()> {
    if p == otm_shim::profile::PROBE_PROFILE && !app.settings().allow_probe_profile {
        return Err(ApiError::bad_request(
            "the probe profile gives whoever writes to the bot a shell inside the sandbox; it is for testing \
             sandboxes, and a server accepts it only when started with --allow-probe-profile (OTM_ALLOW_PROBE_PROFILE=1)",
        ));
    }
    if otm_shim::known_profiles().contains(&p) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "unknown profile `{p}`; known profiles: {}",
            otm_shim::known_profiles().join(", ")
        )))
    }
}

/// `freeze_after_s` as given: seconds (0: never freeze), or `"default"`/null for the default.
fn freeze_after(v: &Value) -> ApiResult<Option<u64>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s == "default" => Ok(None),
        Value::Number(n) if n.as_u64().is_some() => Ok(n.as_u64()),
        Value::String(s) if s.trim().parse::<u64>().is_ok() => Ok(s.trim().parse().ok()),
        _ => Err(ApiError::bad_request(format!(
            "freeze_after_s: a whole number of seconds (0: never freeze) or \"default\" ({} s)",
            otm_core::tenant::DEFAULT_FREEZE_AFTER_S
        ))),
    }
}

fn check_idle_timeout(s: u64) -> ApiResult<()> {
    if s == 0 {
        Err(ApiError::bad_request("idle_timeout_s must be at least 1"))
    } else {
        Ok(())
    }
}

fn check_bot_token(t: &str) -> ApiResult<Secret> {
    let t = t.trim();
    let ok = t.split_once(':').is_some_and(|(id, rest)| {
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty()
    }) && t.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(Secret::new(t))
    } else {
        Err(ApiError::bad_request(
            "bot_token must look like <digits>:<secret> as BotFather gives it",
        ))
    }
}

/// Telegram allows 1 to 256 characters of A-Z, a-z, 0-9, `_` and `-`.
fn check_webhook_secret(s: &str) -> ApiResult<Secret> {
    let ok = !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(Secret::new(s))
    } else {
        Err(ApiError::bad_request(
            "webhook_secret must be 1 to 256 of A-Z, a-z, 0-9, _ and -",
        ))
    }
}

async fn register_webhook(app: &App, t: &Tenant) -> ApiResult<()> {
    let (Some(url), Some(token)) = (app.webhook_url(&t.id), t.bot_token.as_ref()) else {
        return Ok(());
    };
    app.telegram()
        .set_webhook(token, &url, &t.webhook_secret)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::TelegramError,
                format!("{e}; check the bot token and --public-url"),
            )
        })
}

async fn create_tenant(
    State(app): State<Arc<App>>,
    ApiJson(body): ApiJson<CreateTenant>,
) -> ApiResult<(StatusCode, Json<TenantView>)> {
    let id = parse_id(&body.id)?;
    let profile = body.profile.unwrap_or_else(|| "reference".into());
    check_profile(&app, &profile)?;
    let bot_token = body.bot_token.as_deref().map(check_bot_token).transpose()?;
    let mut t = Tenant::new(id.clone(), profile, bot_token);
    if let Some(s) = body.idle_timeout_s {
        check_idle_timeout(s)?;
        t.idle_timeout_s = s;
    }
    if let Some(v) = &body.freeze_after_s {
        t.limits.freeze_after_s = freeze_after(v)?;
    }
    t.cold_start_notice = body.cold_start_notice.unwrap_or(false);
    limits_body!(body).apply(&mut t.limits)?;
    apply_model_settings(
        &mut t.limits,
        body.model_requests_per_minute.as_ref(),
        body.model_tokens_per_day.as_ref(),
        body.model_api_key.as_deref(),
    )?;
    if let Some(secret) = body.webhook_secret {
        t.webhook_secret = check_webhook_secret(&secret)?;
    }
    app.registry()
        .create_tenant(&t)
        .await
        .map_err(|e| match e {
            Error::AlreadyExists { .. } => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::AlreadyExists,
                format!("tenant {id} already exists"),
            ),
            e => e.into(),
        })?;
    // A replica may still keep the secret of an earlier tenant of this id.
    app.tenant_changed(&id).await;
    if let Err(e) = register_webhook(&app, &t).await {
        let _ = app.registry().delete_tenant(&id).await;
        return Err(e);
    }
    // A new tenant starts empty: snapshots left under its id by an earlier owner (deleted by a
    // version that kept them, or by hand) are moved aside, never restored into this one.
    if app.state().head(&id).await.ok().flatten().is_some()
        || !app.state().list(&id).await.unwrap_or_default().is_empty()
    {
        let name = format!("{id}-orphaned-{}", app.clock().now_ms());
        match app.state().tombstone(&id, &name).await {
            Ok(n) => {
                tracing::warn!(tenant = %id, snapshots = n, tombstone = %name, "an earlier owner's snapshots were moved aside")
            }
            Err(e) => {
                let _ = app.registry().delete_tenant(&id).await;
                return Err(e.into());
            }
        }
    }
    tracing::info!(tenant = %id, profile = %t.profile, "tenant created");
    Ok((StatusCode::CREATED, Json(view(&app, &t).await)))
}

async fn list_tenants(State(app): State<Arc<App>>) -> ApiResult<Json<Vec<TenantView>>> {
    let defaults = app.registry().get_settings().await?.default_limits;
    let mut out = Vec::new();
    for t in app.registry().list_tenants().await? {
        out.push(view_with(&app, &t, &defaults).await);
    }
    Ok(Json(out))
}

async fn get_tenant(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<Json<TenantView>> {
    let t = load(&app, &id).await?;
    Ok(Json(view(&app, &t).await))
}

async fn patch_tenant(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PatchTenant>,
) -> ApiResult<Json<TenantView>> {
    Ok(Json(patch(&app, &id, body).await?))
}

/// Changes a tenant's settings (the API's and the console's one way to do it).
pub(crate) async fn patch(app: &App, id: &str, body: PatchTenant) -> ApiResult<TenantView> {
    let mut t = load(app, id).await?;
    if let Some(s) = body.idle_timeout_s {
        check_idle_timeout(s)?;
        t.idle_timeout_s = s;
    }
    if let Some(v) = &body.freeze_after_s {
        t.limits.freeze_after_s = freeze_after(v)?;
    }
    if let Some(p) = body.profile {
        check_profile(app, &p)?;
        t.profile = p;
    }
    if let Some(c) = body.cold_start_notice {
        t.cold_start_notice = c;
    }
    limits_body!(body).apply(&mut t.limits)?;
    apply_model_settings(
        &mut t.limits,
        body.model_requests_per_minute.as_ref(),
        body.model_tokens_per_day.as_ref(),
        body.model_api_key.as_deref(),
    )?;
    let token_changed = if let Some(tok) = body.bot_token.as_deref() {
        t.bot_token = Some(check_bot_token(tok)?);
        true
    } else {
        false
    };
    if token_changed {
        register_webhook(app, &t).await?;
    }
    app.registry().update_tenant(&t).await?;
    // Replicas that keep the tenant's settings in memory (its surrogates' tenant) read them anew.
    app.tenant_changed(&t.id).await;
    // A running instance gets the new limits at once.
    if let Ok(Some(rec)) = app.registry().instance_of(&t.id).await {
        let limits = t
            .limits
            .over(&app.registry().get_settings().await?.default_limits);
        app.runtime().set_limits(&rec.id, &limits).await?;
    }
    let t = load(app, id).await?;
    Ok(view(app, &t).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    /// Keep the tenant's snapshots under a tombstone (`tombstones/<id>-<ms>` in the state store)
    /// instead of deleting them; a tenant created again under the same id never sees them.
    #[serde(default)]
    keep_state: bool,
}

/// Deletes a tenant: its instance stopped, its webhook removed, its inbox and registry rows,
/// then its snapshots (or, with `?keep_state=true`, its snapshots moved to a tombstone).
async fn delete_tenant(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<StatusCode> {
    let t = load(&app, &id).await?;
    orchestrator::stop(&app, &t.id, "deleted").await?;
    if let (Some(_), Some(token)) = (app.webhook_url(&t.id), t.bot_token.as_ref())
        && let Err(e) = app.telegram().delete_webhook(token).await
    {
        tracing::warn!(tenant = %t.id, error = %e, "could not delete the webhook");
    }
    // The registry first: from here on no wake can restore (or snapshot) this tenant, so the
    // snapshots cannot come back behind the deletion.
    app.registry().delete_tenant(&t.id).await?;
    app.tenant_changed(&t.id).await;
    app.model_budgets().forget(&t.id);
    app.bot_limiter().forget(&t.id);
    let (snapshots, tombstone) = if q.keep_state {
        let name = format!("{}-{}", t.id, app.clock().now_ms());
        let n = app.state().tombstone(&t.id, &name).await?;
        (n, Some(name))
    } else {
        (app.state().delete_tenant(&t.id).await?, None)
    };
    match tombstone {
        Some(name) => {
            tracing::info!(tenant = %t.id, snapshots, tombstone = %name, "tenant deleted; its snapshots are kept under the tombstone");
        }
        None => tracing::info!(tenant = %t.id, snapshots, "tenant deleted with its snapshots"),
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn wake_tenant(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<Json<WakeView>> {
    let t = load(&app, &id).await?;
    let woken = app.wake(&t.id, None).await?;
    Ok(Json(WakeView {
        tenant: t.id,
        instance: woken.instance.to_string(),
        path: woken.path.as_str().to_owned(),
        total_ms: woken.total_ms,
        phases_ms: woken.phases.into_iter().collect(),
    }))
}

async fn stop_tenant(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<Json<StopView>> {
    let t = load(&app, &id).await?;
    let stopped = orchestrator::stop(&app, &t.id, "admin").await?;
    Ok(Json(StopView {
        tenant: t.id,
        stopped,
    }))
}

/// A page of a tenant's inbox: `?after=SEQ` (from the start without it), `?limit=N` updates of
/// each list at most (default [`INBOX_PAGE`], at most [`INBOX_PAGE_MAX`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboxQuery {
    after: Option<i64>,
    limit: Option<usize>,
}

const INBOX_PAGE: usize = 1000;
const INBOX_PAGE_MAX: usize = 10_000;

async fn inbox(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<InboxQuery>,
) -> ApiResult<Json<InboxAnswer>> {
    let t = load(&app, &id).await?;
    let limit = q.limit.unwrap_or(INBOX_PAGE).clamp(1, INBOX_PAGE_MAX);
    let mut v = app.registry().inbox_view(&t.id, q.after, limit).await?;
    // A list that came back full may go on: the page ends at the smallest last sequence number
    // of the full lists and the other list is cut there, so that the next page (after it)
    // misses nothing and repeats nothing.
    let next_after = [&v.pending, &v.dead]
        .into_iter()
        .filter(|l| l.len() == limit)
        .filter_map(|l| l.last().map(|i| i.seq))
        .min();
    if let Some(end) = next_after {
        v.pending.retain(|i| i.seq <= end);
        v.dead.retain(|i| i.seq <= end);
    }
    Ok(Json(InboxAnswer {
        tenant: t.id,
        pending: v.pending.iter().map(Into::into).collect(),
        dead: v.dead.iter().map(Into::into).collect(),
        next_after,
    }))
}

/// The dead letters a `{seq}` segment names: one sequence number, or `dead` for all of them.
fn dead_letters(seq: &str) -> ApiResult<otm_core::DeadLetters> {
    if seq == "dead" {
        return Ok(otm_core::DeadLetters::All);
    }
    seq.parse::<i64>()
        .map(otm_core::DeadLetters::One)
        .map_err(|_| {
            ApiError::bad_request(format!(
                "`{seq}` is not a sequence number (see `otm inbox TENANT`), nor `dead` for every dead letter"
            ))
        })
}

async fn retry_dead_letters(
    State(app): State<Arc<App>>,
    Path((id, seq)): Path<(String, String)>,
) -> ApiResult<Json<RetryAnswer>> {
    let which = dead_letters(&seq)?;
    let id = parse_id(&id)?;
    let retried = app.retry_dead_letters(&id, which).await?;
    Ok(Json(RetryAnswer {
        tenant: id,
        retried,
    }))
}

async fn drop_dead_letters(
    State(app): State<Arc<App>>,
    Path((id, seq)): Path<(String, String)>,
) -> ApiResult<Json<DropAnswer>> {
    let which = dead_letters(&seq)?;
    let id = parse_id(&id)?;
    let dropped = app.drop_dead_letters(&id, which).await?;
    Ok(Json(DropAnswer {
        tenant: id,
        dropped,
    }))
}

async fn snapshots(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotList>> {
    let id = parse_id(&id)?;
    let head = app.state().head(&id).await?.map(|h| h.id);
    let snapshots = app
        .state()
        .list(&id)
        .await?
        .into_iter()
        .map(|m| {
            let is_head = Some(&m.id) == head.as_ref();
            SnapshotEntry::new(m, is_head)
        })
        .collect();
    Ok(Json(SnapshotList {
        tenant: id,
        head,
        snapshots,
    }))
}

/// The tenant's latest state as a plain tar (`application/x-tar`), streamed from a spool file;
/// `x-otm-snapshot` names the snapshot it came from.
async fn export(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<axum::response::Response> {
    let t = load(&app, &id).await?;
    let (tar, meta) = orchestrator::export_state(&app, &t.id).await?;
    let file = tar.open().await?;
    let len = file.metadata().await.map(|m| m.len()).ok();
    // The open file outlives its name: the spool entry goes now, the bytes when the stream ends.
    drop(tar);
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file,
        otm_shim::pipe::CHUNK,
    ));
    let mut resp = axum::response::Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/x-tar"),
    );
    if let Ok(v) = format!("attachment; filename=\"{}-{}.tar\"", t.id, meta.id).parse() {
        h.insert(axum::http::header::CONTENT_DISPOSITION, v);
    }
    if let Ok(v) = meta.id.to_string().parse() {
        h.insert("x-otm-snapshot", v);
    }
    if let Some(len) = len {
        h.insert(axum::http::header::CONTENT_LENGTH, len.into());
    }
    Ok(resp)
}

async fn restore_snapshot(
    State(app): State<Arc<App>>,
    Path((id, snapshot)): Path<(String, String)>,
) -> ApiResult<Json<RestoreView>> {
    let t = load(&app, &id).await?;
    let snap =
        otm_core::SnapshotId::parse(&snapshot).map_err(|e| ApiError::bad_request(e.to_string()))?;
    orchestrator::restore_snapshot(&app, &t.id, &snap).await?;
    Ok(Json(RestoreView {
        tenant: t.id,
        head: snap,
        restored_on: "next wake".to_owned(),
    }))
}

#[derive(Deserialize)]
struct LogsQuery {
    tail: Option<usize>,
    #[serde(default)]
    follow: bool,
}

async fn logs(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Response> {
    let t = load(&app, &id).await?;
    let rec = app.registry().instance_of(&t.id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::NotRunning,
            format!("tenant {} has no instance; wake it first", t.id),
        )
    })?;
    let shim = otm_shim::ShimClient::new(rec.address.clone(), rec.shim_token.clone());
    let stream = shim.logs(q.tail.unwrap_or(100), q.follow).await?;
    let body = axum::body::Body::from_stream(futures::StreamExt::map(stream, |r| {
        r.map_err(std::io::Error::other)
    }));
    Ok(([("content-type", "text/plain; charset=utf-8")], body).into_response())
}

fn instance_view(r: &InstanceRecord) -> InstanceView {
    InstanceView {
        id: r.id.to_string(),
        tenant: r.tenant.clone(),
        state: r.state.as_str().to_owned(),
        created_at_ms: r.created_at_ms,
        bound_at_ms: r.bound_at_ms,
    }
}

async fn instances(State(app): State<Arc<App>>) -> ApiResult<Json<Vec<InstanceView>>> {
    Ok(Json(
        app.registry()
            .list_instances()
            .await?
            .iter()
            .map(instance_view)
            .collect(),
    ))
}

async fn get_config(State(app): State<Arc<App>>) -> ApiResult<Json<FleetSettings>> {
    Ok(Json(app.registry().get_settings().await?))
}

async fn put_config(
    State(app): State<Arc<App>>,
    ApiJson(body): ApiJson<PutConfig>,
) -> ApiResult<Json<FleetSettings>> {
    let mut s = app.registry().get_settings().await?;
    if let Some(n) = body.warm_pool_target {
        if n > 1000 {
            return Err(ApiError::bad_request(
                "warm_pool_target must be at most 1000",
            ));
        }
        s.warm_pool_target = n;
    }
    if let Some(n) = body.max_running {
        s.max_running = n;
    }
    if let Some(n) = body.max_concurrent_wakes {
        s.max_concurrent_wakes = n;
    }
    if let Some(v) = &body.frozen_memory_max {
        s.frozen_memory_max = match v {
            Value::Number(n) if n.as_u64().is_some() => n.as_u64().unwrap_or(0),
            Value::String(t) if t.trim() == "0" => 0,
            Value::String(t) => otm_core::quantity::parse_bytes(t)
                .map_err(|e| ApiError::bad_request(format!("frozen_memory_max: {e}")))?,
            _ => {
                return Err(ApiError::bad_request(
                    "frozen_memory_max: a size such as 8GiB or 512Mi, or 0 for no limit",
                ));
            }
        };
    }
    if let Some(l) = &body.default_limits {
        let mut own = otm_core::TenantLimits::default();
        l.apply(&mut own)?;
        s.default_limits = own.over(&s.default_limits);
    }
    app.registry().put_settings(&s).await?;
    let _ = app
        .coordinator()
        .publish(otm_core::Notification::SettingsChanged)
        .await;
    Ok(Json(s))
}

/// What an operator must know about this server's safety, in words.
fn warnings(app: &App) -> Vec<String> {
    let mut w = Vec::new();
    if app.settings().runs_orchestrator() && app.runtime().isolation() == "none" {
        w.push(
            "instances run without a sandbox (--sandbox none): every agent can read the data directory and every \
             tenant's secrets; for development only"
                .to_owned(),
        );
    }
    if app.settings().runs_orchestrator() && app.runtime().limits().starts_with("none") {
        w.push(format!(
            "instances run without resource limits: {}",
            app.runtime().limits()
        ));
    }
    w
}

async fn status(State(app): State<Arc<App>>) -> ApiResult<Json<StatusView>> {
    let tenants = app.registry().list_tenants().await?;
    let instances = app.registry().list_instances().await?;
    let mut pending = 0;
    for t in app.registry().inbox_pending_tenants().await? {
        pending += app.registry().inbox_depth(&t).await?;
    }
    let running = tenants
        .iter()
        .filter(|t| t.status == otm_core::TenantStatus::Running)
        .count();
    Ok(Json(StatusView {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: app.uptime().as_secs(),
        role: app.settings().role.to_string(),
        runtime: app.runtime().name().to_string(),
        isolation: app.runtime().isolation().to_string(),
        sandboxed: app.runtime().isolation() != "none",
        limits: app.runtime().limits().to_string(),
        leader: app.is_leader(),
        warnings: warnings(&app),
        tenants: tenants.len() as u64,
        tenants_running: running as u64,
        instances: instances.len() as u64,
        inbox_pending: pending,
        settings: app.registry().get_settings().await?,
    }))
}
