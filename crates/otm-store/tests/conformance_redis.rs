//! The coordinator conformance suite and multi-process checks against a real Redis, when
//! `OTM_TEST_REDIS_URL` names one (CI: `redis://127.0.0.1:6379`). Every test works under a fresh
//! random key prefix, so runs can share a Redis. Without the variable each test prints
//! "skipped: …" and passes.
#![cfg(feature = "redis")]

use futures::StreamExt;
use otm_core::{Coordinator, Error, Lease, Notification, TenantId};
use otm_store::{RedisCoordinator, conformance};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const URL_VAR: &str = "OTM_TEST_REDIS_URL";

fn redis_url(test: &str) -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            println!("skipped: {test}: set {URL_VAR} (say redis://127.0.0.1:6379) to run it");
            None
        }
    }
}

fn fresh_prefix() -> String {
    format!("otm-test-{}:", otm_core::id::random_hex(6))
}

/// One coordinator under `prefix`, as one `otm` process would hold it.
async fn process(url: &str, prefix: &str) -> Arc<RedisCoordinator> {
    Arc::new(
        RedisCoordinator::connect(url)
            .await
            .expect("connect to Redis")
            .with_prefix(prefix)
            .await
            .expect("set the key prefix"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_coordinator() {
    let Some(url) = redis_url("redis_coordinator") else {
        return;
    };
    let prefix = fresh_prefix();
    let c = process(&url, &prefix).await;
    conformance::coordinator_suite(c).await;
    cleanup(&url, &prefix).await;
}

/// Two processes, 20 tasks, one lock: never two holders at once, every acquisition's fence above
/// the one before, and both processes get their turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn two_processes_contend_for_one_lock() {
    let Some(url) = redis_url("two_processes_contend_for_one_lock") else {
        return;
    };
    let prefix = fresh_prefix();
    let procs = [process(&url, &prefix).await, process(&url, &prefix).await];
    const TASKS: usize = 20;
    const TURNS: usize = 5;
    let held = Arc::new(AtomicBool::new(false));
    let fences = Arc::new(Mutex::new(Vec::new()));
    let wins = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let c = procs[i % 2].clone();
            let (held, fences, wins) = (held.clone(), fences.clone(), wins.clone());
            tokio::spawn(async move {
                let mut turns = 0;
                while turns < TURNS {
                    let Some(lease) = c
                        .acquire("contended", Duration::from_secs(10))
                        .await
                        .expect("acquire")
                    else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    };
                    assert!(
                        !held.swap(true, Ordering::SeqCst),
                        "two holders at once (fence {})",
                        lease.fence
                    );
                    fences.lock().unwrap().push(lease.fence);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    // Cleared before the release: once released, the next holder may set it.
                    held.store(false, Ordering::SeqCst);
                    assert!(c.release(&lease).await.unwrap(), "the holder releases");
                    wins[i % 2].fetch_add(1, Ordering::Relaxed);
                    turns += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a contending task panicked");
    }
    let fences = fences.lock().unwrap().clone();
    assert_eq!(fences.len(), TASKS * TURNS);
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fences strictly increase in acquisition order: {fences:?}"
    );
    assert_eq!(wins[0].load(Ordering::Relaxed), TASKS / 2 * TURNS);
    assert_eq!(wins[1].load(Ordering::Relaxed), TASKS / 2 * TURNS);
    cleanup(&url, &prefix).await;
}

/// A lease its holder stops renewing lapses; another process takes it with a larger fence, and
/// the old holder can neither renew nor release it any more.
#[tokio::test]
async fn an_unrenewed_lease_lapses_to_another_process() {
    let Some(url) = redis_url("an_unrenewed_lease_lapses_to_another_process") else {
        return;
    };
    let prefix = fresh_prefix();
    let (a, b) = (process(&url, &prefix).await, process(&url, &prefix).await);
    let old = a
        .acquire("leader", Duration::from_millis(300))
        .await
        .unwrap()
        .expect("a free key can be taken");
    assert!(
        b.acquire("leader", Duration::from_secs(30))
            .await
            .unwrap()
            .is_none(),
        "held by the first process"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let new = b
        .acquire("leader", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the lapsed lease frees the key");
    assert!(new.fence > old.fence, "{} then {}", old.fence, new.fence);
    assert!(!a.renew(&old, Duration::from_secs(30)).await.unwrap());
    assert!(!a.release(&old).await.unwrap());
    // The owner token is what counts, not which process asks.
    assert!(a.renew(&new, Duration::from_secs(30)).await.unwrap());
    assert!(a.release(&new).await.unwrap());
    cleanup(&url, &prefix).await;
}

/// A notification published by one process reaches the other's subscribers and its own; a
/// dropped coordinator's subscriptions end.
#[tokio::test]
async fn notifications_cross_processes() {
    let Some(url) = redis_url("notifications_cross_processes") else {
        return;
    };
    let prefix = fresh_prefix();
    let (a, b) = (process(&url, &prefix).await, process(&url, &prefix).await);
    let mut at_a = a.subscribe();
    let mut at_b = b.subscribe();
    let n = Notification::InboxHasWork {
        tenant: TenantId::parse("alice").unwrap(),
    };
    a.publish(n.clone()).await.unwrap();
    for (who, s) in [
        ("the other process", &mut at_b),
        ("the publisher", &mut at_a),
    ] {
        let got = tokio::time::timeout(Duration::from_secs(2), s.next()).await;
        assert_eq!(got.ok().flatten().as_ref(), Some(&n), "{who} receives it");
    }
    drop(b);
    let end = tokio::time::timeout(Duration::from_secs(2), at_b.next()).await;
    assert_eq!(
        end.ok(),
        Some(None),
        "dropping a coordinator ends its subscriptions"
    );
}

/// Prefixes keep fleets apart: locks, cached endpoints and notifications.
#[tokio::test]
async fn prefixes_keep_fleets_apart() {
    let Some(url) = redis_url("prefixes_keep_fleets_apart") else {
        return;
    };
    let prefixes = [fresh_prefix(), fresh_prefix()];
    let (a, b) = (
        process(&url, &prefixes[0]).await,
        process(&url, &prefixes[1]).await,
    );
    let la = a.acquire("leader", Duration::from_secs(30)).await.unwrap();
    let lb = b.acquire("leader", Duration::from_secs(30)).await.unwrap();
    assert!(la.is_some() && lb.is_some(), "each fleet has its own lock");
    let t = TenantId::parse("alice").unwrap();
    let e = otm_core::instance::Endpoint {
        instance: otm_core::InstanceId::new("i-000000000001"),
        address: "unix:/x".into(),
        shim_token: otm_core::Secret::default(),
        signature: Some("0a1b2c".into()),
    };
    a.set_endpoint(&t, &e, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(b.endpoint(&t).await.unwrap(), None);
    let mut at_b = b.subscribe();
    a.publish(Notification::SettingsChanged).await.unwrap();
    b.publish(Notification::EndpointInvalidated { tenant: t.clone() })
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(2), at_b.next()).await;
    assert_eq!(
        first.ok().flatten(),
        Some(Notification::EndpointInvalidated { tenant: t }),
        "the other fleet's notification never arrives"
    );
    for p in &prefixes {
        cleanup(&url, p).await;
    }
}

/// A TCP proxy in front of Redis whose connections the test can cut.
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    refuse: Arc<AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(AtomicBool::new(false));
        let (c, r) = (conns.clone(), refuse.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                if r.load(Ordering::SeqCst) {
                    let _ = down.shutdown().await;
                    continue;
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            port,
            conns,
            refuse,
            accept,
        }
    }

    /// Drops every open connection, as a Redis restart or a network cut would.
    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `url` with its host and port replaced by `127.0.0.1:{port}`; also the original `host:port`.
fn through_proxy(url: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a redis:// URL");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:6379")
    };
    (
        format!("{scheme}://{userinfo}127.0.0.1:{{port}}{tail}"),
        hostport,
    )
}

/// Cut connections: calls fail as unavailable while Redis cannot be reached, then work again,
/// and a subscription taken before the cut receives notifications again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn survives_lost_connections() {
    let Some(url) = redis_url("survives_lost_connections") else {
        return;
    };
    let (template, upstream) = through_proxy(&url);
    let proxy = Proxy::start(upstream).await;
    let proxied = template.replace("{port}", &proxy.port.to_string());
    let prefix = fresh_prefix();
    let c = process(&proxied, &prefix).await;
    let direct = process(&url, &prefix).await;
    let mut s = c.subscribe();
    let t = TenantId::parse("bob").unwrap();

    proxy.refuse.store(true, Ordering::SeqCst);
    proxy.cut();
    let err = c
        .acquire("k", Duration::from_secs(30))
        .await
        .expect_err("Redis is out of reach");
    assert!(
        matches!(
            err,
            Error::Unavailable {
                backend: "redis",
                ..
            }
        ),
        "{err:?}"
    );
    // Published meanwhile by a process that still reaches Redis: lost, as the contract allows.
    direct.publish(Notification::SettingsChanged).await.unwrap();

    proxy.refuse.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let lease: Lease = loop {
        match c.acquire("k", Duration::from_secs(30)).await {
            Ok(Some(l)) => break l,
            Ok(None) => panic!("nobody else holds k"),
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("commands did not recover: {e}"),
        }
    };
    assert!(c.release(&lease).await.unwrap());

    // The subscription resumes once the listener has resubscribed.
    let want = Notification::InboxHasWork { tenant: t };
    let got = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            direct.publish(want.clone()).await.unwrap();
            if let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(200), s.next()).await
                && n == want
            {
                return n;
            }
        }
    })
    .await;
    assert!(got.is_ok(), "notifications did not resume after the cut");
    cleanup(&url, &prefix).await;
}

