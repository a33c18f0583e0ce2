//! The conformance suite every [`Runtime`] must pass. It creates real instances running
//! `otm shim`, so the runtime under test must be configured with a working `otm` binary.

use futures::StreamExt;
use otm_core::{InstanceId, InstanceSpec, Runtime, RuntimeEvent, Secret, TenantId};
use std::sync::Arc;
use std::time::Duration;

/// Runs every check; panics on the first failure. `kill` must make an instance's process tree
/// exit the way a crash would (for the local runtime: SIGKILL to its process group).
pub async fn runtime_suite(rt: Arc<dyn Runtime>, kill: impl Fn(&InstanceId)) {
    let mut events = rt.events();

    // create: returns once the shim answers, with the token it was given.
    let tenant = TenantId::parse("conformance").unwrap();
    let spec = InstanceSpec {
        id: InstanceId::random(),
        shim_token: Secret::random(),
        tenant: Some(tenant.clone()),
        limits: Default::default(),
        profile: None,
    };
    let created = rt.create(&spec).await.expect("create");
    assert_eq!(created.id, spec.id);
    assert!(created.alive);
    assert_eq!(created.tenant.as_ref(), Some(&tenant));
    let shim = otm_shim::ShimClient::new(created.address.clone(), spec.shim_token.clone());
    let status = shim.status().await.expect("the shim answers at once");
    assert_eq!(status.instance, spec.id.as_str());
    assert_eq!(status.agent, "unbound");
    let wrong = otm_shim::ShimClient::new(created.address.clone(), Secret::random());
    assert!(
        wrong.status().await.is_err(),
        "the shim refuses another token"
    );

    // list: the instance is there, alive, with its tenant label; a warm one has none.
    let warm = InstanceSpec {
        id: InstanceId::random(),
        shim_token: Secret::random(),
        tenant: None,
        limits: Default::default(),
        profile: None,
    };
    rt.create(&warm).await.expect("create a warm instance");
    let listed = rt.list().await.expect("list");
    let a = listed.iter().find(|i| i.id == spec.id).expect("listed");
    assert!(a.alive);
    assert_eq!(a.address, created.address);
    let w = listed
        .iter()
        .find(|i| i.id == warm.id)
        .expect("warm listed");
    assert!(w.tenant.is_none());

    // delete: gone from the list, no event for it, and deleting again is fine.
    rt.delete(&warm.id).await.expect("delete");
    rt.delete(&warm.id)
        .await
        .expect("deleting what is gone is fine");
    rt.delete(&InstanceId::random())
        .await
        .expect("deleting what never was is fine");
    assert!(
        !rt.list()
            .await
            .unwrap()
            .iter()
            .any(|i| i.id == warm.id && i.alive)
    );

    // An instance that dies on its own is reported within about a second.
    kill(&spec.id);
    let event = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match events.next().await {
                Some(RuntimeEvent::Exited { id, .. }) if id == spec.id => return id,
                Some(_) => continue,
                None => panic!("the event stream ended"),
            }
        }
    })
    .await
    .expect("an exit event for the killed instance");
    assert_eq!(event, spec.id);
    assert!(shim.status().await.is_err());
    rt.delete(&spec.id).await.expect("delete after a crash");
    let deleted_quietly = tokio::time::timeout(Duration::from_millis(700), async {
        loop {
            if let Some(RuntimeEvent::Exited { id, .. }) = events.next().await
                && id == warm.id
            {
                return;
            }
        }
    })
    .await;
    assert!(
        deleted_quietly.is_err(),
        "a deleted instance is not reported as exited"
    );
}
