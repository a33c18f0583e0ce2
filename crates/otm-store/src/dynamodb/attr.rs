//! DynamoDB attribute values in their JSON form (`{"S": "…"}`, `{"N": "12"}`, `{"B": base64}`),
//! built and read with checks, so a damaged item becomes [`Error::Corrupt`] rather than a panic.

use otm_core::Error;
use serde_json::{Map, Value, json};

/// One item: attribute name to attribute value.
pub(crate) type Item = Map<String, Value>;

pub(crate) fn s(v: impl Into<String>) -> Value {
    json!({ "S": v.into() })
}

pub(crate) fn n(v: i64) -> Value {
    json!({ "N": v.to_string() })
}

pub(crate) fn b(v: &[u8]) -> Value {
    json!({ "B": base64_encode(v) })
}

pub(crate) fn boolean(v: bool) -> Value {
    json!({ "BOOL": v })
}

/// Reads typed attributes of one item, naming the item in errors.
pub(crate) struct Reader<'a> {
    pub item: &'a Item,
    pub what: &'a str,
}

impl<'a> Reader<'a> {
    pub fn new(item: &'a Item, what: &'a str) -> Self {
        Reader { item, what }
    }

    fn corrupt(&self, message: String) -> Error {
        Error::Corrupt {
            what: self.what.to_owned(),
            message,
        }
    }

    fn typed(&self, name: &str, ty: &str) -> Result<Option<&'a Value>, Error> {
        match self.item.get(name) {
            None => Ok(None),
            Some(v) => match v.get(ty) {
                Some(inner) => Ok(Some(inner)),
                None if v.get("NULL").is_some() => Ok(None),
                None => Err(self.corrupt(format!("attribute {name} is not of type {ty}: {v}"))),
            },
        }
    }

    pub fn opt_s(&self, name: &str) -> Result<Option<&'a str>, Error> {
        self.typed(name, "S")?
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.corrupt(format!("attribute {name} is not a string")))
            })
            .transpose()
    }

    pub fn s(&self, name: &str) -> Result<&'a str, Error> {
        self.opt_s(name)?
            .ok_or_else(|| self.corrupt(format!("attribute {name} is missing")))
    }

    pub fn opt_n(&self, name: &str) -> Result<Option<i64>, Error> {
        self.typed(name, "N")?
            .map(|v| {
                v.as_str()
                    .and_then(|t| t.parse::<i64>().ok())
                    .ok_or_else(|| {
                        self.corrupt(format!("attribute {name} is not a 64-bit integer: {v}"))
                    })
            })
            .transpose()
    }

    pub fn n(&self, name: &str) -> Result<i64, Error> {
        self.opt_n(name)?
            .ok_or_else(|| self.corrupt(format!("attribute {name} is missing")))
    }

    pub fn bool(&self, name: &str) -> Result<bool, Error> {
        self.typed(name, "BOOL")?
            .and_then(Value::as_bool)
            .ok_or_else(|| self.corrupt(format!("attribute {name} is missing or not a boolean")))
    }

    pub fn b(&self, name: &str) -> Result<Vec<u8>, Error> {
        let v = self
            .typed(name, "B")?
            .and_then(Value::as_str)
            .ok_or_else(|| self.corrupt(format!("attribute {name} is missing or not binary")))?;
        base64_decode(v).ok_or_else(|| self.corrupt(format!("attribute {name} is not base64")))
    }
}

pub(crate) use otm_core::base64::{decode as base64_decode, encode as base64_encode};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_rfc4648() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), coded);
            assert_eq!(base64_decode(coded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        assert_eq!(base64_decode("Zm9v!"), None);
        assert_eq!(base64_decode("Z"), None);
    }

    #[test]
    fn reader_names_bad_attributes() {
        let item: Item = serde_json::from_value(json!({
            "a": {"S": "x"}, "n": {"N": "12"}, "bad": {"N": "1.5"}, "nul": {"NULL": true}
        }))
        .unwrap();
        let r = Reader::new(&item, "tenant t");
        assert_eq!(r.s("a").unwrap(), "x");
        assert_eq!(r.n("n").unwrap(), 12);
        assert_eq!(r.opt_s("nul").unwrap(), None);
        assert_eq!(r.opt_s("missing").unwrap(), None);
        let err = r.n("bad").unwrap_err().to_string();
        assert!(err.contains("tenant t") && err.contains("bad"), "{err}");
        assert!(matches!(r.s("n"), Err(Error::Corrupt { .. })));
    }
}
