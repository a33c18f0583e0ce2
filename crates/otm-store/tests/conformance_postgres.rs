//! The registry conformance suite and multi-process checks against a real PostgreSQL, when
//! `OTM_TEST_POSTGRES_URL` names one (CI: `postgres://postgres@127.0.0.1:5432/test`). Every test
//! works in a fresh schema of its own, dropped at the end, so test binaries and CI jobs can share
//! one database: the suite's backend-wide steps (`inbox_prune`, fleet settings, warm instances)
//! see only their own run. Without the variable each test prints "skipped: …" and passes.
#![cfg(feature = "postgres")]

use futures::FutureExt;
use otm_core::{
    Appended, Error, Inbox, InstanceId, InstanceRecord, InstanceState, InstanceStore, Secret,
    Tenant, TenantId, TenantStore,
};
use otm_store::postgres::{MIGRATIONS, PostgresOptions};
use otm_store::{PostgresRegistry, conformance};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

const URL_VAR: &str = "OTM_TEST_POSTGRES_URL";

fn postgres_url(test: &str) -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_owned()),
        _ => {
            println!(
                "skipped: {URL_VAR} not set ({test}; CI sets postgres://postgres@127.0.0.1:5432/test)"
            );
            None
        }
    }
}

/// `url` with one more query parameter.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// A plain client for checks and set-up behind the registry's back.
async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
}

