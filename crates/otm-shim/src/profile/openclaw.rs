//! The `openclaw` agent profile: one OpenClaw gateway per instance.
//!
//! At bind the shim renders the gateway's config from a template (the built-in
//! [`DEFAULT_TEMPLATE`] or the operator's, passed in the bind settings), gives the gateway a home,
//! temporary directory, log file and ports of its own inside the instance directory, and starts
//! `openclaw gateway run`. The instance is ready when the gateway's `/readyz` and its Telegram
//! webhook listener both answer 200. Updates go to the webhook with the tenant's webhook secret;
//! the gateway acknowledges one with `x-openclaw-delivery-accepted: durable` once it committed it
//! to its own SQLite queue.
//!
//! Layout of an instance directory:
//!
//! | path | what | kept in snapshots |
//! |---|---|---|
//! | `state/` | `OPENCLAW_STATE_DIR`: SQLite stores, sessions, credentials, media | yes, minus `cache/` and `tmp/` |
//! | `state/workspace/` | the agent's workspace (memory files) | yes |
//! | `home/` | `HOME` and `OPENCLAW_HOME` | no |
//! | `tmp/` | `TMPDIR` (Node's compile cache, scratch files) | no |
//! | `config/openclaw.json5` | `OPENCLAW_CONFIG_PATH`, rendered at every bind | no |
//! | `home/openclaw.log` | the gateway's own log file (`logging.file`) | no |
//!
//! In a sandbox the gateway sees `state/`, `home/` and `tmp/` writable and its config
//! read-only; the instance directory's other files are the shim's.

use super::{AckRule, AgentLaunch, AgentProfile, LaunchInputs};
use otm_core::Secret;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The gateway config otm renders unless the operator gives a template of their own.
pub const DEFAULT_TEMPLATE: &str = include_str!("openclaw.json5");

/// The gateway's `NODE_OPTIONS` unless the operator gives others: V8 heap limits measured to
/// keep a gateway smaller without slowing its start or its turns (docs/openclaw.md).
pub const DEFAULT_NODE_OPTIONS: &str = "--max-semi-space-size=8";

/// Where the gateway's Telegram webhook listens, on its own port.
pub const WEBHOOK_PATH: &str = "/telegram-webhook";

/// Keys of `BindRequest.settings` this profile reads.
pub mod keys {
    /// Absolute path of the `openclaw` launcher (required).
    pub const COMMAND: &str = "openclaw.command";
    /// Directories put first on the gateway's `PATH`, `:`-separated (where Node 24 is).
    pub const PATH: &str = "openclaw.path";
    /// The config template's text; [`super::DEFAULT_TEMPLATE`] when absent.
    pub const TEMPLATE: &str = "openclaw.config_template";
    /// Node's module compile cache that `scripts/install-openclaw` filled (`<prefix>/compile-cache`),
    /// read-only to instances; used when the directory exists.
    pub const COMPILE_CACHE: &str = "openclaw.compile_cache";
    /// `NODE_OPTIONS` of the gateway; [`super::DEFAULT_NODE_OPTIONS`] when absent.
    pub const NODE_OPTIONS: &str = "openclaw.node_options";
    /// The import resolver that `scripts/install-openclaw` wrote (`<prefix>/esm-resolve.mjs`),
    /// loaded into the gateway with `--import`; used when the file exists.
    pub const ESM_RESOLVE: &str = "openclaw.esm_resolve";
    /// The model's OpenAI-compatible base URL as the instance reaches it (otm's egress route).
    pub const MODEL_BASE_URL: &str = "model.base_url";
    /// The model id at the provider.
    pub const MODEL_ID: &str = "model.id";
    /// What the instance sends as its API key (never the operator's real key).
    pub const MODEL_API_KEY: &str = "model.api_key";
}

