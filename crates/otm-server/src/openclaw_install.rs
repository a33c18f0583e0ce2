//! Where an OpenClaw installation is on this machine: a leaf that the settings' validation and
//! the `openclaw` profile's bind settings both read.

use std::path::{Path, PathBuf};

/// Where `scripts/install-openclaw` puts Node's compile cache, below the prefix.
pub const COMPILE_CACHE_DIR: &str = "compile-cache";

/// Where `scripts/install-openclaw` writes the import resolver the gateway loads, below the prefix.
pub const ESM_RESOLVE_FILE: &str = "esm-resolve.mjs";

/// An OpenClaw installation this server can start gateways from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Install {
    /// The `openclaw` launcher.
    pub command: PathBuf,
    /// Directories to put first on the gateway's `PATH` (where its Node is).
    pub path: Vec<PathBuf>,
    /// Directories the sandbox must show read-only for the launcher to run.
    pub read_only: Vec<PathBuf>,
    /// Node's compile cache that `scripts/install-openclaw` fills, `<prefix>/compile-cache`
    /// (inside the read-only prefix); the instance uses it when it exists.
    pub compile_cache: Option<PathBuf>,
    /// The import resolver `scripts/install-openclaw` writes, `<prefix>/esm-resolve.mjs`; the
    /// instance loads it when it exists.
    pub esm_resolve: Option<PathBuf>,
}

/// Finds OpenClaw: `openclaw_prefix` when set, else `<data-dir>/openclaw`, else `openclaw` on
/// `PATH`. `None` when there is none.
pub fn locate(openclaw_prefix: Option<&Path>, data_dir: &Path) -> Option<Install> {
    let prefix = match openclaw_prefix {
        Some(p) => Some(p.to_path_buf()),
        None => std::path::absolute(data_dir)
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
                compile_cache: Some(prefix.join(COMPILE_CACHE_DIR)),
                esm_resolve: Some(prefix.join(ESM_RESOLVE_FILE)),
            });
        }
        if openclaw_prefix.is_some() {
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
        compile_cache: None,
        esm_resolve: None,
    })
}
