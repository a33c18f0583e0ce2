//! Agent profiles: the command, environment, endpoints, acknowledgement rule and stop grace of
//! one kind of agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod openclaw;

/// The directory of an instance where a profile writes the files it renders for its agent
/// (its config): shown read-only in the agent's sandbox, which may be made before they are.
pub const CONFIG_DIR: &str = "config";

/// How an agent acknowledges a delivered update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AckRule {
    /// Any 2xx status.
    Success,
    /// A 2xx status with this header and value.
    Header {
        name: &'static str,
        value: &'static str,
    },
}

/// Everything the shim needs to run one agent for one tenant.
#[derive(Clone, Debug)]
pub struct AgentLaunch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Where the agent's webhook listens, e.g. `http://127.0.0.1:41234/webhook`.
    pub webhook_url: String,
    /// Where readiness is checked; 200 means ready.
    pub health_url: String,
    /// More URLs that must answer 200 too before the agent counts as ready.
    pub also_ready: Vec<String>,
    /// The value the agent expects in `X-Telegram-Bot-Api-Secret-Token`.
    pub webhook_secret: String,
    /// Files the shim wrote for the agent (its rendered config), shown read-only in its sandbox.
    pub read_only: Vec<PathBuf>,
}

/// Inputs a profile renders an [`AgentLaunch`] from.
#[derive(Clone, Debug)]
pub struct LaunchInputs<'a> {
    /// The instance directory (the shim's `--dir`); `state_dir` is inside it.
    pub instance_dir: &'a Path,
    /// What snapshots keep.
    pub state_dir: &'a Path,
    /// A free loopback port for the agent.
    pub port: u16,
    pub bot_api_root: &'a str,
    pub bot_token: &'a str,
    pub webhook_secret: &'a str,
    pub settings: &'a BTreeMap<String, String>,
}

/// One kind of agent.
#[derive(Clone, Debug)]
pub struct AgentProfile {
    pub name: &'static str,
    pub ack: AckRule,
    /// How long to wait for readiness after the agent starts.
    pub ready_timeout: Duration,
    /// How long a delivery may take before it counts as failed.
    pub deliver_timeout: Duration,
    /// Time between SIGTERM and SIGKILL on stop.
    pub stop_grace: Duration,
    /// Top-level entries of the state directory left out of snapshots.
    pub snapshot_skip: &'static [&'static str],
    /// Pause the agent (its cgroup frozen, or SIGSTOP to its processes) while a snapshot copies
    /// its state directory, so files it writes at any time (SQLite databases and their WAL) are
    /// copied as of one instant. Not needed once the agent has exited.
    pub quiesce_snapshots: bool,
    render: fn(&LaunchInputs<'_>) -> Result<AgentLaunch, String>,
}

impl AgentProfile {
    /// Renders the launch description for one bind.
    pub fn render(&self, inputs: &LaunchInputs<'_>) -> Result<AgentLaunch, String> {
        (self.render)(inputs)
    }
}

/// The bind setting that turns the tenant's egress proxy on (`1`): the agent gets
/// `HTTPS_PROXY` and friends pointing at the CONNECT proxy behind its forwarder.
pub const EGRESS_PROXY: &str = "egress.proxy";

/// The bind setting that says who may write to the agent: Telegram user ids joined by commas,
/// or `*` (anyone); empty for nobody ([`otm_core::DmPolicy::to_setting`]). Absent when the
/// tenant never had users allowed.
pub const ALLOWED_USERS: &str = "telegram.allowed_users";

/// The names of every profile this build knows.
pub fn known_profiles() -> &'static [&'static str] {
    &["reference", "openclaw", "probe"]
}

/// The profile that hands whoever writes to the bot a shell in the sandbox: the reference agent
/// in probe mode (`/sh <command>`). For testing the sandbox; a server accepts it only when told
/// to (`--allow-probe-profile`).
pub const PROBE_PROFILE: &str = "probe";

/// Looks a profile up by name.
pub fn profile(name: &str) -> Option<AgentProfile> {
    match name {
        "reference" => Some(reference()),
        PROBE_PROFILE => Some(probe()),
        "openclaw" => Some(openclaw::profile()),
        _ => None,
    }
}

/// The reference agent: `otm-reference-agent`, shipped beside `otm`.
fn reference() -> AgentProfile {
    AgentProfile {
        name: "reference",
        ack: AckRule::Success,
        ready_timeout: Duration::from_secs(15),
        deliver_timeout: Duration::from_secs(30),
        stop_grace: Duration::from_secs(10),
        snapshot_skip: &["tmp"],
        quiesce_snapshots: false,
        render: |i| {
            let program = find_program("otm-reference-agent")?;
            let mut env = BTreeMap::new();
            env.insert("OTM_AGENT_LISTEN".into(), format!("127.0.0.1:{}", i.port));
            env.insert(
                "OTM_AGENT_STATE_DIR".into(),
                i.state_dir.display().to_string(),
            );
            env.insert("OTM_BOT_API_ROOT".into(), i.bot_api_root.to_owned());
            env.insert("OTM_BOT_TOKEN".into(), i.bot_token.to_owned());
            env.insert("OTM_WEBHOOK_SECRET".into(), i.webhook_secret.to_owned());
            if let Some(users) = i.settings.get(ALLOWED_USERS) {
                env.insert("OTM_AGENT_ALLOWED_USERS".into(), users.clone());
            }
            Ok(AgentLaunch {
                program,
                args: vec![],
                env,
                webhook_url: format!("http://127.0.0.1:{}/webhook", i.port),
                health_url: format!("http://127.0.0.1:{}/healthz", i.port),
                also_ready: vec![],
                webhook_secret: i.webhook_secret.to_owned(),
                read_only: vec![],
            })
        },
    }
}

/// The reference agent with its probe mode on.
fn probe() -> AgentProfile {
    AgentProfile {
        name: PROBE_PROFILE,
        render: |i| {
            let mut launch = (reference().render)(i)?;
            launch.env.insert("OTM_AGENT_PROBES".into(), "1".into());
            Ok(launch)
        },
        ..reference()
    }
}

/// Finds an agent program: beside the running `otm` binary first, then on `PATH`.
pub fn find_program(name: &str) -> Result<PathBuf, String> {
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "agent program `{name}` was found neither beside otm nor on PATH; build or install it"
    ))
}
