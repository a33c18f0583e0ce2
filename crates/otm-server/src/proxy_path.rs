//! The normalised path of a call to one of the egress proxies.
//!
//! Both proxies decide on decoded path segments, never on the raw path: a segment is
//! percent-decoded once, and refused when it is empty (`//`, a trailing slash), a dot segment
//! (`.` or `..`, written plainly or as `%2e`/`%2E`), or holds what a segment cannot (an encoded
//! `/` or `\`, a NUL or another control character, bytes that are not UTF-8). The URL that goes
//! upstream is built from the checked segments, so what was checked is what is sent.

use std::fmt;

/// The model base URL an agent of an instance is given: the model proxy's route on the egress
/// listener, under the instance's surrogate token.
pub fn model_base_url(egress_url: &str, surrogate: &str) -> String {
    format!("{}/model/{surrogate}", egress_url.trim_end_matches('/'))
}

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathRefusal {
    /// The path does not start with `/`.
    NotAbsolute,
    /// `//` or a trailing `/`.
    EmptySegment,
    /// `.` or `..`, plain or encoded.
    DotSegment,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// An encoded `/` or `\`, a control character, or bytes that are not UTF-8.
    BadCharacter,
}

impl PathRefusal {
    /// The label of the refusal in metrics.
    pub fn label(self) -> &'static str {
        match self {
            PathRefusal::NotAbsolute => "path_not_absolute",
            PathRefusal::EmptySegment => "path_empty_segment",
            PathRefusal::DotSegment => "path_dot_segment",
            PathRefusal::BadEscape => "path_bad_escape",
            PathRefusal::BadCharacter => "path_bad_character",
        }
    }
}

impl fmt::Display for PathRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathRefusal::NotAbsolute => "the path must start with /",
            PathRefusal::EmptySegment => "the path has an empty segment or a trailing slash",
            PathRefusal::DotSegment => "the path has a . or .. segment",
            PathRefusal::BadEscape => "the path has a malformed percent escape",
            PathRefusal::BadCharacter => {
                "the path has an encoded slash, a control character or invalid UTF-8"
            }
        })
    }
}

/// The decoded segments of `raw` (a URI path, without its query), each checked as the module
/// docs say.
pub fn segments(raw: &str) -> Result<Vec<String>, PathRefusal> {
    let rest = raw.strip_prefix('/').ok_or(PathRefusal::NotAbsolute)?;
    rest.split('/').map(segment).collect()
}

fn segment(raw: &str) -> Result<String, PathRefusal> {
    if raw.is_empty() {
        return Err(PathRefusal::EmptySegment);
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).and_then(|b| hex(*b));
            let lo = bytes.get(i + 2).and_then(|b| hex(*b));
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(PathRefusal::BadEscape),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).map_err(|_| PathRefusal::BadCharacter)?;
    if s.chars().any(|c| c == '/' || c == '\\' || c.is_control()) {
        return Err(PathRefusal::BadCharacter);
    }
    if s == "." || s == ".." {
        return Err(PathRefusal::DotSegment);
    }
    Ok(s)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// True for a Bot API method name: ASCII letters only (`sendMessage`).
pub fn is_method_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphabetic())
}

/// True for a segment of a Telegram file path (`photos`, `file_12.jpg`): letters, digits, `_`,
/// `-` and `.`, and not a dot segment. Such a segment needs no escaping in a URL.
pub fn is_file_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_split_into_decoded_segments() {
        assert_eq!(
            segments("/bot1:abc/sendMessage").unwrap(),
            ["bot1:abc", "sendMessage"]
        );
        assert_eq!(
            segments("/bot1%3Aabc/sendMessage").unwrap(),
            ["bot1:abc", "sendMessage"]
        );
        assert_eq!(
            segments("/file/bot1:abc/photos/file_1.jpg").unwrap(),
            ["file", "bot1:abc", "photos", "file_1.jpg"]
        );
        // A double-encoded dot segment is a literal `%2e%2e` after one decoding, and goes
        // nowhere: callers accept only their own characters.
        assert_eq!(segments("/x/%252e%252e").unwrap(), ["x", "%2e%2e"]);
    }

    #[test]
    fn tricks_are_refused() {
        for (path, why) in [
            ("/bot1:abc/x/../setWebhook", PathRefusal::DotSegment),
            ("/bot1:abc/x/./setWebhook", PathRefusal::DotSegment),
            ("/bot1:abc/x/%2e%2e/deleteWebhook", PathRefusal::DotSegment),
            ("/bot1:abc/x/%2E%2E/deleteWebhook", PathRefusal::DotSegment),
            ("/bot1:abc/x/.%2e/deleteWebhook", PathRefusal::DotSegment),
            ("/bot1:abc/%2e/deleteWebhook", PathRefusal::DotSegment),
            ("/bot1:abc/setWebhook/", PathRefusal::EmptySegment),
            ("/bot1:abc//setWebhook", PathRefusal::EmptySegment),
            ("/file/bot1:abc/../../x", PathRefusal::DotSegment),
            (
                "/model/s/..%2F..%2Fadmin%2Fsecrets",
                PathRefusal::BadCharacter,
            ),
            ("/model/s/a%5Cb", PathRefusal::BadCharacter),
            ("/model/s/a%00b", PathRefusal::BadCharacter),
            ("/model/s/a%0ab", PathRefusal::BadCharacter),
            ("/model/s/%ff", PathRefusal::BadCharacter),
            ("/model/s/%2", PathRefusal::BadEscape),
            ("/model/s/%zz", PathRefusal::BadEscape),
            ("bot1:abc/getMe", PathRefusal::NotAbsolute),
        ] {
            assert_eq!(segments(path), Err(why), "{path}");
        }
    }

    #[test]
    fn method_names_and_file_segments() {
        assert!(is_method_name("sendMessage"));
        for bad in ["", "send_message", "x.y", "sendMessage1", "a b"] {
            assert!(!is_method_name(bad), "{bad}");
        }
        assert!(is_file_segment("file_1.jpg"));
        for bad in ["", ".", "..", "a%2f", "a b", "a:b"] {
            assert!(!is_file_segment(bad), "{bad}");
        }
    }
}
