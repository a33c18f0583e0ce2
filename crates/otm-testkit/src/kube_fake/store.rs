//! The fake's object store: every object as JSON, one global `resourceVersion` counter, and a
//! bounded history of changes that watches replay.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

use super::util::{ApiError, base64_encode, name_suffix, new_uid, now_rfc3339};

/// A resource type the fake serves.
#[derive(Debug)]
pub(crate) struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Whether it has a `status` subresource (writes to the main resource keep the status).
    pub status: bool,
    pub short_names: &'static [&'static str],
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Every resource type the fake serves; an index into this table identifies one.
pub(crate) const RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        status: true,
        short_names: &["po"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        status: false,
        short_names: &[],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        status: false,
        short_names: &["ev"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        status: true,
        short_names: &["svc"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        status: false,
        short_names: &["cm"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        status: true,
        short_names: &["ns"],
    },
    ResourceType {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        status: false,
        short_names: &[],
    },
    ResourceType {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        status: false,
        short_names: &["ev"],
    },
];

pub(crate) const PODS: usize = 0;
pub(crate) const SECRETS: usize = 1;
pub(crate) const NAMESPACES: usize = 5;

/// Finds a resource type by group, version and plural.
pub(crate) fn resource(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// What a change did, as a watch event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change in the history.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub res: usize,
    pub namespace: String,
    pub kind: ChangeType,
    /// The object after the change (for a deletion: as it was when removed, with the
    /// deletion's resourceVersion).
    pub object: Value,
    /// The object before the change, for modifications and deletions.
    pub prev: Option<Value>,
}

type Key = (String, String);

/// All objects and the change history.
#[derive(Debug)]
pub(crate) struct Store {
    rv: u64,
    objects: Vec<BTreeMap<Key, Value>>,
    history: VecDeque<Change>,
    history_limit: usize,
    /// Watches and exact lists from a version below this one get 410 Gone: the changes after it
    /// are no longer all in the history.
    horizon: u64,
}

pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub(crate) fn rv_of(obj: &Value) -> u64 {
    meta_str(obj, "resourceVersion").parse().unwrap_or(0)
}

fn set_rv(obj: &mut Value, rv: u64) {
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let mut store = Store {
            rv: 0,
            objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            horizon: 0,
        };
        for ns in ["default", "kube-system"] {
            store.ensure_namespace(ns);
        }
        store
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn horizon(&self) -> u64 {
        self.horizon
    }

    pub fn set_history_limit(&mut self, limit: usize) {
        self.history_limit = limit.max(1);
        self.trim();
    }

    /// Forgets the whole history: a watch or exact list from any older version gets 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.horizon = self.rv;
    }

    fn trim(&mut self) {
        while self.history.len() > self.history_limit {
            if let Some(c) = self.history.pop_front() {
                self.horizon = c.rv;
            }
        }
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        self.trim();
    }

    /// The changes after `rv`, or `None` when some of them are no longer kept.
    pub fn changes_after(&self, rv: u64) -> Option<impl Iterator<Item = &Change>> {
        if rv < self.horizon {
            return None;
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Some(self.history.range(start..))
    }

    pub fn get(&self, res: usize, ns: &str, name: &str) -> Option<&Value> {
        self.objects[res].get(&(ns.to_owned(), name.to_owned()))
    }

    /// The objects of one type now, in a namespace or (with `None`) everywhere, in key order.
    pub fn list(&self, res: usize, ns: Option<&str>) -> Vec<Value> {
        self.objects[res]
            .iter()
            .filter(|((n, _), _)| ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The objects of one type as they were at `rv`, or 410 when that is older than the history.
    pub fn list_at(&self, res: usize, ns: Option<&str>, rv: u64) -> Result<Vec<Value>, ApiError> {
        if rv > self.rv {
            return Err(ApiError::new(
                504,
                "Timeout",
                format!("Too large resource version: {rv}, current: {}", self.rv),
            ));
        }
        let Some(_) = self.changes_after(rv) else {
            return Err(ApiError::gone(rv, self.horizon));
        };
        let mut objs = self.objects[res].clone();
        for c in self.history.iter().rev() {
            if c.rv <= rv {
                break;
            }
            if c.res != res {
                continue;
            }
            let key = (c.namespace.clone(), meta_str(&c.object, "name").to_owned());
            match (c.kind, &c.prev) {
                (ChangeType::Added, _) => {
                    objs.remove(&key);
                }
                (_, Some(prev)) => {
                    objs.insert(key, prev.clone());
                }
                (_, None) => {}
            }
        }
        Ok(objs
            .into_iter()
            .filter(|((n, _), _)| ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
            .collect())
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Makes sure a namespace object exists (objects may be created in any namespace).
    pub fn ensure_namespace(&mut self, ns: &str) {
        if ns.is_empty() || self.get(NAMESPACES, "", ns).is_some() {
            return;
        }
        let obj = json!({
            "metadata": {"name": ns},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        });
        let _ = self.create(NAMESPACES, "", obj);
    }

    /// Creates an object as `POST` does: fills in the server-set metadata, 409 if it exists.
    pub fn create(&mut self, res: usize, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        let rt = &RESOURCES[res];
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        let body_ns = meta_str(&obj, "namespace").to_owned();
        if rt.namespaced {
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
                )));
            }
            obj["metadata"]["namespace"] = json!(ns);
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        let mut name = meta_str(&obj, "name").to_owned();
        if name.is_empty() {
            let prefix = meta_str(&obj, "generateName").to_owned();
            if prefix.is_empty() {
                return Err(ApiError::invalid(format!(
                    "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    rt.kind
                )));
            }
            loop {
                name = format!("{prefix}{}", name_suffix());
                if self.get(res, ns, &name).is_none() {
                    break;
                }
            }
            obj["metadata"]["name"] = json!(name);
        }
        if self.get(res, ns, &name).is_some() {
            return Err(ApiError::already_exists(rt.plural, rt.group, &name));
        }
        if rt.namespaced {
            self.ensure_namespace(ns);
        }
        if res == SECRETS {
            secret_string_data(&mut obj);
        }
        if res == PODS {
            // As the API server does: a new pod's status is reset to Pending with its QoS class.
            let qos = qos_class(&obj);
            obj["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(new_uid());
        meta["creationTimestamp"] = json!(now_rfc3339());
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
        }
        let rv = self.bump();
        set_rv(&mut obj, rv);
        self.objects[res].insert((ns.to_owned(), name), obj.clone());
        self.record(Change {
            rv,
            res,
            namespace: ns.to_owned(),
            kind: ChangeType::Added,
            object: obj.clone(),
            prev: None,
        });
        Ok(obj)
    }

    /// Stores a new version of an existing object. The caller has checked preconditions; the
    /// server-set metadata is carried over from the stored object. An update that changes
    /// nothing is not a change: the stored object is returned and no event is recorded.
    pub fn update(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let rt = &RESOURCES[res];
        let Some(old) = self.get(res, ns, name).cloned() else {
            return Err(ApiError::not_found(rt.plural, rt.group, name));
        };
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match old["metadata"].get(field) {
                Some(v) => obj["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = obj["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        if res == SECRETS {
            secret_string_data(&mut obj);
        }
        set_rv(&mut obj, rv_of(&old));
        if obj == old {
            return Ok(old);
        }
        if obj.get("spec") != old.get("spec") {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            obj["metadata"]["generation"] = json!(generation);
        }
        Ok(self.commit_modified(res, ns, name, obj, old))
    }

    /// Stores a modification made by the server itself (status changes, deletion marks).
    pub fn commit_modified(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        mut obj: Value,
        old: Value,
    ) -> Value {
        let rv = self.bump();
        set_rv(&mut obj, rv);
        self.objects[res].insert((ns.to_owned(), name.to_owned()), obj.clone());
        self.record(Change {
            rv,
            res,
            namespace: ns.to_owned(),
            kind: ChangeType::Modified,
            object: obj.clone(),
            prev: Some(old),
        });
        obj
    }

    /// Changes a stored object in place through `f`; `None` if it does not exist (or `f`
    /// declines by returning false).
    pub fn modify(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value) -> bool,
    ) -> Option<Value> {
        let old = self.get(res, ns, name)?.clone();
        let mut obj = old.clone();
        if !f(&mut obj) {
            return None;
        }
        if obj == old {
            return Some(old);
        }
        Some(self.commit_modified(res, ns, name, obj, old))
    }

    /// Removes an object, records the deletion, and removes (recursively) every object whose
    /// `ownerReferences` name it, as the garbage collector does. Returns the removed objects,
    /// the named one first.
    pub fn remove(&mut self, res: usize, ns: &str, name: &str) -> Vec<(usize, Value)> {
        let mut removed = Vec::new();
        let mut queue = vec![(res, ns.to_owned(), name.to_owned())];
        while let Some((res, ns, name)) = queue.pop() {
            let Some(old) = self.objects[res].remove(&(ns.clone(), name.clone())) else {
                continue;
            };
            let uid = meta_str(&old, "uid").to_owned();
            let rv = self.bump();
            let mut obj = old.clone();
            set_rv(&mut obj, rv);
            self.record(Change {
                rv,
                res,
                namespace: ns.clone(),
                kind: ChangeType::Deleted,
                object: obj.clone(),
                prev: Some(old),
            });
            removed.push((res, obj));
            for (r, objects) in self.objects.iter().enumerate() {
                for ((ons, oname), o) in objects {
                    let owned = o
                        .pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|refs| {
                            refs.iter()
                                .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid.as_str()))
                        });
                    if owned && (ons == &ns || !RESOURCES[r].namespaced) {
                        queue.push((r, ons.clone(), oname.clone()));
                    }
                }
            }
        }
        removed
    }
}

/// A pod's QoS class from its containers' requests and limits.
pub(crate) fn qos_class(pod: &Value) -> &'static str {
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in &containers {
        let requests = c.pointer("/resources/requests");
        let limits = c.pointer("/resources/limits");
        any |= requests.is_some_and(|r| r.as_object().is_some_and(|m| !m.is_empty()))
            || limits.is_some_and(|l| l.as_object().is_some_and(|m| !m.is_empty()));
        for resource in ["cpu", "memory"] {
            let limit = limits.and_then(|l| l.get(resource));
            let request = requests.and_then(|r| r.get(resource)).or(limit);
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    match (guaranteed, any) {
        (true, _) => "Guaranteed",
        (false, true) => "Burstable",
        (false, false) => "BestEffort",
    }
}

/// Moves a Secret's `stringData` into `data` as base64, as the API server does.
fn secret_string_data(obj: &mut Value) {
    if obj.get("type").is_none() {
        obj["type"] = json!("Opaque");
    }
    let Some(string_data) = obj.as_object_mut().and_then(|m| m.remove("stringData")) else {
        return;
    };
    if let Value::Object(sd) = string_data {
        if !obj.get("data").is_some_and(Value::is_object) {
            obj["data"] = json!({});
        }
        for (k, v) in sd {
            let text = v
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string());
            obj["data"][k] = json!(base64_encode(text.as_bytes()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_lists_replay_history_backwards() {
        let mut s = Store::new(100);
        s.create(
            SECRETS,
            "ns",
            json!({"metadata": {"name": "a"}, "stringData": {"k": "v"}}),
        )
        .unwrap();
        let at = s.resource_version();
        s.create(SECRETS, "ns", json!({"metadata": {"name": "b"}}))
            .unwrap();
        s.remove(SECRETS, "ns", "a");
        let then: Vec<_> = s
            .list_at(SECRETS, Some("ns"), at)
            .unwrap()
            .iter()
            .map(|o| meta_str(o, "name").to_owned())
            .collect();
        assert_eq!(then, ["a"]);
        assert_eq!(s.get(SECRETS, "ns", "b").unwrap()["type"], "Opaque");
        s.compact();
        assert_eq!(s.list_at(SECRETS, Some("ns"), at).unwrap_err().code, 410);
    }
}
