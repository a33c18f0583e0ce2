//! Prometheus metrics, all prefixed `otm_`.

use otm_core::{DeliveryFailure, DeliveryOutcome};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WakePath {
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    pub path: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Limit {
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Listener {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refusal {
    /// `bot` (the Bot API proxy) or `model` (the model proxy).
    pub proxy: String,
    pub reason: String,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 120.0,
    ]
    .into_iter()
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    /// Behind a lock so that metrics kept elsewhere (the registry's calls) can join after
    /// start.
    registry: std::sync::Mutex<Registry>,
    pub updates_accepted: Counter,
    pub updates_duplicate: Counter,
    pub updates_rejected: Family<Reason, Counter>,
    pub accept_seconds: Histogram,
    pub deliveries: Family<Outcome, Counter>,
    pub delivery_failures: Family<Kind, Counter>,
    pub delivery_seconds: Histogram,
    pub wakes: Family<Outcome, Counter>,
    pub wake_seconds: Family<WakePath, Histogram>,
    pub wake_phase_seconds: Family<Phase, Histogram>,
    pub stops: Family<Reason, Counter>,
    pub instances: Family<State, Gauge>,
    pub inbox_pending: Gauge,
    pub inbox_oldest_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub egress_requests: Family<Outcome, Counter>,
    pub reconciler_events: Family<Kind, Counter>,
    pub limit_kills: Family<Limit, Counter>,
    pub admission_waits: Family<Reason, Counter>,
    pub max_running: Gauge,
    pub wakes_in_flight: Gauge,
    pub listener_connections_refused: Family<Listener, Counter>,
    pub egress_refused: Family<Refusal, Counter>,
    pub bot_api_queued_seconds: Histogram,
    pub model_tokens: Counter,
    pub thaw_seconds: Histogram,
    pub instances_frozen: Gauge,
    pub frozen_memory_bytes: Gauge,
    pub freezes: Family<Outcome, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("otm");
        let hist = || Histogram::new(latency_buckets());
        let m = Metrics {
            updates_accepted: Counter::default(),
            updates_duplicate: Counter::default(),
            updates_rejected: Family::default(),
            accept_seconds: hist(),
            deliveries: Family::default(),
            delivery_failures: Family::default(),
            delivery_seconds: hist(),
            wakes: Family::default(),
            wake_seconds: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            wake_phase_seconds: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            stops: Family::default(),
            instances: Family::default(),
            inbox_pending: Gauge::default(),
            inbox_oldest_age_seconds: Gauge::default(),
            egress_requests: Family::default(),
            reconciler_events: Family::default(),
            limit_kills: Family::default(),
            admission_waits: Family::default(),
            max_running: Gauge::default(),
            wakes_in_flight: Gauge::default(),
            listener_connections_refused: Family::default(),
            egress_refused: Family::default(),
            bot_api_queued_seconds: hist(),
            model_tokens: Counter::default(),
            thaw_seconds: hist(),
            instances_frozen: Gauge::default(),
            frozen_memory_bytes: Gauge::default(),
            freezes: Family::default(),
            registry: std::sync::Mutex::new(Registry::default()),
        };
        registry.register(
            "updates_accepted",
            "Updates stored durably in an inbox",
            m.updates_accepted.clone(),
        );
        registry.register(
            "updates_duplicate",
            "Updates answered 200 as repeats of stored ones",
            m.updates_duplicate.clone(),
        );
        registry.register(
            "updates_rejected",
            "Webhook calls refused, by reason",
            m.updates_rejected.clone(),
        );
        registry.register(
            "accept_seconds",
            "Time from webhook call to durable store",
            m.accept_seconds.clone(),
        );
        registry.register(
            "deliveries",
            "Deliveries to agents, by outcome",
            m.deliveries.clone(),
        );
        registry.register(
            "delivery_failures",
            "Failed delivery attempts, by kind (wake_failed, agent_refused, shim_unreachable, timeout)",
            m.delivery_failures.clone(),
        );
        registry.register(
            "delivery_seconds",
            "Time of one delivery to an agent",
            m.delivery_seconds.clone(),
        );
        registry.register("wakes", "Wakes, by outcome", m.wakes.clone());
        registry.register(
            "wake_seconds",
            "Wake latency by path (cache, frozen, warm, cold)",
            m.wake_seconds.clone(),
        );
        registry.register(
            "wake_phase_seconds",
            "Wake latency by path and phase",
            m.wake_phase_seconds.clone(),
        );
        registry.register("stops", "Instance stops, by reason", m.stops.clone());
        registry.register(
            "thaw_seconds",
            "Time to thaw a frozen agent, from the wake's start to its endpoint published",
            m.thaw_seconds.clone(),
        );
        registry.register(
            "instances_frozen",
            "Instances whose agent is frozen",
            m.instances_frozen.clone(),
        );
        registry.register(
            "frozen_memory_bytes",
            "Resident memory held by frozen agents, as their shims report it",
            m.frozen_memory_bytes.clone(),
        );
        registry.register(
            "freezes",
            "Freezes of idle agents, by outcome (frozen, busy, failed)",
            m.freezes.clone(),
        );
        registry.register(
            "instances",
            "Instances, by state (warm, binding, ready, stopping)",
            m.instances.clone(),
        );
        registry.register(
            "inbox_pending",
            "Pending updates over all inboxes",
            m.inbox_pending.clone(),
        );
        registry.register(
            "inbox_oldest_age_seconds",
            "Age of the oldest pending update",
            m.inbox_oldest_age_seconds.clone(),
        );
        registry.register(
            "egress_requests",
            "Bot API proxy calls, by outcome",
            m.egress_requests.clone(),
        );
        registry.register(
            "reconciler_events",
            "Reconciler actions, by kind",
            m.reconciler_events.clone(),
        );
        registry.register(
            "instance_limit_kills",
            "Instances stopped for running into a limit, by limit",
            m.limit_kills.clone(),
        );
        registry.register(
            "admission_waits",
            "Wakes held back by admission control (running or concurrent-wake limit), by reason",
            m.admission_waits.clone(),
        );
        registry.register(
            "max_running",
            "The fleet's limit on running instances (0: none)",
            m.max_running.clone(),
        );
        registry.register(
            "wakes_in_flight",
            "Wakes under way in this process",
            m.wakes_in_flight.clone(),
        );
        registry.register(
            "listener_connections_refused",
            "Connections closed at once because their listener held its most connections, by listener",
            m.listener_connections_refused.clone(),
        );
        registry.register(
            "egress_refused",
            "Calls the Bot API and model proxies refused or answered themselves, by proxy and reason",
            m.egress_refused.clone(),
        );
        registry.register(
            "bot_api_queued_seconds",
            "Time Bot API calls waited for their rate-limit slot",
            m.bot_api_queued_seconds.clone(),
        );
        registry.register(
            "model_tokens",
            "Model tokens used, as providers reported them",
            m.model_tokens.clone(),
        );
        Metrics {
            registry: std::sync::Mutex::new(registry),
            ..m
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoding metrics");
        out
    }

    /// Exports the registry's calls (`otm_registry_calls_total{op,outcome}`) and their latency
    /// (`otm_registry_call_seconds{op}`), as [`otm_store::Metered`] counts them.
    pub fn register_registry_calls(&self, calls: &otm_store::RegistryMetrics) {
        calls.register(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Records one wake phase.
    /// Counts one freeze attempt of an idle agent.
    pub fn freeze(&self, outcome: &str) {
        self.freezes
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn wake_phase(&self, path: &str, phase: &str, d: Duration) {
        self.wake_phase_seconds
            .get_or_create(&Phase {
                path: path.into(),
                phase: phase.into(),
            })
            .observe(d.as_secs_f64());
    }

    pub fn delivery(&self, outcome: DeliveryOutcome) {
        self.deliveries
            .get_or_create(&Outcome {
                outcome: outcome.as_str().into(),
            })
            .inc();
    }

    /// Counts one failed delivery attempt under its kind.
    pub fn delivery_failure(&self, kind: DeliveryFailure) {
        self.delivery_failures
            .get_or_create(&Kind {
                kind: kind.as_str().into(),
            })
            .inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.updates_rejected
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn reconciler(&self, kind: &str) {
        self.reconciler_events
            .get_or_create(&Kind { kind: kind.into() })
            .inc();
    }

    pub fn connection_refused(&self, listener: &str) {
        self.listener_connections_refused
            .get_or_create(&Listener {
                listener: listener.into(),
            })
            .inc();
    }

    pub fn egress_refused(&self, proxy: &str, reason: &str) {
        self.egress_refused
            .get_or_create(&Refusal {
                proxy: proxy.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn egress(&self, outcome: &str) {
        self.egress_requests
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// Records the time since its creation into a histogram when dropped.
#[derive(Debug)]
pub struct Timer<'a> {
    hist: &'a Histogram,
    start: Instant,
}

impl<'a> Timer<'a> {
    pub fn new(hist: &'a Histogram) -> Self {
        Timer {
            hist,
            start: Instant::now(),
        }
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed().as_secs_f64());
    }
}
