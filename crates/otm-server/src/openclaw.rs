//! The server's side of the `openclaw` agent profile: where OpenClaw is installed, which
//! directories the sandbox must show for it, and the settings a tenant's instance is bound with.

use crate::config::Settings;
use otm_core::{Error, Result, Tenant};
use otm_shim::profile::openclaw::keys;
use std::collections::BTreeMap;
use std::path::Path;

/// The profile name.
pub const PROFILE: &str = "openclaw";

/// What the API key the instance sends is: a placeholder, since the egress route adds the real
/// one.
pub const INSTANCE_API_KEY: &str = "otm-egress-adds-the-key";

pub use crate::openclaw_install::Install;

/// Finds OpenClaw for these settings (see [`crate::openclaw_install::locate`]).
pub fn locate(settings: &Settings) -> Option<Install> {
    crate::openclaw_install::locate(settings.openclaw_prefix.as_deref(), &settings.data_dir)
}

/// The bind settings of a tenant's instance: empty for profiles other than `openclaw`. The model
/// is reached through the egress route, so the instance gets a URL with its surrogate in it and a
/// placeholder key; the operator's key never leaves the server.
pub fn bind_settings(
    settings: &Settings,
    egress_url: &str,
    tenant: &Tenant,
    surrogate: &str,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    if tenant.profile != PROFILE {
        return Ok(out);
    }
    // In a pod, OpenClaw is where the instance image put it, not on this machine.
    let in_image = (settings.runtime == crate::config::RuntimeKind::Kube).then(|| {
        let prefix = Path::new(&settings.kube_openclaw_prefix);
        Install {
            command: prefix.join("bin/openclaw"),
            path: vec![prefix.join("bin")],
            read_only: vec![],
            compile_cache: Some(prefix.join(crate::openclaw_install::COMPILE_CACHE_DIR)),
            esm_resolve: Some(prefix.join(crate::openclaw_install::ESM_RESOLVE_FILE)),
        }
    });
    let install = in_image.or_else(|| locate(settings)).ok_or_else(|| {
        Error::invalid(format!(
            "tenant {} runs on the openclaw profile, but OpenClaw is not installed: run scripts/install-openclaw \
             (it installs into <data-dir>/openclaw) or give --openclaw-prefix",
            tenant.id
        ))
    })?;
    out.insert(
        keys::COMMAND.to_owned(),
        install.command.display().to_string(),
    );
    let path: Vec<String> = install
        .path
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    out.insert(keys::PATH.to_owned(), path.join(":"));
    if let Some(cache) = &install.compile_cache {
        out.insert(keys::COMPILE_CACHE.to_owned(), cache.display().to_string());
    }
    if let Some(file) = &install.esm_resolve {
        out.insert(keys::ESM_RESOLVE.to_owned(), file.display().to_string());
    }
    if let Some(options) = &settings.openclaw_node_options {
        out.insert(keys::NODE_OPTIONS.to_owned(), options.clone());
    }
    if let Some(file) = &settings.openclaw_config_template {
        let text = std::fs::read_to_string(file).map_err(|e| {
            Error::invalid(format!(
                "cannot read the OpenClaw config template {}: {e}",
                file.display()
            ))
        })?;
        out.insert(keys::TEMPLATE.to_owned(), text);
    }
    if let (Some(_), Some(id)) = (&settings.model_base_url, &settings.model_id) {
        out.insert(
            keys::MODEL_BASE_URL.to_owned(),
            crate::proxy_path::model_base_url(egress_url, surrogate),
        );
        out.insert(keys::MODEL_ID.to_owned(), id.clone());
        out.insert(keys::MODEL_API_KEY.to_owned(), INSTANCE_API_KEY.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_found_and_shown_read_only() {
        let dir = std::env::temp_dir().join(format!("otm-openclaw-locate-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/openclaw"), "#!/bin/sh\n").unwrap();
        let s = Settings {
            openclaw_prefix: Some(dir.clone()),
            ..Settings::default()
        };
        let found = locate(&s).unwrap();
        assert_eq!(found.command, dir.join("bin/openclaw"));
        assert_eq!(found.path, vec![dir.join("bin")]);
        assert!(found.read_only.contains(&dir));
        assert_eq!(found.compile_cache, Some(dir.join("compile-cache")));
        assert_eq!(found.esm_resolve, Some(dir.join("esm-resolve.mjs")));

        let mut t = Tenant::new(otm_core::TenantId::parse("t1").unwrap(), "openclaw", None);
        let s = Settings {
            model_base_url: Some("https://api.example.test/v1".into()),
            model_id: Some("m-1".into()),
            model_api_key: Some(otm_core::Secret::new("sk-real")),
            ..s
        };
        let b = bind_settings(&s, "http://127.0.0.1:8082", &t, "1:sur").unwrap();
        assert_eq!(b[keys::MODEL_BASE_URL], "http://127.0.0.1:8082/model/1:sur");
        assert_eq!(b[keys::MODEL_ID], "m-1");
        assert_eq!(
            b[keys::COMPILE_CACHE],
            dir.join("compile-cache").display().to_string()
        );
        assert_eq!(
            b[keys::ESM_RESOLVE],
            dir.join("esm-resolve.mjs").display().to_string()
        );
        assert!(
            !b.values().any(|v| v.contains("sk-real")),
            "the real key stays on the server"
        );
        t.profile = "reference".into();
        assert!(
            bind_settings(&s, "http://x", &t, "1:sur")
                .unwrap()
                .is_empty()
        );

        let missing = Settings {
            openclaw_prefix: Some(dir.join("nope")),
            ..Settings::default()
        };
        assert_eq!(locate(&missing), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
