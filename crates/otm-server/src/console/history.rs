//! The fleet's figures over the last hour, for the console's charts: the server samples its own
//! metrics every [`SAMPLE_EVERY`] and keeps the last [`POINTS`] samples in memory.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// How often the history takes a sample.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Samples kept: one hour at [`SAMPLE_EVERY`].
pub const POINTS: usize = 360;

/// One sample: rates and means over the interval that ended at `at_ms`, gauges at `at_ms`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub at_ms: i64,
    /// Updates accepted a second.
    pub accepts_per_s: f64,
    /// Mean wake latency in milliseconds by path (`cache`, `warm`, `cold`), for the paths that
    /// had wakes in the interval.
    pub wake_ms: BTreeMap<String, f64>,
    /// Mean wake phase latency in milliseconds by `path/phase`, where the interval had any.
    pub phase_ms: BTreeMap<String, f64>,
    /// Instances by state (`warm`, `binding`, `ready`, `stopping`).
    pub instances: BTreeMap<String, f64>,
}

/// The cumulative counters one sample is computed from.
#[derive(Clone, Debug, Default)]
struct Totals {
    accepted: f64,
    /// `(sum seconds, count)` by path.
    wakes: BTreeMap<String, (f64, f64)>,
    /// `(sum seconds, count)` by `path/phase`.
    phases: BTreeMap<String, (f64, f64)>,
    instances: BTreeMap<String, f64>,
}

/// The bounded history: at most [`POINTS`] samples, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    last: Option<(i64, Totals)>,
}

impl History {
    /// Takes a sample from the metrics' text exposition at wall time `now_ms`. The first call
    /// only sets the baseline.
    pub fn record(&mut self, exposition: &str, now_ms: i64) {
        let totals = totals(exposition);
        if let Some((then, before)) = &self.last {
            let secs = ((now_ms - then) as f64 / 1000.0).max(0.001);
            let mean = |now: &BTreeMap<String, (f64, f64)>,
                        before: &BTreeMap<String, (f64, f64)>| {
                now.iter()
                    .filter_map(|(k, (sum, count))| {
                        let (s0, c0) = before.get(k).copied().unwrap_or_default();
                        let n = count - c0;
                        (n > 0.0).then(|| (k.clone(), (sum - s0) / n * 1000.0))
                    })
                    .collect()
            };
            let sample = Sample {
                at_ms: now_ms,
                accepts_per_s: ((totals.accepted - before.accepted) / secs).max(0.0),
                wake_ms: mean(&totals.wakes, &before.wakes),
                phase_ms: mean(&totals.phases, &before.phases),
                instances: totals.instances.clone(),
            };
            if self.samples.len() == POINTS {
                self.samples.pop_front();
            }
            self.samples.push_back(sample);
        }
        self.last = Some((now_ms, totals));
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// A metric's labels, `(name, value)`.
type Labels<'a> = Vec<(&'a str, &'a str)>;

/// One line of the text exposition: name, labels, value.
fn parse_line(line: &str) -> Option<(&str, Labels<'_>, f64)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((name, rest)) => {
            let rest = rest.strip_suffix('}')?;
            let labels = rest
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.trim(), v.trim().trim_matches('"')))
                })
                .collect();
            (name, labels)
        }
        None => (head, Vec::new()),
    };
    Some((name.trim(), labels, value))
}

fn totals(exposition: &str) -> Totals {
    let mut t = Totals::default();
    for (name, labels, value) in exposition.lines().filter_map(parse_line) {
        let label = |k: &str| labels.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        match name {
            "otm_updates_accepted_total" => t.accepted = value,
            "otm_wake_seconds_sum" | "otm_wake_seconds_count" => {
                let e = t
                    .wakes
                    .entry(label("path").unwrap_or("").to_owned())
                    .or_default();
                if name.ends_with("_sum") {
                    e.0 = value
                } else {
                    e.1 = value
                }
            }
            "otm_wake_phase_seconds_sum" | "otm_wake_phase_seconds_count" => {
                let key = format!(
                    "{}/{}",
                    label("path").unwrap_or(""),
                    label("phase").unwrap_or("")
                );
                let e = t.phases.entry(key).or_default();
                if name.ends_with("_sum") {
                    e.0 = value
                } else {
                    e.1 = value
                }
            }
            "otm_instances" => {
                t.instances
                    .insert(label("state").unwrap_or("").to_owned(), value);
            }
            _ => {}
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(accepted: u64, cold_sum: f64, cold_count: u64, ready: u64) -> String {
        format!(
            "# HELP otm_updates_accepted Updates\n\
             otm_updates_accepted_total {accepted}\n\
             otm_wake_seconds_sum{{path=\"cold\"}} {cold_sum}\n\
             otm_wake_seconds_count{{path=\"cold\"}} {cold_count}\n\
             otm_wake_phase_seconds_sum{{path=\"cold\",phase=\"start\"}} {cold_sum}\n\
             otm_wake_phase_seconds_count{{path=\"cold\",phase=\"start\"}} {cold_count}\n\
             otm_instances{{state=\"ready\"}} {ready}\n"
        )
    }

    #[test]
    fn rates_and_means_come_from_the_differences_between_samples() {
        let mut h = History::default();
        h.record(&exposition(10, 1.0, 2, 1), 0);
        assert!(h.is_empty(), "the first call is the baseline");
        h.record(&exposition(30, 1.6, 3, 2), 10_000);
        let s = h.samples().next().unwrap();
        assert_eq!(s.accepts_per_s, 2.0);
        assert!((s.wake_ms["cold"] - 600.0).abs() < 1e-6, "{s:?}");
        assert!((s.phase_ms["cold/start"] - 600.0).abs() < 1e-6, "{s:?}");
        assert_eq!(s.instances["ready"], 2.0);
        // No wake in the next interval: no latency point, not a zero.
        h.record(&exposition(30, 1.6, 3, 2), 20_000);
        let s = h.samples().nth(1).unwrap();
        assert!(s.wake_ms.is_empty() && s.accepts_per_s == 0.0, "{s:?}");
    }

    #[test]
    fn the_history_keeps_one_hour() {
        let mut h = History::default();
        // A baseline and 409 samples: the first 49 are gone.
        for i in 0..(POINTS as i64 + 50) {
            h.record(&exposition(i as u64, 0.0, 0, 0), i * 10_000);
        }
        assert_eq!(h.len(), POINTS);
        assert_eq!(
            h.samples().next().unwrap().at_ms,
            50 * 10_000,
            "the oldest went first"
        );
    }
}