/// The placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "gateway_port",
    "gateway_token",
    "webhook_port",
    "webhook_path",
    "webhook_url",
    "webhook_secret",
    "bot_token",
    "bot_api_root",
    "state_dir",
    "workspace",
    "log_file",
    "model_base_url",
    "model_id",
    "model_ref",
    "model_api_key",
    "dm_policy",
    "allow_from",
];

/// The `openclaw` profile.
pub fn profile() -> AgentProfile {
    AgentProfile {
        name: "openclaw",
        ack: AckRule::Header {
            name: "x-openclaw-delivery-accepted",
            value: "durable",
        },
        // Cold starts take 20 to 40 s on a small machine; the orchestrator's wake timeout is
        // the bound that matters.
        ready_timeout: Duration::from_secs(600),
        // The webhook answers once the update is queued, not after the turn.
        deliver_timeout: Duration::from_secs(60),
        // Idle, it exits within seconds; a turn in flight is drained first.
        stop_grace: Duration::from_secs(60),
        snapshot_skip: &["cache", "tmp"],
        quiesce_snapshots: true,
        render,
    }
}

fn render(i: &LaunchInputs<'_>) -> Result<AgentLaunch, String> {
    let command = i.settings.get(keys::COMMAND).filter(|c| !c.is_empty()).ok_or(
        "OpenClaw is not installed where otm looks: run scripts/install-openclaw, or give its prefix with \
         --openclaw-prefix (OTM_OPENCLAW_PREFIX)",
    )?;
    let template = i
        .settings
        .get(keys::TEMPLATE)
        .map(String::as_str)
        .unwrap_or(DEFAULT_TEMPLATE);

    let dir = i.instance_dir;
    let home = dir.join("home");
    let tmp = dir.join("tmp");
    let workspace = i.state_dir.join("workspace");
    let config_dir = dir.join(super::CONFIG_DIR);
    let config_path = config_dir.join("openclaw.json5");
    let log_file = home.join("openclaw.log");
    for d in [&home, &tmp, &workspace, &config_dir] {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }

    let gateway_port = i.port;
    let webhook_port = other_free_port(&[gateway_port])
        .map_err(|e| format!("no free port for the webhook: {e}"))?;
    let webhook_url = format!("http://127.0.0.1:{webhook_port}{WEBHOOK_PATH}");
    let gateway_token = Secret::random();

    let mut values: BTreeMap<&str, Value> = BTreeMap::new();
    values.insert("gateway_port", gateway_port.into());
    values.insert("gateway_token", gateway_token.expose().into());
    values.insert("webhook_port", webhook_port.into());
    values.insert("webhook_path", WEBHOOK_PATH.into());
    values.insert("webhook_url", webhook_url.clone().into());
    values.insert("webhook_secret", i.webhook_secret.into());
    values.insert("bot_token", i.bot_token.into());
    values.insert("bot_api_root", i.bot_api_root.trim_end_matches('/').into());
    values.insert("state_dir", path_str(i.state_dir)?.into());
    values.insert("workspace", path_str(&workspace)?.into());
    values.insert("log_file", path_str(&log_file)?.into());
    // The owner's allowlist: nobody until the operator allows users, anyone only with `*`.
    let policy = otm_core::DmPolicy::from_setting(
        i.settings
            .get(super::ALLOWED_USERS)
            .map(String::as_str)
            .unwrap_or(""),
    );
    values.insert("dm_policy", policy.openclaw_name().into());
    values.insert(
        "allow_from",
        match &policy {
            otm_core::DmPolicy::Nobody => Value::Array(vec![]),
            otm_core::DmPolicy::Anyone => Value::Array(vec!["*".into()]),
            otm_core::DmPolicy::Users(ids) => {
                Value::Array(ids.iter().map(|id| id.to_string().into()).collect())
            }
        },
    );
    if let Some(v) = i.settings.get(keys::MODEL_BASE_URL) {
        values.insert("model_base_url", v.trim_end_matches('/').into());
    }
    if let Some(v) = i.settings.get(keys::MODEL_ID) {
        values.insert("model_id", v.as_str().into());
        values.insert("model_ref", format!("otm/{v}").into());
    }
    if let Some(v) = i.settings.get(keys::MODEL_API_KEY) {
        values.insert("model_api_key", v.as_str().into());
    }
    let config = render_template(template, &values)?;
    write_private(&config_path, config.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;

    let mut path = String::new();
    if let Some(extra) = i.settings.get(keys::PATH).filter(|p| !p.is_empty()) {
        path.push_str(extra);
        path.push(':');
    }
    path.push_str(&std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()));

    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_owned(), v);
    };
    set("PATH", path);
    set("HOME", home.display().to_string());
    set("OPENCLAW_HOME", home.display().to_string());
    set("OPENCLAW_STATE_DIR", i.state_dir.display().to_string());
    set("OPENCLAW_CONFIG_PATH", config_path.display().to_string());
    set("TMPDIR", tmp.display().to_string());
    // Quiet and offline: no mDNS, no self-update, no registry look-ups; otm supervises it.
    set("OPENCLAW_DISABLE_BONJOUR", "1".into());
    set("OPENCLAW_NO_AUTO_UPDATE", "1".into());
    set("OPENCLAW_OFFLINE", "1".into());
    set("OPENCLAW_SUPERVISOR_MODE", "external".into());
    set("NO_COLOR", "1".into());
    // The compile cache made at install: every wake starts with the gateway's modules compiled
    // instead of compiling them all again into its own `tmp/` (and writing them there on exit).
    // Node only reads a cache it cannot write. OpenClaw's launcher would otherwise start a second
    // Node process to move the cache into a directory of its own below this one.
    if let Some(cache) = i
        .settings
        .get(keys::COMPILE_CACHE)
        .filter(|c| !c.is_empty() && Path::new(c).is_dir())
    {
        set("NODE_COMPILE_CACHE", cache.clone());
        set("NODE_COMPILE_CACHE_PORTABLE", "1".into());
        set("OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED", "1".into());
    }
    let mut node_options = i
        .settings
        .get(keys::NODE_OPTIONS)
        .map(String::as_str)
        .unwrap_or(DEFAULT_NODE_OPTIONS)
        .trim()
        .to_owned();
    // The install's import resolver, in the gateway, its worker threads and the Node processes
    // it starts (they inherit NODE_OPTIONS; its tools' commands do not, OpenClaw drops it there):
    // it spares Node the file-system work of resolving each import between OpenClaw's own files.
    if let Some(file) = i
        .settings
        .get(keys::ESM_RESOLVE)
        .map(Path::new)
        .filter(|f| f.is_absolute() && f.is_file())
    {
        if !node_options.is_empty() {
            node_options.push(' ');
        }
        node_options.push_str("--import=");
        node_options.push_str(&file_url(file)?);
    }
    if !node_options.is_empty() {
        set("NODE_OPTIONS", node_options);
    }

    Ok(AgentLaunch {
        program: command.into(),
        args: [
            "gateway",
            "run",
            "--port",
            &gateway_port.to_string(),
            "--bind",
            "loopback",
        ]
        .map(str::to_owned)
        .to_vec(),
        env,
        webhook_url,
        health_url: format!("http://127.0.0.1:{gateway_port}/readyz"),
        also_ready: vec![format!("http://127.0.0.1:{webhook_port}/healthz")],
        webhook_secret: i.webhook_secret.to_owned(),
        read_only: vec![config_path],
    })
}