/// Runs `body` with a fresh schema name, then drops the schema, whether `body` passed or not.
async fn in_fresh_schema<F, Fut>(test: &str, body: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(url) = postgres_url(test) else {
        return;
    };
    let schema = format!("otm_test_{}", otm_core::id::random_hex(6));
    let outcome = AssertUnwindSafe(body(url.clone(), schema.clone()))
        .catch_unwind()
        .await;
    admin(&url)
        .await
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .expect("drop the test schema");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// One registry in `schema`, as one `otm` process would hold it.
async fn process(url: &str, schema: &str) -> Arc<PostgresRegistry> {
    Arc::new(
        PostgresRegistry::connect_with(url, PostgresOptions::default().with_schema(schema))
            .await
            .expect("connect the PostgreSQL registry"),
    )
}

fn tenant(id: &TenantId) -> Tenant {
    Tenant::new(id.clone(), "reference", Some(Secret::new("123:abc")))
}

fn warm_instance() -> InstanceRecord {
    InstanceRecord {
        id: InstanceId::random(),
        tenant: None,
        state: InstanceState::Warm,
        address: "http://10.0.0.9:7070".into(),
        shim_token: Secret::new(otm_core::id::random_hex(8)),
        surrogate_digest: None,
        created_at_ms: otm_core::time::now_ms(),
        bound_at_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_registry() {
    in_fresh_schema("postgres_registry", |url, schema| async move {
        conformance::registry_suite(process(&url, &schema).await).await;
    })
    .await;
}

/// 2,000 updates from 50 concurrent tasks through one registry: each stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn postgres_inbox_stress() {
    in_fresh_schema("postgres_inbox_stress", |url, schema| async move {
        conformance::inbox_stress(process(&url, &schema).await, 5, 50, 40).await;
    })
    .await;
}

/// Two processes append the same 2,000 updates at the same time (every update twice, once from
/// each): each is stored exactly once, with the payload of the append that was answered Stored,
/// and every task's updates hold growing sequence numbers in the order that task appended them.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn two_processes_append_the_same_updates_concurrently() {
    in_fresh_schema(
        "two_processes_append_the_same_updates_concurrently",
        |url, schema| async move {
            const TENANTS: usize = 4;
            const PAIRS: usize = 20;
            const PER_TASK: usize = 100;
            let procs = [process(&url, &schema).await, process(&url, &schema).await];
            let ids: Vec<TenantId> = (0..TENANTS)
                .map(|i| TenantId::parse(&format!("twin-{i}")).unwrap())
                .collect();
            for t in &ids {
                procs[0].create_tenant(&tenant(t)).await.unwrap();
            }
            let started = Instant::now();
            let mut handles = Vec::new();
            for pair in 0..PAIRS {
                for (side, r) in procs.iter().enumerate() {
                    let r = r.clone();
                    let t = ids[pair % TENANTS].clone();
                    handles.push(tokio::spawn(async move {
                        let mut answers = Vec::with_capacity(PER_TASK);
                        for i in 0..PER_TASK {
                            let u = (pair * PER_TASK + i) as i64;
                            let body = format!("{u} from process {side}").into_bytes();
                            let got = r.inbox_append(&t, u, &body).await.unwrap_or_else(|e| {
                                panic!("append {u} to {t} from process {side}: {e}")
                            });
                            answers.push((u, body, got));
                        }
                        (t, answers)
                    }));
                }
            }
            let mut stored: HashMap<(TenantId, i64), (i64, Vec<u8>)> = HashMap::new();
            let mut duplicates = 0;
            let mut orders: Vec<(TenantId, Vec<i64>)> = Vec::new();
            for h in handles {
                let (t, answers) = h.await.expect("an append task panicked");
                orders.push((t.clone(), answers.iter().map(|(u, _, _)| *u).collect()));
                for (u, body, got) in answers {
                    match got {
                        Appended::Stored { seq } => {
                            let before = stored.insert((t.clone(), u), (seq, body));
                            assert!(before.is_none(), "update {u} of {t} was stored twice");
                        }
                        Appended::Duplicate => duplicates += 1,
                    }
                }
            }
            let elapsed = started.elapsed();
            assert_eq!(stored.len(), PAIRS * PER_TASK, "every update stored once");
            assert_eq!(
                duplicates,
                PAIRS * PER_TASK,
                "every second append is a duplicate"
            );

            let mut seq_of: HashMap<(TenantId, i64), i64> = HashMap::new();
            for t in &ids {
                let r = &procs[1];
                let view = r.inbox_view(t, None, 10_000).await.unwrap();
                let want = PAIRS / TENANTS * PER_TASK;
                assert_eq!(
                    view.pending.len(),
                    want,
                    "{t} holds each of its updates once"
                );
                assert_eq!(r.inbox_depth(t).await.unwrap(), want as u64);
                assert!(view.pending.windows(2).all(|w| w[0].seq < w[1].seq));
                for item in view.pending {
                    let (seq, body) = &stored[&(t.clone(), item.update_id)];
                    assert_eq!(
                        (&item.seq, &item.payload),
                        (seq, body),
                        "update {} of {t} holds the seq and payload of the append that stored it",
                        item.update_id
                    );
                    seq_of.insert((t.clone(), item.update_id), item.seq);
                }
            }
            for (t, order) in orders {
                let seqs: Vec<i64> = order.iter().map(|u| seq_of[&(t.clone(), *u)]).collect();
                assert!(
                    seqs.windows(2).all(|w| w[0] < w[1]),
                    "updates appended one after another (by either process) keep their order in {t}"
                );
            }
            println!(
                "4,000 appends (2,000 stored, 2,000 duplicates) from 2 processes in {} ms",
                elapsed.as_millis()
            );
            for t in &ids {
                assert!(procs[0].delete_tenant(t).await.unwrap());
            }
        },
    )
    .await;
}

/// Two processes, 16 concurrent claimants, one warm instance: exactly one wins, and both
/// processes see the same winner. With three warm instances, three distinct winners.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn two_processes_claim_one_warm_instance() {
    in_fresh_schema(
        "two_processes_claim_one_warm_instance",
        |url, schema| async move {
            let procs = [process(&url, &schema).await, process(&url, &schema).await];
            for (round, warm_count) in [(0, 1), (1, 1), (2, 1), (3, 1), (4, 3)] {
                let warm: Vec<InstanceRecord> = (0..warm_count).map(|_| warm_instance()).collect();
                for w in &warm {
                    procs[round % 2].put_instance(w, None).await.unwrap();
                }
                let handles: Vec<_> = (0..16)
                    .map(|k| {
                        let r = procs[k % 2].clone();
                        let t = TenantId::parse(&format!("claim-{round}-{k}")).unwrap();
                        tokio::spawn(async move {
                            let got = r
                                .claim_warm_instance(&t)
                                .await
                                .expect("claim_warm_instance");
                            (t, got)
                        })
                    })
                    .collect();
                let mut winners = Vec::new();
                for h in handles {
                    if let (t, Some(rec)) = h.await.expect("a claim task panicked") {
                        winners.push((t, rec));
                    }
                }
                assert_eq!(
                    winners.len(),
                    warm_count,
                    "round {round}: {warm_count} warm instance(s), as many winners: {winners:?}"
                );
                let distinct: HashSet<_> = winners.iter().map(|(_, rec)| rec.id.clone()).collect();
                assert_eq!(distinct.len(), warm_count, "no instance is claimed twice");
                for (t, rec) in &winners {
                    assert_eq!(rec.tenant.as_ref(), Some(t));
                    assert_eq!(rec.state, InstanceState::Binding);
                    assert!(warm.iter().any(|w| w.id == rec.id));
                    for r in &procs {
                        assert_eq!(
                            r.instance_of(t).await.unwrap().as_ref(),
                            Some(rec),
                            "both processes see the same binding"
                        );
                    }
                }
                for r in &procs {
                    assert_eq!(
                        r.claim_warm_instance(&TenantId::parse("late").unwrap())
                            .await
                            .unwrap(),
                        None,
                        "round {round}: nothing warm is left"
                    );
                }
                for w in &warm {
                    assert!(procs[0].delete_instance(&w.id).await.unwrap());
                }
            }
        },
    )
    .await;
}

