//! tar + zstd archives of state directories. Blocking: call from `spawn_blocking`.

use std::io::{self, Read, Write};
use std::path::Path;

/// zstd level: fast, still a good ratio for text and SQLite files.
const LEVEL: i32 = 3;

/// Packs `dir` into a tar + zstd archive, leaving out the top-level entries named in `skip`.
/// Symbolic links are stored as links, never followed.
pub fn pack(dir: &Path, skip: &[&str]) -> io::Result<Vec<u8>> {
    let encoder = zstd::Encoder::new(Vec::new(), LEVEL)?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Deterministic);
    if dir.exists() {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            if skip.iter().any(|s| name == std::ffi::OsStr::new(s)) {
                continue;
            }
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                builder.append_dir_all(&name, &path)?;
            } else {
                builder.append_path_with_name(&path, &name)?;
            }
        }
    }
    let encoder = builder.into_inner()?;
    encoder.finish()
}

/// Replaces the contents of `dir` with an archive made by [`pack`]. Entries that would land
/// outside `dir` are refused.
pub fn unpack(archive: &[u8], dir: &Path) -> io::Result<()> {
    if dir.exists() {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
    } else {
        std::fs::create_dir_all(dir)?;
    }
    let decoder = zstd::Decoder::new(archive)?;
    let mut tar = tar::Archive::new(decoder);
    tar.set_preserve_permissions(true);
    for entry in tar.entries()? {
        let mut entry = entry?;
        if !entry.unpack_in(dir)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("archive entry {} points outside the state directory", entry.path()?.display()),
            ));
        }
    }
    Ok(())
}

/// Reads a whole stream into memory, refusing more than `limit` bytes.
pub fn read_limited(mut r: impl Read, limit: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let n = r.by_ref().take(limit + 1).read_to_end(&mut buf)?;
    if n as u64 > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("archive larger than {limit} bytes")));
    }
    Ok(buf)
}

/// Writes `data` to `path` durably: temp file, fsync, rename, fsync of the directory.
pub fn write_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_skips_and_replaces() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/c.txt"), b"hello").unwrap();
        std::fs::write(src.path().join("top.json"), b"{}").unwrap();
        std::fs::create_dir_all(src.path().join("cache")).unwrap();
        std::fs::write(src.path().join("cache/big"), vec![0u8; 1000]).unwrap();
        let archive = pack(src.path(), &["cache"]).unwrap();

        let dst = tempfile::tempdir().unwrap();
        std::fs::write(dst.path().join("stale"), b"x").unwrap();
        unpack(&archive, dst.path()).unwrap();
        assert_eq!(std::fs::read(dst.path().join("a/b/c.txt")).unwrap(), b"hello");
        assert!(dst.path().join("top.json").exists());
        assert!(!dst.path().join("cache").exists());
        assert!(!dst.path().join("stale").exists());
    }

    #[test]
    fn garbage_is_refused() {
        let dst = tempfile::tempdir().unwrap();
        assert!(unpack(b"not an archive", dst.path()).is_err());
    }
}
