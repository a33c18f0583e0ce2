//! The HTTP side of the fake API server: routing, discovery, list, watch, writes, tables.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::Inner;
use super::patch::{JsonPatchError, json_patch, merge_patch};
use super::pods::PodCommand;
use super::select::{FieldSelector, LabelSelector};
use super::store::{
    Change, ChangeType, PODS, RESOURCES, ResourceType, meta_str, qos_class, resource, rv_of,
};
use super::util::{ApiError, base64_decode, base64_encode};

/// How objects are written back, after the `Accept` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repr {
    Full,
    Table,
    Meta,
}

/// An object as `PartialObjectMetadata`.
fn to_meta(obj: Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_default(),
    })
}

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new().fallback(handle).with_state(inner)
}

type Params = HashMap<String, String>;

fn json_response(code: u16, body: &Value) -> Response {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
        [(header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.code, &self.status())
    }
}

fn ok(body: Value) -> Response {
    json_response(200, &body)
}

fn authorized(inner: &Inner, headers: &HeaderMap) -> bool {
    let Some(want) = &inner.token else {
        return true;
    };
    let Some(got) = headers.get(header::AUTHORIZATION) else {
        // kubectl sends no credentials to a plain-HTTP server; such requests are anonymous.
        return !inner.require_token;
    };
    let got = got
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    got == Some(want.as_str())
}