/// Four processes starting at once on a new schema migrate it once; a schema newer than this
/// build is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_apply_once() {
    in_fresh_schema(
        "concurrent_migrations_apply_once",
        |url, schema| async move {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (url, schema) = (url.clone(), schema.clone());
                    tokio::spawn(async move {
                        PostgresRegistry::connect_with(
                            &url,
                            PostgresOptions::default().with_schema(schema),
                        )
                        .await
                    })
                })
                .collect();
            for h in handles {
                let r = h.await.unwrap().expect("every process connects");
                assert!(r.list_tenants().await.unwrap().is_empty());
            }
            let db = admin(&url).await;
            let versions: Vec<i32> = db
                .query(
                    &format!("SELECT version FROM {schema}.otm_schema_version ORDER BY version"),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert_eq!(versions, (1..=MIGRATIONS.len() as i32).collect::<Vec<_>>());

            db.execute(
                &format!("INSERT INTO {schema}.otm_schema_version (version) VALUES (99)"),
                &[],
            )
            .await
            .unwrap();
            let err = PostgresRegistry::connect_with(
                &url,
                PostgresOptions::default().with_schema(&schema),
            )
            .await
            .unwrap_err()
            .to_string();
            assert!(err.contains("newer than this build"), "{err}");
        },
    )
    .await;
}

