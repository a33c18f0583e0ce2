//! otm's control plane in one process: ingress and durable inboxes, per-tenant dispatch, the
//! orchestrator (wake, stop, reap, reconcile), the Bot API proxy and the admin API.
//!
//! # Layout
//! - [`config`]: settings (flags, `OTM_*` variables, the TOML file), validation.
//! - [`app`]: [`App`], the context every component gets.
//! - [`clock`]: [`clock::Clock`], wall time from the system or, in tests, from tokio's clock.
//! - [`ingress`]: `POST /tg/{tenant}`: secret check, durable append.
//! - [`dispatch`]: per-tenant dispatchers that drain inboxes in order.
//! - [`wake`]: what a wake answers and the [`wake::Waker`] behind [`App::wake`].
//! - [`orchestrator`]: wake, stop, idle reaper, reconciler.
//! - [`egress`]: the Bot API proxy.
//! - `forward`: sending one call upstream and passing its answer back, for both egress proxies.
//! - [`model_proxy`]: the model route on the egress listener, which adds the operator's API key.
//! - [`proxy_path`]: the decoded, checked path segments both egress proxies decide on.
//! - [`bot_limits`]: per-bot rate limits of the Bot API proxy.
//! - [`model_budget`]: per-tenant model budgets.
//! - [`surrogate`]: which tenant a surrogate token belongs to, and bounded request bodies,
//!   for both egress proxies.
//! - [`connect`]: the egress policy's CONNECT proxy to allowlisted public hosts.
//! - [`openclaw`]: what the `openclaw` profile's instances are bound with.
//! - [`openclaw_install`]: where OpenClaw is installed on this machine.
//! - [`admin`]: the admin API and `/metrics`.
//! - [`api_error`]: the error answer of the admin API and the console.
//! - [`console`]: the web console on the admin listener, and the metrics history it charts.
//! - [`telegram`]: a client for the real Bot API.
//! - [`metrics`]: Prometheus metrics.
//! - [`lease`]: coordinator leases renewed while their work runs.
//! - [`remote`]: the router's client for the orchestrators, and the router's empty runtime.
//! - [`listen`]: serving the listeners with a connection cap and a header-read timeout each.
//! - [`spool`]: private scratch files for archives in transit.
//! - [`server`]: start and shutdown.

pub mod admin;
pub mod api_error;
pub mod app;
pub mod bot_limits;
pub mod clock;
pub mod config;
pub mod connect;
pub mod console;
pub mod dispatch;
pub mod egress;
mod forward;
pub mod ingress;
pub mod lease;
pub mod listen;
pub mod metrics;
pub mod model_budget;
pub mod model_proxy;
pub mod openclaw;
pub mod openclaw_install;
pub mod orchestrator;
pub mod proxy_path;
pub mod remote;
pub mod server;
pub mod spool;
pub mod surrogate;
pub mod telegram;
pub mod wake;
pub mod webhook_secrets;

pub use app::App;
pub use config::{Role, Sandbox, Settings};
pub use server::{Server, StartError, start, start_with_registry};