/// Where a request points, once its path is parsed.
#[derive(Debug)]
struct Target {
    res: usize,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<Params>,
    body: Bytes,
) -> Response {
    if !authorized(&inner, &headers) {
        return ApiError::unauthorized().into_response();
    }
    inner.record_request(&method, &uri);
    let path = uri.path().trim_matches('/');
    let segs: Vec<&str> = if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    };
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        [] => return ok(root_paths()),
        ["version"] => return ok(version_info()),
        ["healthz" | "readyz" | "livez", ..] => return (StatusCode::OK, "ok").into_response(),
        ["api"] => return ok(api_versions(&inner)),
        ["apis"] => return ok(api_groups()),
        ["apis", group] => {
            return match groups().into_iter().find(|g| g["name"] == *group) {
                Some(mut g) => {
                    g["kind"] = json!("APIGroup");
                    g["apiVersion"] = json!("v1");
                    ok(g)
                }
                None => ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )
                .into_response(),
            };
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (group, version, rest),
        _ => {
            return ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
            .into_response();
        }
    };
    if rest.is_empty() {
        return match resource_list(group, version) {
            Some(list) => ok(list),
            None => ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
            .into_response(),
        };
    }
    let find = |plural: &str| resource(group, version, plural);
    let target = match rest {
        ["namespaces", ns, plural, more @ ..] if more.len() <= 2 => {
            find(plural).map(|res| Target {
                res,
                namespace: Some((*ns).to_owned()),
                name: more.first().map(|s| (*s).to_owned()),
                subresource: more.get(1).map(|s| (*s).to_owned()),
            })
        }
        [plural, more @ ..] if more.len() <= 2 => find(plural).map(|res| Target {
            res,
            namespace: None,
            name: more.first().map(|s| (*s).to_owned()),
            subresource: more.get(1).map(|s| (*s).to_owned()),
        }),
        _ => None,
    };
    let Some(target) = target else {
        return ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .into_response();
    };
    let rt = &RESOURCES[target.res];
    if !rt.namespaced && target.namespace.is_some() {
        return ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .into_response();
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // kubectl asks for tables; kube-rs's metadata calls for PartialObjectMetadata(List).
    let repr = if accept.contains("as=Table") {
        Repr::Table
    } else if accept.contains("as=PartialObjectMetadata") {
        Repr::Meta
    } else {
        Repr::Full
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let result = route(
        &inner,
        &method,
        &target,
        &params,
        &content_type,
        &body,
        repr,
    )
    .await;
    match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn route(
    inner: &Arc<Inner>,
    method: &Method,
    t: &Target,
    q: &Params,
    content_type: &str,
    body: &[u8],
    repr: Repr,
) -> Result<Response, ApiError> {
    let rt = &RESOURCES[t.res];
    // The namespace objects live at /api/v1/namespaces/{name}; everything else that is
    // namespaced needs a namespace except for cluster-wide lists and watches.
    let ns = if rt.namespaced {
        t.namespace.clone()
    } else {
        Some(String::new())
    };
    match (&t.name, &t.subresource) {
        (None, _) => match *method {
            Method::GET => {
                let watching = q.get("watch").is_some_and(|w| w == "1" || w == "true");
                let scope = if rt.namespaced {
                    t.namespace.as_deref()
                } else {
                    None
                };
                if watching {
                    Ok(watch(
                        inner.clone(),
                        t.res,
                        scope.map(str::to_owned),
                        q,
                        repr,
                    ))
                } else {
                    list(inner, t.res, scope, q, repr)
                }
            }
            Method::POST => {
                let ns = ns.ok_or_else(ApiError::method_not_allowed)?;
                let obj = parse_body(body, content_type)?;
                let created = inner.write(|s| s.create(t.res, &ns, obj))?;
                if t.res == PODS {
                    inner.pod_created(&created);
                }
                Ok(json_response(201, &created))
            }
            Method::DELETE => {
                let ns = ns.ok_or_else(ApiError::method_not_allowed)?;
                delete_collection(inner, t.res, &ns, q, body)
            }
            _ => Err(ApiError::method_not_allowed()),
        },
        (Some(name), sub) => {
            let ns = ns.ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )
            })?;
            let sub = sub.as_deref();
            match (sub, method.clone()) {
                (None, Method::GET) => inner
                    .get_object(t.res, &ns, name)
                    .map(|o| match repr {
                        Repr::Table => ok(to_table(rt, vec![o], rv_now(inner), None)),
                        Repr::Meta => ok(to_meta(o)),
                        Repr::Full => ok(o),
                    })
                    .ok_or_else(|| ApiError::not_found(rt.plural, rt.group, name)),
                (Some("status"), Method::GET) if rt.status => inner
                    .get_object(t.res, &ns, name)
                    .map(ok)
                    .ok_or_else(|| ApiError::not_found(rt.plural, rt.group, name)),
                (Some("log"), Method::GET) if t.res == PODS => {
                    if inner.get_object(PODS, &ns, name).is_none() {
                        return Err(ApiError::not_found(rt.plural, rt.group, name));
                    }
                    let text = match inner.log_path(&ns, name) {
                        Some(p) => tokio::fs::read(p).await.unwrap_or_default(),
                        None => Vec::new(),
                    };
                    Ok(
                        (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], text)
                            .into_response(),
                    )
                }
                (Some("resize"), Method::GET) if t.res == PODS => inner
                    .get_object(t.res, &ns, name)
                    .map(ok)
                    .ok_or_else(|| ApiError::not_found(rt.plural, rt.group, name)),
                (Some("resize"), Method::PATCH) if t.res == PODS => {
                    resize(inner, &ns, name, content_type, body).map(ok)
                }
                (None | Some("status"), Method::PUT) if sub.is_none() || rt.status => {
                    let obj = parse_body(body, content_type)?;
                    update(inner, t.res, &ns, name, sub.is_some(), obj).map(ok)
                }
                (None | Some("status"), Method::PATCH) if sub.is_none() || rt.status => {
                    patch(inner, t.res, &ns, name, sub.is_some(), content_type, body)
                        .map(|(code, o)| json_response(code, &o))
                }
                (None, Method::DELETE) => delete(inner, t.res, &ns, name, q, body).map(ok),
                (None, _) => Err(ApiError::method_not_allowed()),
                _ => Err(ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )),
            }
        }
    }
}

fn rv_now(inner: &Inner) -> u64 {
    inner.read(|s| s.resource_version())
}

fn parse_body(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        if content_type.contains("yaml") {
            ApiError::new(415, "UnsupportedMediaType", format!("the fake API server accepts bodies written as JSON (which is valid YAML) only: {e}"))
        } else {
            ApiError::bad_request(format!("the body is not valid JSON: {e}"))
        }
    })
}

fn selectors(q: &Params) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(
        q.get("labelSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )?;
    let fields = FieldSelector::parse(
        q.get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )?;
    Ok((labels, fields))
}

fn parse_rv(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(format!("invalid resource version {text:?}: not an integer"))
    })
}