/// `publish` returns only once its notification is in the subscribers' queues: a subscription
/// taken right after never sees it, however fast it follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_after_publish_misses_it() {
    let Some(url) = redis_url("a_subscription_after_publish_misses_it") else {
        return;
    };
    let c = process(&url, &fresh_prefix()).await;
    for i in 0..200 {
        let t = TenantId::parse(&format!("t{i}")).unwrap();
        c.publish(Notification::InboxHasWork { tenant: t.clone() })
            .await
            .unwrap();
        let mut s = c.subscribe();
        let after = Notification::EndpointInvalidated { tenant: t };
        c.publish(after.clone()).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(2), s.next()).await;
        assert_eq!(first.ok().flatten(), Some(after), "round {i}");
    }
}

/// A raw connection for checks and cleanup behind the coordinator's back.
async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Deletes every key under `prefix` (fence counters never expire on their own).
async fn cleanup(url: &str, prefix: &str) {
    let mut r = raw(url).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut r)
        .await
        .unwrap();
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(&mut r)
            .await
            .unwrap();
    }
}

/// Fences follow the counter when it runs ahead of the clock, and stay above every earlier
/// fence when the counter is lost (a Redis restart without persistence, an eviction).
#[tokio::test]
async fn fences_survive_a_lost_counter() {
    let Some(url) = redis_url("fences_survive_a_lost_counter") else {
        return;
    };
    let prefix = fresh_prefix();
    let c = process(&url, &prefix).await;
    let mut r = raw(&url).await;
    let fence_key = format!("{prefix}otm:fence:{{k}}");
    let ttl = Duration::from_secs(30);

    let first = c.acquire("k", ttl).await.unwrap().unwrap();
    assert!(c.release(&first).await.unwrap());
    let stored: u64 = redis::cmd("GET")
        .arg(&fence_key)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(
        stored, first.fence,
        "the counter holds the last fence, exactly"
    );

    redis::cmd("DEL")
        .arg(&fence_key)
        .query_async::<()>(&mut r)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let after_loss = c.acquire("k", ttl).await.unwrap().unwrap();
    assert!(
        after_loss.fence > first.fence,
        "{} then {} after the counter was lost",
        first.fence,
        after_loss.fence
    );
    assert!(c.release(&after_loss).await.unwrap());

    let ahead: u64 = 1 << 52;
    redis::cmd("SET")
        .arg(&fence_key)
        .arg(ahead)
        .query_async::<()>(&mut r)
        .await
        .unwrap();
    let next = c.acquire("k", ttl).await.unwrap().unwrap();
    assert_eq!(
        next.fence,
        ahead + 1,
        "a counter ahead of the clock just counts on"
    );
    assert!(c.release(&next).await.unwrap());
    cleanup(&url, &prefix).await;
}