/// `?schema=` in the URL, as an operator configures it, is where the tables go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_url_can_name_the_schema() {
    in_fresh_schema("the_url_can_name_the_schema", |url, schema| async move {
        let r = otm_store::open_registry(&with_param(&url, &format!("schema={schema}")))
            .await
            .expect("open by URL");
        let t = TenantId::parse("by-url").unwrap();
        r.create_tenant(&tenant(&t)).await.unwrap();
        let n: i64 = admin(&url)
            .await
            .query_one(
                &format!("SELECT count(*) FROM {schema}.tenants WHERE id = 'by-url'"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    })
    .await;
}

/// The server drops every connection (a restart, a failover): the registry replaces them, and
/// the next calls succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaces_broken_connections() {
    in_fresh_schema("replaces_broken_connections", |url, schema| async move {
        let app = format!("otm-test-{}", otm_core::id::random_hex(4));
        let r = Arc::new(
            PostgresRegistry::connect_with(
                &with_param(&url, &format!("application_name={app}")),
                PostgresOptions::default().with_schema(&schema),
            )
            .await
            .unwrap(),
        );
        let t = TenantId::parse("survivor").unwrap();
        r.create_tenant(&tenant(&t)).await.unwrap();
        // Open several pooled connections.
        let reads: Vec<_> = (0..8)
            .map(|_| {
                let (r, t) = (r.clone(), t.clone());
                tokio::spawn(async move { r.get_tenant(&t).await })
            })
            .collect();
        for h in reads {
            assert!(h.await.unwrap().unwrap().is_some());
        }
        let db = admin(&url).await;
        let before: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        assert!(before >= 1, "the registry keeps its connections");

        // Pick the pids first: a filter beside pg_terminate_backend may run after it.
        let killed: Vec<i32> = db
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::INT[]) AS pid",
            &[&killed],
        )
        .await
        .unwrap();
        assert_eq!(
            killed.len() as i64,
            before,
            "every registry connection was dropped"
        );
        // A read right away: it may meet a dying connection, and is retried on a new one.
        assert!(
            r.get_tenant(&t)
                .await
                .expect("a read after the drop")
                .is_some()
        );

        // Once the old connections are gone, writes (never retried) go through new ones.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let alive: i64 = db
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                    &[&killed],
                )
                .await
                .unwrap()
                .get(0);
            if alive == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the dropped connections linger");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Give the client side a moment to read the server's goodbye.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for u in 0..20 {
            assert!(
                matches!(
                    r.inbox_append(&t, u, b"{}")
                        .await
                        .expect("a write after the drop"),
                    Appended::Stored { .. }
                ),
                "update {u} is new"
            );
        }
        assert_eq!(r.inbox_depth(&t).await.unwrap(), 20);
    })
    .await;
}

/// A call stuck behind a lock gives up at the registry's timeout with `Unavailable`, its
/// statement is cancelled on the server, and the registry keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_call_times_out_and_is_cancelled() {
    in_fresh_schema("a_stuck_call_times_out_and_is_cancelled", |url, schema| async move {
        let app = format!("otm-test-{}", otm_core::id::random_hex(4));
        let r = PostgresRegistry::connect_with(
            &with_param(&url, &format!("application_name={app}")),
            PostgresOptions::default()
                .with_schema(&schema)
                .with_timeout(Duration::from_millis(500)),
        )
        .await
        .unwrap();
        let t = TenantId::parse("locked").unwrap();
        r.create_tenant(&tenant(&t)).await.unwrap();

        let mut db = admin(&url).await;
        let tx = db.transaction().await.unwrap();
        tx.execute(&format!("SELECT 1 FROM {schema}.tenants WHERE id = 'locked' FOR UPDATE"), &[])
            .await
            .unwrap();
        let started = Instant::now();
        let err = r.touch_tenant(&t, 5_000).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable { backend: "postgres", .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "gave up at the timeout");

        // The abandoned statement is cancelled, not left waiting for the lock.
        let admin2 = admin(&url).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let waiting: i64 = admin2
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'",
                    &[&app],
                )
                .await
                .unwrap()
                .get(0);
            if waiting == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the stuck statement was not cancelled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tx.rollback().await.unwrap();
        r.touch_tenant(&t, 6_000).await.expect("works again");
        assert_eq!(r.get_tenant(&t).await.unwrap().unwrap().last_active_ms, 6_000);
    })
    .await;
}

/// No server needed: an unreachable database is `Unavailable`, and the password in the URL shows
/// up nowhere.
#[tokio::test]
async fn unreachable_database_is_unavailable_without_leaking_the_password() {
    // Port 1 on the loopback address refuses connections at once.
    let url = "postgres://otm:hunter2@127.0.0.1:1/otm";
    let err = PostgresRegistry::connect(url).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                backend: "postgres",
                ..
            }
        ),
        "{err:?}"
    );
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("cannot connect to PostgreSQL"), "{shown}");
}

