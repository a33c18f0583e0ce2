//! Test support for otm: a stand-in Telegram Bot API server and builders for Telegram updates.
//!
//! It is a normal library rather than a dev-only one, because the offline demo and the benchmarks
//! use it too.
//!
//! # Layout
//! - [`aws_metadata`]: [`PodIdentityEndpoint`] and [`ImdsEndpoint`], the EKS Pod Identity agent
//!   and the EC2 instance metadata service (IMDSv2) on `127.0.0.1:0`, handing out numbered
//!   temporary AWS credentials with an expiry a test sets, and counting requests.
//! - [`fake_telegram`]: [`FakeTelegram`], an in-process Bot API server on `127.0.0.1:0` that
//!   checks tokens, answers the methods otm and its agents call, records every call, and can be
//!   told to fail or slow down `sendMessage`.
//! - [`updates`]: builders for realistic Telegram updates, such as [`text_update`].
//! - [`stub_model`]: [`StubModel`], an OpenAI-compatible model server on `127.0.0.1:0` whose
//!   answers count the earlier user turns it was sent, and which records the key it saw.
//! - [`kube_fake`]: [`FakeApiServer`], a Kubernetes API server on `127.0.0.1:0` for pods,
//!   secrets, leases and events that kube-rs and `kubectl` can use, and which runs the pods it
//!   is given as local processes or, with [`kube_fake::ContainerRunner`], as podman containers.
//! - [`podman`]: [`podman::Podman`], podman with the runtime and `containers.conf` that work on
//!   hosts with a cgroup v1 or hybrid layout and a low open-files limit.

pub mod aws_metadata;
pub mod fake_telegram;
pub mod kube_fake;
pub mod podman;
pub mod stub_model;
pub mod updates;

pub use aws_metadata::{ImdsEndpoint, PodIdentityEndpoint};
pub use fake_telegram::{Call, FILE_BYTES, FakeTelegram, SentMessage, WebhookInfo};
pub use kube_fake::FakeApiServer;
pub use stub_model::{ModelRequest, StubModel};
pub use updates::text_update;