/// Checks a template without rendering it: every `{{name}}` must be known and closed.
pub fn check_template(template: &str) -> Result<(), String> {
    let all: BTreeMap<&str, Value> = PLACEHOLDERS.iter().map(|p| (*p, Value::Null)).collect();
    render_template(template, &all).map(|_| ())
}

/// Replaces every `{{name}}` with the JSON text of its value. Lines that are `//` comments are
/// left as they are, so a comment can mention a placeholder.
pub fn render_template(template: &str, values: &BTreeMap<&str, Value>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 512);
    for (n, line) in template.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with("//") {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or_else(|| {
                format!(
                    "the OpenClaw config template has an unclosed `{{{{` on line {}",
                    n + 1
                )
            })?;
            let name = after[..end].trim();
            if !PLACEHOLDERS.contains(&name) {
                return Err(format!(
                    "the OpenClaw config template uses `{{{{{name}}}}}` on line {}, which otm does not know; known: {}",
                    n + 1,
                    PLACEHOLDERS.join(", ")
                ));
            }
            match values.get(name) {
                Some(v) => out.push_str(&v.to_string()),
                None if name.starts_with("model_") => {
                    return Err(format!(
                        "the OpenClaw config template uses `{{{{{name}}}}}`, but no model is configured: start the \
                         server with --model-base-url and --model-id (and --model-api-key if the provider needs one)"
                    ));
                }
                None => {
                    return Err(format!(
                        "no value for `{{{{{name}}}}}` in the OpenClaw config template"
                    ));
                }
            }
            rest = &after[end + 2..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// `file://` URL of an absolute path, for a `NODE_OPTIONS` value: bytes other than unreserved
/// ones and `/` are percent-encoded, so it holds no spaces or quotes.
fn file_url(p: &Path) -> Result<String, String> {
    let s = path_str(p)?;
    let mut out = String::from("file://");
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(out)
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("{} is not valid UTF-8", p.display()))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// A free loopback port other than those given.
fn other_free_port(taken: &[u16]) -> std::io::Result<u16> {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_values() -> BTreeMap<&'static str, Value> {
        PLACEHOLDERS
            .iter()
            .map(|p| (*p, Value::from(format!("v-{p}"))))
            .collect()
    }

    #[test]
    fn the_default_template_uses_only_known_placeholders() {
        check_template(DEFAULT_TEMPLATE).unwrap();
        let out = render_template(DEFAULT_TEMPLATE, &all_values()).unwrap();
        assert!(
            out.lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .all(|l| !l.contains("{{")),
            "{out}"
        );
        assert!(out.contains("token: \"v-gateway_token\""), "{out}");
    }

    #[test]
    fn values_are_inserted_as_json() {
        let mut v = BTreeMap::new();
        v.insert("gateway_port", Value::from(4242u16));
        v.insert("bot_token", Value::from("12:a\"b\\c"));
        let out = render_template("{ port: {{gateway_port}}, t: {{ bot_token }} }", &v).unwrap();
        assert_eq!(out, r#"{ port: 4242, t: "12:a\"b\\c" }"#);
    }

    #[test]
    fn unknown_unclosed_and_missing_placeholders_are_named() {
        let e = check_template("{ a: {{nope}} }").unwrap_err();
        assert!(e.contains("`{{nope}}`"), "{e}");
        let e = check_template("{\n a: {{gateway_port }").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = render_template("{ m: {{model_id}} }", &BTreeMap::new()).unwrap_err();
        assert!(e.contains("--model-base-url"), "{e}");
    }

    #[test]
    fn render_writes_a_private_config_and_isolates_the_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut settings = BTreeMap::new();
        settings.insert(keys::COMMAND.to_owned(), "/opt/oc/bin/openclaw".to_owned());
        settings.insert(keys::PATH.to_owned(), "/opt/oc/bin".to_owned());
        settings.insert(
            keys::MODEL_BASE_URL.to_owned(),
            "http://127.0.0.1:9/model/s".to_owned(),
        );
        settings.insert(keys::MODEL_ID.to_owned(), "m-1".to_owned());
        settings.insert(keys::MODEL_API_KEY.to_owned(), "otm-proxied".to_owned());
        let cache = dir.path().join("compile-cache");
        std::fs::create_dir(&cache).unwrap();
        settings.insert(keys::COMPILE_CACHE.to_owned(), cache.display().to_string());
        let inputs = LaunchInputs {
            instance_dir: dir.path(),
            state_dir: &state,
            port: 40001,
            bot_api_root: "http://127.0.0.1:8082/",
            bot_token: "12:surrogate",
            webhook_secret: "whs",
            settings: &settings,
        };
        let launch = profile().render(&inputs).unwrap();
        assert_eq!(launch.program, Path::new("/opt/oc/bin/openclaw"));
        assert_eq!(
            launch.args,
            ["gateway", "run", "--port", "40001", "--bind", "loopback"]
        );
        assert_eq!(launch.health_url, "http://127.0.0.1:40001/readyz");
        assert!(launch.webhook_url.ends_with(WEBHOOK_PATH));
        assert!(launch.env["PATH"].starts_with("/opt/oc/bin:"));
        assert_eq!(
            launch.env["OPENCLAW_STATE_DIR"],
            state.display().to_string()
        );
        assert_eq!(
            launch.env["HOME"],
            dir.path().join("home").display().to_string()
        );
        assert_eq!(
            launch.env["NODE_COMPILE_CACHE"],
            cache.display().to_string()
        );
        assert_eq!(launch.env["OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED"], "1");
        assert_eq!(launch.env["NODE_OPTIONS"], DEFAULT_NODE_OPTIONS);

        // With the install's import resolver, the gateway loads it after the options.
        let resolver = dir.path().join("my prefix/esm-resolve.mjs");
        std::fs::create_dir_all(resolver.parent().unwrap()).unwrap();
        std::fs::write(&resolver, "").unwrap();
        let mut with_resolver = settings.clone();
        with_resolver.insert(keys::ESM_RESOLVE.to_owned(), resolver.display().to_string());
        let launch = profile()
            .render(&LaunchInputs {
                settings: &with_resolver,
                ..inputs.clone()
            })
            .unwrap();
        let url = format!(
            "file://{}",
            resolver.display().to_string().replace(' ', "%20")
        );
        assert_eq!(
            launch.env["NODE_OPTIONS"],
            format!("{DEFAULT_NODE_OPTIONS} --import={url}")
        );
        with_resolver.insert(keys::NODE_OPTIONS.to_owned(), String::new());
        let launch = profile()
            .render(&LaunchInputs {
                settings: &with_resolver,
                ..inputs.clone()
            })
            .unwrap();
        assert_eq!(launch.env["NODE_OPTIONS"], format!("--import={url}"));
        let config = std::fs::read_to_string(dir.path().join("config/openclaw.json5")).unwrap();
        assert!(
            config.contains("apiRoot: \"http://127.0.0.1:8082\""),
            "{config}"
        );
        assert!(config.contains("primary: \"otm/m-1\""), "{config}");
        assert!(config.contains("webhookSecret: \"whs\""), "{config}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("config/openclaw.json5"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the config carries tokens: owner only");
        assert!(state.join("workspace").is_dir());

        // No cache where the install should have put it (an older install): Node's default.
        let mut no_cache = settings.clone();
        no_cache.insert(
            keys::COMPILE_CACHE.to_owned(),
            dir.path().join("nope").display().to_string(),
        );
        no_cache.insert(keys::NODE_OPTIONS.to_owned(), String::new());
        no_cache.insert(
            keys::ESM_RESOLVE.to_owned(),
            dir.path().join("nope.mjs").display().to_string(),
        );
        let launch = profile()
            .render(&LaunchInputs {
                settings: &no_cache,
                ..inputs.clone()
            })
            .unwrap();
        assert!(!launch.env.contains_key("NODE_COMPILE_CACHE"));
        assert!(
            !launch
                .env
                .contains_key("OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED")
        );
        assert!(!launch.env.contains_key("NODE_OPTIONS"));

        let mut without = settings.clone();
        without.remove(keys::COMMAND);
        let inputs = LaunchInputs {
            settings: &without,
            ..inputs
        };
        assert!(
            profile()
                .render(&inputs)
                .unwrap_err()
                .contains("scripts/install-openclaw")
        );
    }
}