fn list(
    inner: &Inner,
    res: usize,
    ns: Option<&str>,
    q: &Params,
    repr: Repr,
) -> Result<Response, ApiError> {
    let rt = &RESOURCES[res];
    let (labels, fields) = selectors(q)?;
    let rv_param = q
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or_default();
    let rvm = q
        .get("resourceVersionMatch")
        .map(String::as_str)
        .unwrap_or_default();
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    // A continue token is `<version>/<namespace>/<name>` of the last item sent, in base64.
    let cont = q.get("continue").filter(|c| !c.is_empty()).map(|c| {
        base64_decode(c)
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| {
                let mut parts = s.splitn(3, '/');
                let rv = parts.next()?.parse::<u64>().ok()?;
                Some((rv, parts.next()?.to_owned(), parts.next()?.to_owned()))
            })
            .ok_or_else(|| ApiError::bad_request("invalid continue token"))
    });
    let (items, at) = inner.read(|s| -> Result<(Vec<Value>, u64), ApiError> {
        if let Some(cont) = &cont {
            let (rv, _, _) = cont.clone()?;
            let items = s.list_at(res, ns, rv).map_err(|e| {
                if e.code == 410 {
                    ApiError::new(410, "Expired", "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.")
                } else {
                    e
                }
            })?;
            return Ok((items, rv));
        }
        match (rvm, rv_param) {
            ("Exact", rv) => {
                let rv = parse_rv(rv)?;
                Ok((s.list_at(res, ns, rv)?, rv))
            }
            ("" | "NotOlderThan", "" | "0") => Ok((s.list(res, ns), s.resource_version())),
            ("" | "NotOlderThan", rv) => {
                let rv = parse_rv(rv)?;
                if rv > s.resource_version() {
                    return Err(ApiError::new(504, "Timeout", format!("Too large resource version: {rv}, current: {}", s.resource_version())));
                }
                Ok((s.list(res, ns), s.resource_version()))
            }
            (other, _) => Err(ApiError::bad_request(format!("invalid resourceVersionMatch {other:?}"))),
        }
    })?;
    let after = match cont {
        Some(c) => {
            let (_, ns, name) = c?;
            Some((ns, name))
        }
        None => None,
    };
    let mut items: Vec<Value> = items
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .filter(|o| {
            after.as_ref().is_none_or(|(ans, aname)| {
                (meta_str(o, "namespace"), meta_str(o, "name")) > (ans.as_str(), aname.as_str())
            })
        })
        .collect();
    let mut continue_token = None;
    let mut remaining = None;
    if limit > 0 && items.len() > limit {
        remaining = Some(items.len() - limit);
        items.truncate(limit);
        let last = items.last().expect("limit > 0");
        continue_token = Some(base64_encode(
            format!(
                "{at}/{}/{}",
                meta_str(last, "namespace"),
                meta_str(last, "name")
            )
            .as_bytes(),
        ));
    }
    if repr == Repr::Table {
        return Ok(ok(to_table(rt, items, at, continue_token)));
    }
    let mut meta = json!({"resourceVersion": at.to_string()});
    if let Some(c) = continue_token {
        meta["continue"] = json!(c);
        meta["remainingItemCount"] = json!(remaining);
    }
    if repr == Repr::Meta {
        return Ok(ok(json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": meta,
            "items": items.into_iter().map(to_meta).collect::<Vec<_>>(),
        })));
    }
    Ok(ok(json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(),
        "metadata": meta,
        "items": items,
    })))
}

