//! The server's side of the `openclaw` agent profile: where OpenClaw is installed, which
//! directories the sandbox must show for it, and the settings a tenant's instance is bound with.

use crate::config::Settings;
use otm_core::{Error, Result, Tenant};
use otm_shim::profile::openclaw::keys;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The profile name.
pub const PROFILE: &str = "openclaw";

/// What the API key the instance sends is: a placeholder, since the egress route adds the real
/// one.
pub const INSTANCE_API_KEY: &str = "otm-egress-adds-the-key";

/// An OpenClaw installation this server can start gateways from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Install {
    /// The `openclaw` launcher.
    pub command: PathBuf,
    /// Directories to put first on the gateway's `PATH` (where its Node is).
    pub path: Vec<PathBuf>,
    /// Directories the sandbox must show read-only for the launcher to run.
    pub read_only: Vec<PathBuf>,
}

/// Finds OpenClaw: `openclaw_prefix` when set, else `<data-dir>/openclaw`, else `openclaw` on
/// `PATH`. `None` when there is none.
pub fn locate(settings: &Settings) -> Option<Install> {
    let prefix = match &settings.openclaw_prefix {
        Some(p) => Some(p.clone()),
        None => std::path::absolute(&settings.data_dir)
            .ok()
            .map(|d| d.join("openclaw")),
    };
    if let Some(prefix) = prefix.and_then(|p| std::path::absolute(p).ok()) {
        let command = prefix.join("bin/openclaw");
        if command.is_file() {
            let mut read_only = vec![prefix.clone()];
            if let Ok(real) = prefix.canonicalize()
                && real != prefix
            {
                read_only.push(real);
            }
            return Some(Install {
                command,
                path: vec![prefix.join("bin")],
                read_only,
            });
        }
        if settings.openclaw_prefix.is_some() {
            return None;
        }
    }
    let command = otm_runtime::local::which("openclaw")?;
    // An npm global install links bin/openclaw into lib/node_modules/openclaw: show the tree
    // that holds the package (and the bin directory), in case it lies where the sandbox hides.
    let mut read_only = vec![];
    if let Some(bin) = command.parent() {
        read_only.push(bin.to_path_buf());
    }
    if let Ok(real) = command.canonicalize() {
        if let Some(root) = real
            .ancestors()
            .find(|a| a.file_name().is_some_and(|n| n == "node_modules"))
            .and_then(Path::parent)
        {
            read_only.push(root.to_path_buf());
        } else if let Some(dir) = real.parent() {
            read_only.push(dir.to_path_buf());
        }
    }
    if let Some(node) = otm_runtime::local::which("node").and_then(|n| n.canonicalize().ok())
        && let Some(dir) = node.parent()
    {
        read_only.push(dir.to_path_buf());
    }
    read_only.dedup();
    Some(Install {
        command,
        path: vec![],
        read_only,
    })
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
