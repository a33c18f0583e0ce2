//! Private scratch files for archives on their way between instances and the state store, so
//! that no archive is ever held whole in memory: under `<data-dir>/spool/` (mode 0700), each file
//! created new with mode 0600 and removed when its [`SpoolFile`] drops, however its work ended.
//! Files left by a crash are removed at start ([`clear`]).

use otm_core::{Error, Result};
use std::path::{Path, PathBuf};

const BACKEND: &str = "spool";

/// The spool directory of a data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("spool")
}

/// Creates the spool directory if needed, private to otm's user.
async fn ensure(data_dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = dir(data_dir);
    let failed = |e: std::io::Error| {
        Error::generic(
            BACKEND,
            format!(
                "cannot prepare the spool directory {}: {e}; check the data directory's owner and free space",
                dir.display()
            ),
        )
    };
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .await
        .map_err(failed)?;
    let meta = tokio::fs::symlink_metadata(&dir).await.map_err(failed)?;
    if !meta.is_dir() {
        return Err(failed(std::io::Error::other("it is not a directory")));
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        tokio::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .await
            .map_err(failed)?;
    }
    Ok(dir)
}

/// One spool file, removed on drop.
#[derive(Debug)]
pub struct SpoolFile {
    path: PathBuf,
}

impl SpoolFile {
    /// A new, empty file in the spool directory of `data_dir`, open for writing; `label` (a
    /// tenant id) goes into its name.
    pub async fn create(data_dir: &Path, label: &str) -> Result<(SpoolFile, tokio::fs::File)> {
        let dir = ensure(data_dir).await?;
        let path = dir.join(format!("{label}-{}.tar.zst", otm_core::id::random_hex(8)));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(|e| {
                Error::generic(
                    BACKEND,
                    format!("cannot create the spool file {}: {e}", path.display()),
                )
            })?;
        Ok((SpoolFile { path }, file))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file, opened for reading from its start.
    pub async fn open(&self) -> Result<tokio::fs::File> {
        tokio::fs::File::open(&self.path).await.map_err(|e| {
            Error::generic(
                BACKEND,
                format!("cannot open the spool file {}: {e}", self.path.display()),
            )
        })
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot remove a spool file")
            }
        }
    }
}

/// Removes what a crashed process left in the spool directory of `data_dir`.
pub fn clear(data_dir: &Path) -> std::io::Result<usize> {
    let dir = dir(data_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn spool_files_are_private_and_go_away() {
        let data = tempfile::tempdir().unwrap();
        let (spool, _file) = SpoolFile::create(data.path(), "alice").await.unwrap();
        let path = spool.path().to_path_buf();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir(data.path())), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert!(path.starts_with(dir(data.path())));
        drop(spool);
        assert!(!path.exists(), "dropped, the file is removed");

        let (left, _file) = SpoolFile::create(data.path(), "bob").await.unwrap();
        std::mem::forget(left);
        assert_eq!(clear(data.path()).unwrap(), 1);
        assert_eq!(std::fs::read_dir(dir(data.path())).unwrap().count(), 0);
    }
}