/// What a watch sends for one change, if anything.
fn watch_event(
    change: &Change,
    res: usize,
    ns: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<(&'static str, Value)> {
    if change.res != res || ns.is_some_and(|ns| ns != change.namespace) {
        return None;
    }
    let matches = |o: &Value| labels.matches(o) && fields.matches(o);
    let now = matches(&change.object);
    let before = change.prev.as_ref().is_some_and(matches);
    match change.kind {
        ChangeType::Added => now.then(|| ("ADDED", change.object.clone())),
        ChangeType::Deleted => (before || now).then(|| ("DELETED", change.object.clone())),
        ChangeType::Modified => match (before, now) {
            (true, true) => Some(("MODIFIED", change.object.clone())),
            (false, true) => Some(("ADDED", change.object.clone())),
            (true, false) => {
                // The real server sends the last matching state, at the change's version.
                let mut last = change.prev.clone().unwrap_or_default();
                last["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                Some(("DELETED", last))
            }
            (false, false) => None,
        },
    }
}

fn event_line(kind: &str, object: Value, rt: &ResourceType, repr: Repr) -> Bytes {
    let object = match repr {
        _ if kind == "ERROR" => object,
        Repr::Table if kind != "BOOKMARK" => {
            let rv = rv_of(&object);
            to_table(rt, vec![object], rv, None)
        }
        Repr::Meta => to_meta(object),
        _ => object,
    };
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(rt: &ResourceType, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta})
}

fn watch(inner: Arc<Inner>, res: usize, ns: Option<String>, q: &Params, repr: Repr) -> Response {
    let rt = &RESOURCES[res];
    let (labels, fields) = match selectors(q) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let start_rv = match rv_param.as_str() {
        "" | "0" => None,
        rv => match parse_rv(rv) {
            Ok(rv) => Some(rv),
            Err(e) => return e.into_response(),
        },
    };
    let bookmarks = q
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true" || b == "1");
    let initial = q
        .get("sendInitialEvents")
        .is_some_and(|b| b == "true" || b == "1");
    let deadline = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|t| Instant::now() + Duration::from_secs(t));
    let interval = inner.bookmark_interval();
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut changed = inner.changed.subscribe();
    let mut shutdown = inner.shutdown.subscribe();
    let mut expire = inner.expire.subscribe();
    tokio::spawn(async move {
        let send = |b: Bytes| {
            let tx = tx.clone();
            async move { tx.send(b).await.is_ok() }
        };
        let ns = ns.as_deref();
        // What to send first, and the version the watch continues from.
        let first = inner.read(|s| {
            let mut lines = Vec::new();
            let last = match start_rv {
                Some(rv) if !initial => {
                    if rv < s.horizon() {
                        return Err(ApiError::gone(rv, s.horizon()));
                    }
                    rv
                }
                _ => {
                    for o in s.list(res, ns) {
                        if labels.matches(&o) && fields.matches(&o) {
                            lines.push(event_line("ADDED", o, rt, repr));
                        }
                    }
                    s.resource_version()
                }
            };
            if initial && bookmarks {
                lines.push(event_line("BOOKMARK", bookmark(rt, last, true), rt, repr));
            }
            Ok((lines, last))
        });
        let mut last = match first {
            Ok((lines, last)) => {
                for l in lines {
                    if !send(l).await {
                        return;
                    }
                }
                last
            }
            Err(e) => {
                let _ = send(event_line("ERROR", e.status(), rt, repr)).await;
                return;
            }
        };
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut next_bookmark = Instant::now() + interval;
        loop {
            // Everything after `last`, or 410 if the history no longer has it.
            let pending = inner.read(|s| match s.changes_after(last) {
                None => Err(ApiError::gone(last, s.horizon())),
                Some(changes) => {
                    let lines: Vec<Bytes> = changes
                        .filter_map(|c| watch_event(c, res, ns, &labels, &fields))
                        .map(|(kind, o)| event_line(kind, o, rt, repr))
                        .collect();
                    Ok((lines, s.resource_version().max(last)))
                }
            });
            match pending {
                Ok((lines, now)) => {
                    last = now;
                    for l in lines {
                        if !send(l).await {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = send(event_line("ERROR", e.status(), rt, repr)).await;
                    return;
                }
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = sleep_until(next_bookmark), if bookmarks => {
                    next_bookmark = Instant::now() + interval;
                    if !send(event_line("BOOKMARK", bookmark(rt, last, false), rt, repr)).await {
                        return;
                    }
                }
                _ = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => return,
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
                _ = expire.changed() => {
                    let horizon = inner.read(|s| s.horizon());
                    let _ = send(event_line("ERROR", ApiError::gone(last, horizon).status(), rt, repr)).await;
                    return;
                }
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Carries over what a write to the main resource or to the status subresource may not change.
fn split_status(rt: &ResourceType, old: &Value, mut new: Value, status_only: bool) -> Value {
    if !rt.status {
        return new;
    }
    if status_only {
        let mut merged = old.clone();
        match new.get_mut("status").map(Value::take) {
            Some(status) => merged["status"] = status,
            None => {
                if let Some(m) = merged.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        merged["metadata"]["resourceVersion"] = new["metadata"]["resourceVersion"].clone();
        merged
    } else {
        match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        new
    }
}

fn update(
    inner: &Inner,
    res: usize,
    ns: &str,
    name: &str,
    status_only: bool,
    obj: Value,
) -> Result<Value, ApiError> {
    let rt = &RESOURCES[res];
    let body_name = meta_str(&obj, "name");
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    inner
        .write(|s| {
            let old = s
                .get(res, ns, name)
                .cloned()
                .ok_or_else(|| ApiError::not_found(rt.plural, rt.group, name))?;
            let want = meta_str(&obj, "resourceVersion");
            if !want.is_empty() && want != meta_str(&old, "resourceVersion") {
                return Err(ApiError::stale(rt.plural, rt.group, name));
            }
            let new = split_status(rt, &old, obj, status_only);
            s.update(res, ns, name, new)
        })
        .inspect(|o| inner.finalized(res, ns, name, o))
}

fn patch(
    inner: &Arc<Inner>,
    res: usize,
    ns: &str,
    name: &str,
    status_only: bool,
    content_type: &str,
    body: &[u8],
) -> Result<(u16, Value), ApiError> {
    let rt = &RESOURCES[res];
    let patch = parse_body(body, content_type)?;
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let apply = media == "application/apply-patch+yaml";
    let created = inner.write(|s| {
        let Some(old) = s.get(res, ns, name).cloned() else {
            if !apply || status_only {
                return Err(ApiError::not_found(rt.plural, rt.group, name));
            }
            // Server-side apply creates what does not exist.
            let mut obj = patch.clone();
            let body_name = meta_str(&obj, "name");
            if !body_name.is_empty() && body_name != name {
                return Err(ApiError::bad_request(format!("the name of the object ({body_name}) does not match the name on the URL ({name})")));
            }
            if !meta_str(&obj, "resourceVersion").is_empty() {
                return Err(ApiError::not_found(rt.plural, rt.group, name));
            }
            obj["metadata"]["name"] = json!(name);
            return s.create(res, ns, obj).map(|o| (201, o));
        };
        let mut new = old.clone();
        match media {
            "application/merge-patch+json" | "application/strategic-merge-patch+json" | "application/apply-patch+yaml" => {
                merge_patch(&mut new, &patch);
            }
            "application/json-patch+json" => match json_patch(&mut new, &patch) {
                Ok(()) => {}
                Err(JsonPatchError::TestFailed(_)) => return Err(ApiError::stale(rt.plural, rt.group, name)),
                Err(JsonPatchError::Invalid(m)) => return Err(ApiError::invalid(m)),
            },
            other => {
                return Err(ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})")));
            }
        }
        if rv_of(&new) != rv_of(&old) || meta_str(&new, "resourceVersion") != meta_str(&old, "resourceVersion") {
            return Err(ApiError::stale(rt.plural, rt.group, name));
        }
        if meta_str(&new, "name") != name {
            return Err(ApiError::invalid(format!("{} \"{name}\" is invalid: metadata.name: Invalid value: the name cannot be changed", rt.kind)));
        }
        let new = split_status(rt, &old, new, status_only);
        s.update(res, ns, name, new).map(|o| (200, o))
    })?;
    if created.0 == 201 && res == PODS {
        inner.pod_created(&created.1);
    }
    inner.finalized(res, ns, name, &created.1);
    Ok(created)
}

/// `PATCH pods/{name}/resize` (in-place resize): only the containers' CPU and memory requests and
/// limits may change, containers are matched by name (as a strategic merge patch does), the QoS
/// class may not change, and a pod that has ended cannot be resized; a `metadata.resourceVersion`
/// in the body is a precondition. The fake's kubelet takes the new resources at once: they show
/// in the container's status too (`status.containerStatuses[].resources`). The workload itself
/// (a process, or a container) keeps the limits it was started with.
fn resize(
    inner: &Inner,
    ns: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let rt = &RESOURCES[PODS];
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if !matches!(
        media,
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the resize subresource takes a merge or strategic merge patch (got {media:?})"
            ),
        ));
    }
    let patch = parse_body(body, content_type)?;
    let invalid = |m: String| ApiError::invalid(format!("Pod \"{name}\" is invalid: {m}"));
    if let Some(other) = patch
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .find(|k| !matches!(k.as_str(), "spec" | "metadata"))
    {
        return Err(invalid(format!(
            "{other}: Forbidden: only spec.containers[*].resources may change"
        )));
    }
    let containers = patch
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    inner.write(|s| {
        let old = s
            .get(PODS, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt.plural, rt.group, name))?;
        let want = meta_str(&patch, "resourceVersion");
        if !want.is_empty() && want != meta_str(&old, "resourceVersion") {
            return Err(ApiError::stale(rt.plural, rt.group, name));
        }
        let phase = old.pointer("/status/phase").and_then(Value::as_str).unwrap_or("Pending");
        if matches!(phase, "Succeeded" | "Failed") {
            return Err(invalid(format!("spec: Forbidden: a pod in phase {phase} cannot be resized")));
        }
        let mut new = old.clone();
        for c in &containers {
            let cname = c.get("name").and_then(Value::as_str).unwrap_or_default();
            if let Some(k) = c.as_object().into_iter().flat_map(|o| o.keys()).find(|k| !matches!(k.as_str(), "name" | "resources")) {
                return Err(invalid(format!("spec.containers[{cname}].{k}: Forbidden: only resources may change")));
            }
            let Some(target) = new
                .pointer_mut("/spec/containers")
                .and_then(Value::as_array_mut)
                .and_then(|cs| cs.iter_mut().find(|t| t["name"] == cname))
            else {
                return Err(invalid(format!("spec.containers[{cname}]: Not found")));
            };
            if let Some(r) = c.get("resources") {
                merge_patch(&mut target["resources"], r);
            }
        }
        // Only CPU and memory are resizable.
        let old_cs = old.pointer("/spec/containers").and_then(Value::as_array).cloned().unwrap_or_default();
        let new_cs = new.pointer("/spec/containers").and_then(Value::as_array).cloned().unwrap_or_default();
        for (o, n) in old_cs.iter().zip(&new_cs) {
            for kind in ["requests", "limits"] {
                let (ro, rn) = (&o["resources"][kind], &n["resources"][kind]);
                let keys: std::collections::BTreeSet<&String> = ro.as_object().into_iter().chain(rn.as_object()).flat_map(|m| m.keys()).collect();
                for k in keys {
                    if k != "cpu" && k != "memory" && ro.get(k) != rn.get(k) {
                        return Err(invalid(format!("spec.containers[{}].resources.{kind}[{k}]: Forbidden: only cpu and memory resources are mutable", n["name"].as_str().unwrap_or_default())));
                    }
                }
            }
        }
        if qos_class(&new) != qos_class(&old) {
            return Err(invalid("spec: Forbidden: Pod QoS is immutable".to_owned()));
        }
        // The kubelet actuates the resize: the containers' status shows the new resources.
        for c in &new_cs {
            if let Some(st) = new
                .pointer_mut("/status/containerStatuses")
                .and_then(Value::as_array_mut)
                .and_then(|cs| cs.iter_mut().find(|st| st["name"] == c["name"]))
            {
                st["resources"] = c["resources"].clone();
            }
        }
        s.update(PODS, ns, name, new)
    })
}

/// Checks `preconditions` of DeleteOptions against the stored object.
fn check_preconditions(rt: &ResourceType, obj: &Value, options: &Value) -> Result<(), ApiError> {
    let name = meta_str(obj, "name");
    if let Some(uid) = options
        .pointer("/preconditions/uid")
        .and_then(Value::as_str)
    {
        let actual = meta_str(obj, "uid");
        if uid != actual {
            return Err(ApiError::conflict(
                rt.plural,
                rt.group,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"
                ),
            ));
        }
    }
    if let Some(rv) = options
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
    {
        let actual = meta_str(obj, "resourceVersion");
        if rv != actual {
            return Err(ApiError::conflict(
                rt.plural,
                rt.group,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {actual}"
                ),
            ));
        }
    }
    Ok(())
}

fn delete_options(q: &Params, body: &[u8]) -> Result<Value, ApiError> {
    let mut options = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("DeleteOptions are not valid JSON: {e}")))?
    };
    if let Some(g) = q.get("gracePeriodSeconds") {
        let g: i64 = g
            .parse()
            .map_err(|_| ApiError::bad_request("gracePeriodSeconds is not an integer"))?;
        options["gracePeriodSeconds"] = json!(g);
    }
    Ok(options)
}