/// A cached endpoint that does not decode (say, from an incompatible version) is a miss, and
/// is dropped.
#[tokio::test]
async fn an_undecodable_endpoint_is_a_miss() {
    let Some(url) = redis_url("an_undecodable_endpoint_is_a_miss") else {
        return;
    };
    let prefix = fresh_prefix();
    let c = process(&url, &prefix).await;
    let mut r = raw(&url).await;
    let key = format!("{prefix}otm:endpoint:carol");
    redis::cmd("SET")
        .arg(&key)
        .arg("{\"instance\": 5}")
        .query_async::<()>(&mut r)
        .await
        .unwrap();
    let t = TenantId::parse("carol").unwrap();
    assert_eq!(c.endpoint(&t).await.unwrap(), None);
    let left: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(left, None, "the broken entry is gone");
    cleanup(&url, &prefix).await;
}

/// Redis delivers a `PUBLISH` to subscribers of every database; coordinators on different
/// database numbers still do not hear each other.
#[tokio::test]
async fn database_numbers_keep_notifications_apart() {
    let Some(url) = redis_url("database_numbers_keep_notifications_apart") else {
        return;
    };
    let base = url.trim_end_matches('/');
    if base
        .rsplit_once('/')
        .is_some_and(|(_, db)| db.parse::<u32>().is_ok())
    {
        println!("skipped: {URL_VAR} names a database already");
        return;
    }
    let prefix = fresh_prefix();
    let a = process(&format!("{base}/1"), &prefix).await;
    let b = process(&format!("{base}/2"), &prefix).await;
    let mut at_b = b.subscribe();
    a.publish(Notification::SettingsChanged).await.unwrap();
    let t = TenantId::parse("dave").unwrap();
    b.publish(Notification::EndpointInvalidated { tenant: t.clone() })
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(2), at_b.next()).await;
    assert_eq!(
        first.ok().flatten(),
        Some(Notification::EndpointInvalidated { tenant: t }),
        "database 1's notification does not reach database 2"
    );
}