/// Appends to one tenant commit in sequence order: a dispatcher draining the inbox while 16
/// tasks in two processes append never sees a lower sequence number turn up after it delivered a
/// higher one. A trigger holds every 20th insert for 20 ms between taking its sequence number and
/// committing, so an append that let others commit past it would be caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn a_draining_dispatcher_sees_sequence_numbers_only_grow() {
    in_fresh_schema(
        "a_draining_dispatcher_sees_sequence_numbers_only_grow",
        |url, schema| async move {
            const TASKS: usize = 16;
            const PER_TASK: usize = 50;
            let procs = [process(&url, &schema).await, process(&url, &schema).await];
            let t = TenantId::parse("drained").unwrap();
            procs[0].create_tenant(&tenant(&t)).await.unwrap();
            admin(&url)
                .await
                .batch_execute(&format!(
                    "CREATE FUNCTION {schema}.slow_append() RETURNS trigger LANGUAGE plpgsql AS $$ \
                     BEGIN IF NEW.update_id % 20 = 0 THEN PERFORM pg_sleep(0.02); END IF; RETURN NEW; END $$; \
                     CREATE TRIGGER slow_append AFTER INSERT ON {schema}.inbox \
                     FOR EACH ROW EXECUTE FUNCTION {schema}.slow_append();"
                ))
                .await
                .unwrap();
            let appenders: Vec<_> = (0..TASKS)
                .map(|k| {
                    let (r, t) = (procs[k % 2].clone(), t.clone());
                    tokio::spawn(async move {
                        for i in 0..PER_TASK {
                            let u = (k * PER_TASK + i) as i64;
                            r.inbox_append(&t, u, b"{}").await.unwrap();
                        }
                    })
                })
                .collect();
            let dispatcher = procs[1].clone();
            let mut last = 0;
            let mut delivered = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while delivered < TASKS * PER_TASK {
                assert!(Instant::now() < deadline, "delivered only {delivered}");
                let Some(item) = dispatcher.inbox_next(&t).await.unwrap() else {
                    tokio::task::yield_now().await;
                    continue;
                };
                assert!(
                    item.seq > last,
                    "update {} (seq {}) turned up after seq {last} was delivered",
                    item.update_id,
                    item.seq
                );
                dispatcher.inbox_ack(&t, item.seq, None).await.unwrap();
                last = item.seq;
                delivered += 1;
            }
            for a in appenders {
                a.await.unwrap();
            }
            assert_eq!(dispatcher.inbox_next(&t).await.unwrap(), None);
        },
    )
    .await;
}

/// `sslmode=require` (and the verifying modes) never fall back to a plaintext connection: a
/// server without TLS is refused with a message that says so.
#[tokio::test]
async fn tls_modes_refuse_a_server_without_tls() {
    let Some(url) = postgres_url("tls_modes_refuse_a_server_without_tls") else {
        return;
    };
    let plain = otm_store::PostgresRegistry::connect(&with_param(&url, "sslmode=disable")).await;
    assert!(plain.is_ok(), "{:?}", plain.err());
    let prefer = otm_store::PostgresRegistry::connect(&with_param(&url, "sslmode=prefer")).await;
    assert!(prefer.is_ok(), "{:?}", prefer.err());
    for mode in ["require", "verify-ca", "verify-full"] {
        let result =
            otm_store::PostgresRegistry::connect(&with_param(&url, &format!("sslmode={mode}")))
                .await;
        match result {
            Ok(_) => eprintln!("the test server speaks TLS; sslmode={mode} connected"),
            Err(e) => {
                assert!(
                    matches!(e, otm_core::Error::Unavailable { .. }),
                    "{mode}: {e:?}"
                );
                assert!(e.to_string().contains("TLS"), "{mode}: {e}");
            }
        }
    }
    let err = otm_store::PostgresRegistry::connect(&with_param(&url, "sslmode=sometimes"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, otm_core::Error::InvalidInput { .. }),
        "{err:?}"
    );
}