fn delete(
    inner: &Inner,
    res: usize,
    ns: &str,
    name: &str,
    q: &Params,
    body: &[u8],
) -> Result<Value, ApiError> {
    let rt = &RESOURCES[res];
    let options = delete_options(q, body)?;
    let obj = inner
        .get_object(res, ns, name)
        .ok_or_else(|| ApiError::not_found(rt.plural, rt.group, name))?;
    check_preconditions(rt, &obj, &options)?;
    delete_checked(inner, res, ns, name, obj, &options)
}

/// Whether an object has finalizers (its deletion then waits for them).
pub(crate) fn finalizers(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

fn delete_checked(
    inner: &Inner,
    res: usize,
    ns: &str,
    name: &str,
    obj: Value,
    options: &Value,
) -> Result<Value, ApiError> {
    if res == PODS {
        let requested = options["gracePeriodSeconds"].as_i64();
        let grace = requested
            .or_else(|| {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
            .max(0);
        let scheduled = !obj
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty();
        let has_finalizers = finalizers(&obj);
        if obj["metadata"].get("deletionTimestamp").is_some() {
            // Already terminating; a zero grace forces it out now.
            if grace > 0 || has_finalizers {
                if grace == 0 {
                    inner.command_pod(
                        meta_str(&obj, "uid"),
                        PodCommand::Terminate {
                            grace: Duration::ZERO,
                        },
                    );
                }
                return Ok(obj);
            }
        } else if (grace > 0 && scheduled) || has_finalizers {
            let uid = meta_str(&obj, "uid").to_owned();
            let marked = inner
                .write(|s| {
                    s.modify(PODS, ns, name, |p| {
                        let at = chrono::Utc::now() + chrono::TimeDelta::seconds(grace);
                        p["metadata"]["deletionTimestamp"] = json!(super::util::rfc3339(at));
                        p["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                        true
                    })
                })
                .unwrap_or(obj);
            let terminate = PodCommand::Terminate {
                grace: Duration::from_secs(grace as u64),
            };
            if !inner.command_pod(&uid, terminate) {
                inner.finish_deletion(PODS, ns, name);
            }
            return Ok(marked);
        }
    }
    if finalizers(&obj) {
        // Deletion waits for the finalizers to be removed.
        return Ok(inner.finish_deletion(res, ns, name).unwrap_or(obj));
    }
    let removed = inner.remove(res, ns, name);
    Ok(removed.into_iter().next().map(|(_, o)| o).unwrap_or(obj))
}

fn delete_collection(
    inner: &Inner,
    res: usize,
    ns: &str,
    q: &Params,
    body: &[u8],
) -> Result<Response, ApiError> {
    let rt = &RESOURCES[res];
    let (labels, fields) = selectors(q)?;
    let options = delete_options(q, body)?;
    let scope = if rt.namespaced { Some(ns) } else { None };
    let targets: Vec<Value> = inner
        .read(|s| s.list(res, scope))
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .collect();
    let mut items = Vec::new();
    for o in targets {
        let (ons, name) = (
            meta_str(&o, "namespace").to_owned(),
            meta_str(&o, "name").to_owned(),
        );
        items.push(delete_checked(inner, res, &ons, &name, o, &options)?);
    }
    Ok(ok(json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(),
        "metadata": {"resourceVersion": rv_now(inner).to_string()},
        "items": items,
    })))
}

// ---- discovery ----

fn root_paths() -> Value {
    let mut paths = vec![
        "/api".to_owned(),
        "/api/v1".to_owned(),
        "/apis".to_owned(),
        "/version".to_owned(),
        "/healthz".to_owned(),
    ];
    for g in groups() {
        paths.push(format!("/apis/{}", g["name"].as_str().unwrap_or_default()));
        paths.push(format!(
            "/apis/{}",
            g["preferredVersion"]["groupVersion"]
                .as_str()
                .unwrap_or_default()
        ));
    }
    json!({"paths": paths})
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-otm-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_versions(inner: &Inner) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": inner.addr.to_string()}],
    })
}

