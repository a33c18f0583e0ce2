//! The desired pod and secret of one instance: pure functions of the instance spec and the
//! runtime's settings, so every field that matters for isolation is checked by unit tests.

use super::KubeRuntimeConfig;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, Probe, ResourceRequirements,
    SeccompProfile, Secret, SecretKeySelector, SecurityContext, TCPSocketAction, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use otm_core::{InstanceId, InstanceSpec, ResourceLimits, TenantId};
use std::collections::BTreeMap;

/// Set on every object otm manages, with [`ROLE_LABEL`]: NetworkPolicies select tenant pods by
/// these two.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const ROLE_LABEL: &str = "otm.dev/role";
pub const INSTANCE_LABEL: &str = "otm.dev/instance";
pub const TENANT_LABEL: &str = "otm.dev/tenant";
pub const WARM_LABEL: &str = "otm.dev/warm";
/// Karpenter leaves a node alone while a pod on it carries this (annotation in Karpenter v1; the
/// label is kept too for selectors). Only bound pods carry it: a node holding warm pods only may
/// be consolidated.
pub const DO_NOT_DISRUPT: &str = "karpenter.sh/do-not-disrupt";
/// The label selector of every instance pod.
pub const SELECTOR: &str = "app.kubernetes.io/managed-by=otm,otm.dev/role=instance";

/// PriorityClass of bound instances.
pub const PRIORITY_BOUND: &str = "otm-tenant";
/// PriorityClass of warm instances (lower, never preempts).
pub const PRIORITY_WARM: &str = "otm-warm";

/// The shim's working directory; the instance's directory (an emptyDir) is `instance` in it.
pub const WORK_DIR: &str = "/var/lib/otm";
/// Where the instance's state and temporary files live in the pod (an emptyDir).
pub const INSTANCE_DIR: &str = "/var/lib/otm/instance";
const TMP_DIR: &str = "/tmp";
/// The variable the shim reads its token from.
pub const TOKEN_ENV: &str = "OTM_SHIM_TOKEN";
const TOKEN_KEY: &str = "token";
/// The uid and gid the images run as.
pub const RUN_AS: i64 = 65532;
const TMP_LIMIT: &str = "256Mi";
/// Memory requested for an instance, or its limit when smaller (the original requests 1 GiB).
const MEMORY_REQUEST: u64 = 1 << 30;

/// The pod's (and its secret's) name.
pub fn pod_name(id: &InstanceId) -> String {
    format!("otm-{id}")
}

/// The instance id of a pod, from its label, checked.
pub fn instance_of(pod: &Pod) -> Option<InstanceId> {
    let id = pod.metadata.labels.as_ref()?.get(INSTANCE_LABEL)?;
    InstanceId::parse(id).ok()
}

/// The tenant label of a pod, if bound.
pub fn tenant_of(pod: &Pod) -> Option<TenantId> {
    let t = pod.metadata.labels.as_ref()?.get(TENANT_LABEL)?;
    TenantId::parse(t).ok()
}

fn labels(id: &InstanceId, tenant: Option<&TenantId>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (MANAGED_BY.to_owned(), "otm".to_owned()),
        (ROLE_LABEL.to_owned(), "instance".to_owned()),
        (INSTANCE_LABEL.to_owned(), id.to_string()),
        (WARM_LABEL.to_owned(), tenant.is_none().to_string()),
    ]);
    if let Some(t) = tenant {
        l.insert(TENANT_LABEL.to_owned(), t.to_string());
        l.insert(DO_NOT_DISRUPT.to_owned(), "true".to_owned());
    }
    l
}

/// The labels and annotations a claim sets on a warm pod, as a merge patch body without the
/// precondition.
pub fn claim_patch(tenant: &TenantId, resource_version: &str) -> serde_json::Value {
    serde_json::json!({
        "metadata": {
            "resourceVersion": resource_version,
            "labels": {
                WARM_LABEL: "false",
                TENANT_LABEL: tenant.as_str(),
                DO_NOT_DISRUPT: "true",
            },
            "annotations": { DO_NOT_DISRUPT: "true" },
        }
    })
}

/// Whether a pod may be claimed: a warm, live pod not being deleted.
pub fn claimable(pod: &Pod) -> bool {
    let warm = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(WARM_LABEL))
        .is_some_and(|v| v == "true");
    warm && pod.metadata.deletion_timestamp.is_none() && phase(pod) == "Running"
}

