//! The patch formats the API server accepts: JSON merge patch (RFC 7386, also used for strategic
//! merge patches and server-side apply here) and JSON patch (RFC 6902).

use serde_json::Value;

/// Applies a JSON merge patch (RFC 7386) to `target`.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(map) = target else {
        return;
    };
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Why a JSON patch could not be applied.
#[derive(Debug, PartialEq)]
pub(crate) enum JsonPatchError {
    /// A `test` operation found another value.
    TestFailed(String),
    /// The patch is malformed or names a path that does not exist.
    Invalid(String),
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<(Vec<String>, String), JsonPatchError> {
    if path.is_empty() {
        return Err(JsonPatchError::Invalid("the root cannot be patched".into()));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(JsonPatchError::Invalid(format!(
            "{path:?} is not a JSON pointer"
        )));
    };
    let mut parts: Vec<String> = rest.split('/').map(unescape).collect();
    let last = parts.pop().unwrap_or_default();
    Ok((parts, last))
}

fn parent_mut<'a>(
    doc: &'a mut Value,
    parents: &[String],
    path: &str,
) -> Result<&'a mut Value, JsonPatchError> {
    let mut cur = doc;
    for p in parents {
        cur = match cur {
            Value::Object(m) => m.get_mut(p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| JsonPatchError::Invalid(format!("path {path:?} does not exist")))?;
    }
    Ok(cur)
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), JsonPatchError> {
    let (parents, last) = split_pointer(path)?;
    match parent_mut(doc, &parents, path)? {
        Value::Object(m) => {
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|i| *i <= a.len())
                    .ok_or_else(|| {
                        JsonPatchError::Invalid(format!("bad array index in {path:?}"))
                    })?
            };
            a.insert(i, value);
            Ok(())
        }
        _ => Err(JsonPatchError::Invalid(format!(
            "path {path:?} does not exist"
        ))),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, JsonPatchError> {
    let (parents, last) = split_pointer(path)?;
    let missing = || JsonPatchError::Invalid(format!("path {path:?} does not exist"));
    match parent_mut(doc, &parents, path)? {
        Value::Object(m) => m.remove(&last).ok_or_else(missing),
        Value::Array(a) => {
            let i = last
                .parse::<usize>()
                .ok()
                .filter(|i| *i < a.len())
                .ok_or_else(missing)?;
            Ok(a.remove(i))
        }
        _ => Err(missing()),
    }
}

/// Applies a JSON patch (RFC 6902) to `doc`; on error `doc` may be partly patched.
pub(crate) fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), JsonPatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| JsonPatchError::Invalid("a JSON patch is an array of operations".into()))?;
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| JsonPatchError::Invalid("an operation without a path".into()))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| JsonPatchError::Invalid(format!("{name} at {path:?} needs a value")))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| JsonPatchError::Invalid(format!("{name} at {path:?} needs from")))
        };
        match name {
            "add" => add(doc, path, value()?)?,
            "remove" => {
                remove(doc, path)?;
            }
            "replace" => {
                remove(doc, path)?;
                add(doc, path, value()?)?;
            }
            "move" => {
                let v = remove(doc, from()?)?;
                add(doc, path, v)?;
            }
            "copy" => {
                let v = doc.pointer(from()?).cloned().ok_or_else(|| {
                    JsonPatchError::Invalid(format!("path {path:?} does not exist"))
                })?;
                add(doc, path, v)?;
            }
            "test" => {
                let expected = value()?;
                if doc.pointer(path) != Some(&expected) {
                    return Err(JsonPatchError::TestFailed(format!(
                        "testing value {path} failed: test failed"
                    )));
                }
            }
            other => {
                return Err(JsonPatchError::Invalid(format!(
                    "unknown operation {other:?}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "n": [1]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "n": [1]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut doc =
            json!({"metadata": {"resourceVersion": "5", "labels": {"a": "1"}}, "l": [1, 2]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "5"},
                {"op": "add", "path": "/metadata/labels/otm.dev~1warm", "value": "false"},
                {"op": "replace", "path": "/metadata/labels/a", "value": "2"},
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "remove", "path": "/l/0"},
            ]),
        )
        .unwrap();
        assert_eq!(
            doc["metadata"]["labels"],
            json!({"a": "2", "otm.dev/warm": "false"})
        );
        assert_eq!(doc["l"], json!([2, 3]));
        let err = json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "4"}]),
        );
        assert!(matches!(err, Err(JsonPatchError::TestFailed(_))));
        assert!(json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }
}