fn groups() -> Vec<Value> {
    let mut names: Vec<(&str, &str)> = RESOURCES
        .iter()
        .filter(|r| !r.group.is_empty())
        .map(|r| (r.group, r.version))
        .collect();
    names.dedup();
    names
        .into_iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect()
}

fn api_groups() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups()})
}

fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut verbs = vec![
            "create", "delete", "get", "list", "patch", "update", "watch",
        ];
        if r.namespaced {
            verbs.insert(1, "deletecollection");
        }
        resources.push(json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": verbs,
            "shortNames": r.short_names,
        }));
        if r.status {
            resources.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
        }
        if r.plural == "pods" {
            resources.push(json!({"name": "pods/log", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get"]}));
            resources.push(json!({"name": "pods/resize", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get", "patch", "update"]}));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

// ---- tables, as `kubectl get` asks for them ----

fn age(obj: &Value) -> String {
    let Ok(created) = chrono::DateTime::parse_from_rfc3339(meta_str(obj, "creationTimestamp"))
    else {
        return "<unknown>".into();
    };
    let s = (chrono::Utc::now() - created.to_utc()).num_seconds().max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn pod_status_text(pod: &Value) -> String {
    if pod["metadata"].get("deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let state = pod.pointer("/status/containerStatuses/0/state");
    if let Some(r) = state
        .and_then(|s| s.pointer("/waiting/reason"))
        .and_then(Value::as_str)
    {
        return r.into();
    }
    if let Some(r) = state
        .and_then(|s| s.pointer("/terminated/reason"))
        .and_then(Value::as_str)
    {
        return r.into();
    }
    pod.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
        .into()
}

fn to_table(rt: &ResourceType, items: Vec<Value>, rv: u64, cont: Option<String>) -> Value {
    let col = |name: &str, ty: &str, format: &str, priority: u32| json!({"name": name, "type": ty, "format": format, "description": name, "priority": priority});
    let pods = rt.kind == "Pod" && rt.group.is_empty();
    let columns = if pods {
        vec![
            col("Name", "string", "name", 0),
            col("Ready", "string", "", 0),
            col("Status", "string", "", 0),
            col("Restarts", "string", "", 0),
            col("Age", "string", "", 0),
            col("IP", "string", "", 1),
            col("Node", "string", "", 1),
        ]
    } else {
        vec![
            col("Name", "string", "name", 0),
            col("Age", "string", "", 0),
        ]
    };
    let rows: Vec<Value> = items
        .into_iter()
        .map(|o| {
            let cells = if pods {
                let total = o
                    .pointer("/spec/containers")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                let ready = o
                    .pointer("/status/containerStatuses")
                    .and_then(Value::as_array)
                    .map_or(0, |cs| cs.iter().filter(|c| c["ready"] == true).count());
                json!([
                    meta_str(&o, "name"),
                    format!("{ready}/{total}"),
                    pod_status_text(&o),
                    "0",
                    age(&o),
                    o.pointer("/status/podIP")
                        .and_then(Value::as_str)
                        .unwrap_or("<none>"),
                    o.pointer("/spec/nodeName")
                        .and_then(Value::as_str)
                        .unwrap_or("<none>"),
                ])
            } else {
                json!([meta_str(&o, "name"), age(&o)])
            };
            json!({"cells": cells, "object": o})
        })
        .collect();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": columns,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_cluster_scoped() {
        assert!(!RESOURCES[super::super::store::NAMESPACES].namespaced);
    }
}