/// The pod's phase, or `Pending` when it has none yet.
pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// True when the pod's Ready condition is true.
pub fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why a pod is no longer running, if it is not: its phase, a terminated container, or a
/// container that cannot start.
pub fn ended(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref();
    let p = phase(pod);
    if p == "Failed" || p == "Succeeded" {
        let reason = status.and_then(|s| s.reason.clone());
        let code = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code);
        return Some(match (reason, code) {
            (Some(r), _) => format!("pod {p}: {r}"),
            (None, Some(c)) => format!("pod {p}: exit code {c}"),
            (None, None) => format!("pod {p}"),
        });
    }
    for c in status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
    {
        if let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            return Some(format!(
                "container {} terminated: exit code {}{}",
                c.name,
                t.exit_code,
                t.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
        }
        if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref())
            && let Some(r) = w.reason.as_deref()
            && matches!(
                r,
                "ErrImagePull"
                    | "ImagePullBackOff"
                    | "InvalidImageName"
                    | "CreateContainerConfigError"
                    | "CreateContainerError"
                    | "CrashLoopBackOff"
            )
        {
            return Some(format!("container {} cannot start: {r}", c.name));
        }
    }
    None
}

fn cpu(millis: u32) -> Quantity {
    Quantity(format!("{millis}m"))
}

fn bytes(b: u64) -> Quantity {
    Quantity(b.to_string())
}

/// Requests and limits from an instance's limits: CPU request and limit, memory request (1 GiB or
/// the limit when smaller) and limit, ephemeral storage limited to the state directory's cap plus
/// the temporary directory's.
pub fn resources(limits: &ResourceLimits) -> ResourceRequirements {
    let mem_request = limits.memory_bytes.min(MEMORY_REQUEST);
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            (
                "cpu".to_owned(),
                cpu(limits.cpu_request_millis.min(limits.cpu_millis)),
            ),
            ("memory".to_owned(), bytes(mem_request)),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_owned(), cpu(limits.cpu_millis)),
            ("memory".to_owned(), bytes(limits.memory_bytes)),
            (
                "ephemeral-storage".to_owned(),
                bytes(limits.disk_bytes + (256 << 20)),
            ),
        ])),
        ..Default::default()
    }
}

/// The part of requests and limits an in-place resize may change: CPU and memory.
pub fn resizable(r: &ResourceRequirements) -> ResourceRequirements {
    let keep = |m: &Option<BTreeMap<String, Quantity>>| {
        m.as_ref().map(|m| {
            m.iter()
                .filter(|(k, _)| *k == "cpu" || *k == "memory")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        })
    };
    ResourceRequirements {
        requests: keep(&r.requests),
        limits: keep(&r.limits),
        ..Default::default()
    }
}

/// The ephemeral-storage limit, which no resize changes.
pub fn storage(r: &ResourceRequirements) -> Option<&Quantity> {
    r.limits.as_ref()?.get("ephemeral-storage")
}

/// The image for a profile: OpenClaw's own image where one is set, the otm image otherwise (a
/// warm pod, whose profile is not known yet, gets the OpenClaw image when there is one, since it
/// also runs the reference agent).
pub fn image_for<'a>(cfg: &'a KubeRuntimeConfig, profile: Option<&str>) -> &'a str {
    match (profile, cfg.openclaw_image.as_deref()) {
        (Some("openclaw") | None, Some(img)) => img,
        _ => &cfg.image,
    }
}

/// The shim's own settings in its environment ([`otm_shim::cli::SHIM_ENV`]).
fn shim_env() -> impl Iterator<Item = EnvVar> {
    otm_shim::cli::SHIM_ENV.iter().map(|(k, v)| EnvVar {
        name: (*k).to_owned(),
        value: Some((*v).to_owned()),
        ..Default::default()
    })
}

/// The pod of an instance.
pub fn pod(cfg: &KubeRuntimeConfig, spec: &InstanceSpec) -> Pod {
    let name = pod_name(&spec.id);
    let bound = spec.tenant.is_some();
    let mut annotations = BTreeMap::new();
    if bound {
        annotations.insert(DO_NOT_DISRUPT.to_owned(), "true".to_owned());
    }
    let port = i32::from(cfg.shim_port);
    let mut args = vec![
        "shim".to_owned(),
        "--instance".to_owned(),
        spec.id.to_string(),
        // Relative to the working directory, where the instance's emptyDir is mounted.
        "--dir".to_owned(),
        "instance".to_owned(),
        // The pod's own address, put in by the kubelet from the downward API.
        "--listen".to_owned(),
        format!("tcp:$(POD_IP):{port}"),
        "--token-env".to_owned(),
        TOKEN_ENV.to_owned(),
        // An evicted pod's shim serves on for the final snapshot, within the pod's grace.
        "--term-grace-s".to_owned(),
        (cfg.termination_grace_s - 10).max(1).to_string(),
    ];
    args.extend(cfg.shim_args.iter().cloned());
    let mut container = Container {
        name: "shim".to_owned(),
        image: Some(image_for(cfg, spec.profile.as_deref()).to_owned()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        working_dir: Some(WORK_DIR.to_owned()),
        args: Some(args),
        env: Some(vec![
            EnvVar {
                name: TOKEN_ENV.to_owned(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: name.clone(),
                        key: TOKEN_KEY.to_owned(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            EnvVar {
                name: "POD_IP".to_owned(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "status.podIP".to_owned(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            EnvVar {
                name: "TMPDIR".to_owned(),
                value: Some(TMP_DIR.to_owned()),
                ..Default::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("shim".to_owned()),
            container_port: port,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(port),
                ..Default::default()
            }),
            period_seconds: Some(1),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: Some(resources(&spec.limits)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "instance".to_owned(),
                mount_path: INSTANCE_DIR.to_owned(),
                ..Default::default()
            },
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: TMP_DIR.to_owned(),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    container.env.get_or_insert_default().extend(shim_env());
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(labels(&spec.id, spec.tenant.as_ref())),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            runtime_class_name: cfg.runtime_class.clone(),
            priority_class_name: cfg
                .priority_classes
                .then(|| if bound { PRIORITY_BOUND } else { PRIORITY_WARM }.to_owned()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            // The pause process is process 1 and reaps what the agent leaves behind.
            share_process_namespace: Some(true),
            restart_policy: Some("Never".to_owned()),
            // Long enough for a final snapshot through the shim after an eviction begins.
            termination_grace_period_seconds: Some(cfg.termination_grace_s),
            node_selector: (!cfg.node_selector.is_empty()).then(|| cfg.node_selector.clone()),
            tolerations: (!cfg.tolerations.is_empty()).then(|| cfg.tolerations.clone()),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers: vec![container],
            volumes: Some(vec![
                Volume {
                    name: "instance".to_owned(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        size_limit: Some(bytes(spec.limits.disk_bytes)),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "tmp".to_owned(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        size_limit: Some(Quantity(TMP_LIMIT.to_owned())),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The secret holding an instance's shim token, owned by its pod when `owner` (the pod's uid) is
/// known, so that it goes with the pod.
pub fn secret(
    cfg: &KubeRuntimeConfig,
    id: &InstanceId,
    token: &otm_core::Secret,
    owner: Option<&str>,
) -> Secret {
    let name = pod_name(id);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.to_owned(), "otm".to_owned()),
                (INSTANCE_LABEL.to_owned(), id.to_string()),
            ])),
            owner_references: owner.map(|uid| vec![owner_ref(&name, uid)]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_owned(),
            ByteString(token.expose().as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    }
}

/// An owner reference to the pod `name` with `uid`.
pub fn owner_ref(name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Pod".to_owned(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        block_owner_deletion: Some(true),
        controller: Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use otm_core::Secret as Token;

    fn cfg() -> KubeRuntimeConfig {
        KubeRuntimeConfig {
            namespace: "tenants".into(),
            image: "localhost/otm:1".into(),
            openclaw_image: Some("localhost/otm-openclaw:1".into()),
            ..KubeRuntimeConfig::default()
        }
    }

    fn spec(tenant: Option<&str>) -> InstanceSpec {
        InstanceSpec {
            id: InstanceId::parse("i-0123456789ab").unwrap(),
            shim_token: Token::new("t0k3n"),
            tenant: tenant.map(|t| TenantId::parse(t).unwrap()),
            limits: ResourceLimits::default(),
            profile: tenant.map(|_| "reference".into()),
        }
    }

    #[test]
    fn a_bound_pod_is_locked_down_and_labelled() {
        let p = pod(&cfg(), &spec(Some("alice")));
        let meta = &p.metadata;
        assert_eq!(meta.name.as_deref(), Some("otm-i-0123456789ab"));
        let l = meta.labels.as_ref().unwrap();
        assert_eq!(l[MANAGED_BY], "otm");
        assert_eq!(l[ROLE_LABEL], "instance");
        assert_eq!(l[INSTANCE_LABEL], "i-0123456789ab");
        assert_eq!(l[TENANT_LABEL], "alice");
        assert_eq!(l[WARM_LABEL], "false");
        assert_eq!(meta.annotations.as_ref().unwrap()[DO_NOT_DISRUPT], "true");

        let s = p.spec.as_ref().unwrap();
        assert_eq!(s.runtime_class_name.as_deref(), Some("kata-qemu"));
        assert_eq!(s.priority_class_name.as_deref(), Some(PRIORITY_BOUND));
        assert_eq!(s.automount_service_account_token, Some(false));
        assert_eq!(s.restart_policy.as_deref(), Some("Never"));
        let psc = s.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let c = &s.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert_eq!(c.image.as_deref(), Some("localhost/otm:1"));

        // Requests and limits as the original's defaults.
        let r = c.resources.as_ref().unwrap();
        assert_eq!(r.requests.as_ref().unwrap()["cpu"].0, "200m");
        assert_eq!(
            r.requests.as_ref().unwrap()["memory"].0,
            (1u64 << 30).to_string()
        );
        assert_eq!(r.limits.as_ref().unwrap()["cpu"].0, "1000m");
        assert_eq!(
            r.limits.as_ref().unwrap()["memory"].0,
            (2u64 << 30).to_string()
        );

        // The token comes from the instance's secret, never from the pod spec itself.
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("t0k3n"));
        let env = c.env.as_ref().unwrap();
        let tok = env.iter().find(|e| e.name == TOKEN_ENV).unwrap();
        assert_eq!(
            tok.value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "otm-i-0123456789ab"
        );
        // Every writable place is an emptyDir with a size limit.
        for v in s.volumes.as_ref().unwrap() {
            assert!(v.empty_dir.as_ref().unwrap().size_limit.is_some(), "{v:?}");
        }
        // No bot token, model key or storage credential: no env but these five.
        let names: Vec<_> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                TOKEN_ENV,
                "POD_IP",
                "TMPDIR",
                "MALLOC_ARENA_MAX",
                "MALLOC_MMAP_THRESHOLD_"
            ]
        );
    }

    #[test]
    fn a_warm_pod_has_no_tenant_and_may_be_consolidated() {
        let p = pod(&cfg(), &spec(None));
        let l = p.metadata.labels.as_ref().unwrap();
        assert_eq!(l[WARM_LABEL], "true");
        assert!(!l.contains_key(TENANT_LABEL));
        assert!(!l.contains_key(DO_NOT_DISRUPT));
        assert!(p.metadata.annotations.is_none());
        let s = p.spec.as_ref().unwrap();
        assert_eq!(s.priority_class_name.as_deref(), Some(PRIORITY_WARM));
        // A warm pod may serve either profile: OpenClaw's image runs both.
        assert_eq!(
            s.containers[0].image.as_deref(),
            Some("localhost/otm-openclaw:1")
        );
    }

    #[test]
    fn an_empty_runtime_class_means_the_cluster_default() {
        let mut c = cfg();
        c.runtime_class = None;
        let p = pod(&c, &spec(Some("bob")));
        assert!(p.spec.unwrap().runtime_class_name.is_none());
    }

    #[test]
    fn the_secret_is_owned_by_the_pod() {
        let s = secret(
            &cfg(),
            &InstanceId::parse("i-0123456789ab").unwrap(),
            &Token::new("t0k3n"),
            Some("uid-1"),
        );
        let o = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((o.kind.as_str(), o.uid.as_str()), ("Pod", "uid-1"));
        assert_eq!(s.data.unwrap()["token"].0, b"t0k3n");
    }

    #[test]
    fn only_a_running_warm_pod_is_claimable() {
        let mut p = pod(&cfg(), &spec(None));
        assert!(!claimable(&p), "pending");
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        });
        assert!(claimable(&p));
        let bound = {
            let mut b = pod(&cfg(), &spec(Some("alice")));
            b.status = p.status.clone();
            b
        };
        assert!(!claimable(&bound));
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Default::default(),
        ));
        assert!(!claimable(&p), "being deleted");
    }

    #[test]
    fn a_resize_changes_cpu_and_memory_only() {
        let small = ResourceLimits::default();
        let big = ResourceLimits {
            memory_bytes: 3 << 30,
            cpu_millis: 1500,
            ..small
        };
        let (a, b) = (resources(&small), resources(&big));
        assert_ne!(resizable(&a), resizable(&b));
        assert_eq!(storage(&a), storage(&b));
        let r = resizable(&b);
        assert_eq!(
            r.limits.as_ref().unwrap().keys().collect::<Vec<_>>(),
            ["cpu", "memory"]
        );
        assert_eq!(r.limits.as_ref().unwrap()["cpu"].0, "1500m");
        let disk = ResourceLimits {
            disk_bytes: 4 << 30,
            ..small
        };
        assert_ne!(storage(&a), storage(&resources(&disk)));
    }

    #[test]
    fn ended_names_the_reason() {
        let mut p = pod(&cfg(), &spec(Some("alice")));
        assert_eq!(ended(&p), None);
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Failed".into()),
            reason: Some("Evicted".into()),
            ..Default::default()
        });
        assert_eq!(ended(&p).as_deref(), Some("pod Failed: Evicted"));
    }
}
