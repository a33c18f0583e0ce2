//! tar + zstd archives of state directories. Blocking: call from `spawn_blocking`.
//!
//! A state directory is written by the agent, which is hostile, so both directions are careful:
//! - [`pack`] walks with directory handles (`openat` with `O_NOFOLLOW`, never a path joined from
//!   names twice), stores symbolic links as links, reads only regular files (opened
//!   `O_NOFOLLOW | O_NONBLOCK` and checked again with `fstat`), skips sockets, FIFOs and device
//!   files, and stops at [`Caps`];
//! - [`unpack`] and [`verify`] accept only regular files, directories and symbolic links with
//!   plain relative paths, within the same caps, and [`unpack`] never writes through a symbolic
//!   link it created.

use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstat, fstatat};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

/// zstd level: fast, still a good ratio for text and SQLite files.
const LEVEL: i32 = 3;

/// Deepest directory nesting packed or unpacked.
const MAX_DEPTH: usize = 64;

/// Most bytes accepted after an archive's last entry (tar's end marker and padding).
const MAX_TRAILER: u64 = 1 << 20;

/// Bounds on one archive, on pack and unpack alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Bytes of file content, unpacked.
    pub max_bytes: u64,
    /// Files, directories and links.
    pub max_entries: u64,
}

impl Default for Caps {
    /// 1 GiB in 200,000 entries: the default disk limit of an instance.
    fn default() -> Self {
        Caps {
            max_bytes: 1 << 30,
            max_entries: 200_000,
        }
    }
}

/// What an archive holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub entries: u64,
    pub bytes: u64,
    /// Sockets, FIFOs and device files left out (pack only).
    pub skipped: u64,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// Writes the plain tar inside an archive to `out` (for handing a tenant's state to a person,
/// who opens it with any tar); returns the tar's size. Check the archive with [`verify`] first.
pub fn decompress(archive: impl Read, mut out: impl Write) -> io::Result<u64> {
    let mut decoder = zstd::stream::read::Decoder::new(archive)?;
    io::copy(&mut decoder, &mut out)
}

/// Packs `dir` into a tar + zstd archive written to `out` as it goes, leaving out the top-level
/// entries named in `skip`, within `caps`; an error names the cap that was reached. File contents
/// are copied in chunks, never held whole. On an error, what was written to `out` is no archive.
///
/// A regular file is archived with the size it had when it was opened (tar needs sizes up front):
/// one that grows meanwhile is cut at that size, one that shrinks is padded with zero bytes.
pub fn pack(dir: &Path, skip: &[&str], caps: &Caps, out: impl Write) -> io::Result<Summary> {
    let encoder = zstd::Encoder::new(out, LEVEL)?;
    let mut builder = tar::Builder::new(encoder);
    let mut summary = Summary::default();
    match nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(root) => walk(
            &root,
            Path::new(""),
            skip,
            caps,
            &mut builder,
            &mut summary,
            0,
        )?,
        Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(nix_io(e)),
    }
    let encoder = builder.into_inner()?;
    encoder.finish()?.flush()?;
    Ok(summary)
}

/// Exactly `len` bytes of `file`: what it holds, then zero bytes if it shrank meanwhile.
struct Padded<R> {
    file: R,
    left: u64,
    in_file: bool,
}

impl<R: Read> Read for Padded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let buf = &mut buf[..want];
        let n = if self.in_file {
            match self.file.read(buf)? {
                0 => {
                    self.in_file = false;
                    buf.fill(0);
                    want
                }
                n => n,
            }
        } else {
            buf.fill(0);
            want
        };
        self.left -= n as u64;
        Ok(n)
    }
}

fn walk(
    dirfd: &OwnedFd,
    rel: &Path,
    skip: &[&str],
    caps: &Caps,
    out: &mut tar::Builder<zstd::Encoder<'static, impl Write>>,
    summary: &mut Summary,
    depth: usize,
) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(invalid(format!(
            "the state directory nests deeper than {MAX_DEPTH} levels"
        )));
    }
    let listing =
        nix::dir::Dir::from_fd(nix::unistd::dup(dirfd).map_err(nix_io)?).map_err(nix_io)?;
    let mut names: Vec<std::ffi::OsString> = Vec::new();
    for entry in listing {
        let entry = entry.map_err(nix_io)?;
        let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(
            entry.file_name().to_bytes(),
        );
        if name == "." || name == ".." {
            continue;
        }
        if depth == 0 && skip.iter().any(|s| name == std::ffi::OsStr::new(s)) {
            continue;
        }
        names.push(name.to_owned());
    }
    names.sort();
    for name in names {
        let path = rel.join(&name);
        let st = match fstatat(dirfd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(nix::Error::ENOENT) => continue, // removed meanwhile
            Err(e) => return Err(nix_io(e)),
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let mode = (st.st_mode & 0o1777) as u32;
        let mut header = tar::Header::new_gnu();
        header.set_mode(mode);
        header.set_mtime(st.st_mtime.max(0) as u64);
        header.set_uid(0);
        header.set_gid(0);
        if kind == SFlag::S_IFDIR || kind == SFlag::S_IFREG || kind == SFlag::S_IFLNK {
            summary.entries += 1;
            if summary.entries > caps.max_entries {
                return Err(invalid(format!(
                    "the state directory has more than {} entries",
                    caps.max_entries
                )));
            }
        }
        if kind == SFlag::S_IFDIR {
            let sub = match openat(
                dirfd,
                name.as_os_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(nix::Error::ENOENT | nix::Error::ENOTDIR | nix::Error::ELOOP) => continue,
                Err(e) => return Err(nix_io(e)),
            };
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            out.append_data(&mut header, &path, io::empty())?;
            walk(&sub, &path, skip, caps, out, summary, depth + 1)?;
        } else if kind == SFlag::S_IFREG {
            let fd = match openat(
                dirfd,
                name.as_os_str(),
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(nix::Error::ENOENT | nix::Error::ELOOP) => continue,
                Err(e) => return Err(nix_io(e)),
            };
            // Swapped for something else between the look and the open?
            let st = fstat(&fd).map_err(nix_io)?;
            if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
                summary.skipped += 1;
                continue;
            }
            let size = st.st_size.max(0) as u64;
            summary.bytes = summary.bytes.saturating_add(size);
            if summary.bytes > caps.max_bytes {
                return Err(invalid(format!(
                    "the state directory holds more than {} bytes",
                    caps.max_bytes
                )));
            }
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size);
            let data = Padded {
                file: std::fs::File::from(fd),
                left: size,
                in_file: true,
            };
            out.append_data(&mut header, &path, data)?;
        } else if kind == SFlag::S_IFLNK {
            let target = match nix::fcntl::readlinkat(dirfd, name.as_os_str()) {
                Ok(t) => t,
                Err(nix::Error::ENOENT | nix::Error::EINVAL) => continue,
                Err(e) => return Err(nix_io(e)),
            };
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            out.append_link(&mut header, &path, Path::new(&target))?;
        } else {
            // Sockets, FIFOs, devices: nothing an agent's state needs, and nothing to read safely.
            summary.skipped += 1;
        }
    }
    Ok(())
}

/// A checked entry path: relative, plain names only.
fn entry_path(entry: &tar::Entry<'_, impl Read>) -> io::Result<PathBuf> {
    let path = entry.path()?.into_owned();
    let mut depth = 0;
    for c in path.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => {
                return Err(invalid(format!(
                    "archive entry {} is not a plain relative path",
                    path.display()
                )));
            }
        }
    }
    if depth == 0 || depth > MAX_DEPTH + 1 {
        return Err(invalid(format!(
            "archive entry {} has no name or nests too deep",
            path.display()
        )));
    }
    Ok(path)
}

/// Reads every entry of an archive as it streams in, checking paths, types and caps, without
/// writing anything.
pub fn verify(archive: impl Read, caps: &Caps) -> io::Result<Summary> {
    let decoder = zstd::Decoder::new(archive)?;
    let mut tar = tar::Archive::new(decoder);
    let mut summary = Summary::default();
    for entry in tar.entries()? {
        let mut entry = entry?;
        entry_path(&entry)?;
        count(&mut summary, &entry, caps)?;
        let n = io::copy(&mut (&mut entry).take(caps.max_bytes + 1), &mut io::sink())?;
        summary.bytes += n;
        if summary.bytes > caps.max_bytes {
            return Err(invalid(format!(
                "the archive unpacks to more than {} bytes",
                caps.max_bytes
            )));
        }
    }
    read_to_end(tar)?;
    Ok(summary)
}

/// Reads what follows the last entry to the end of the stream: tar stops at its end marker, but
/// an archive cut short after it (an incomplete zstd frame) must still be refused.
fn read_to_end(tar: tar::Archive<impl Read>) -> io::Result<()> {
    let mut rest = tar.into_inner();
    let n = io::copy(&mut (&mut rest).take(MAX_TRAILER + 1), &mut io::sink())?;
    if n > MAX_TRAILER {
        return Err(invalid(format!(
            "the archive has more than {MAX_TRAILER} bytes after its last entry"
        )));
    }
    Ok(())
}

fn count(summary: &mut Summary, entry: &tar::Entry<'_, impl Read>, caps: &Caps) -> io::Result<()> {
    let kind = entry.header().entry_type();
    if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
        return Err(invalid(format!(
            "archive entry of type {kind:?} is not allowed in a state archive"
        )));
    }
    summary.entries += 1;
    if summary.entries > caps.max_entries {
        return Err(invalid(format!(
            "the archive has more than {} entries",
            caps.max_entries
        )));
    }
    Ok(())
}

/// Replaces the contents of `dir` with an archive made by [`pack`], unpacking as it streams in,
/// within `caps`.
pub fn unpack(archive: impl Read, dir: &Path, caps: &Caps) -> io::Result<Summary> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if dir.exists() {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
    } else {
        std::fs::create_dir_all(dir)?;
    }
    let decoder = zstd::Decoder::new(archive)?;
    let mut tar = tar::Archive::new(decoder);
    let mut summary = Summary::default();
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    for entry in tar.entries()? {
        let mut entry = entry?;
        let rel = entry_path(&entry)?;
        count(&mut summary, &entry, caps)?;
        let target = dir.join(&rel);
        // Never through a link: every ancestor below `dir` must be a real directory.
        let mut at = dir.to_path_buf();
        for c in rel.parent().into_iter().flat_map(|p| p.components()) {
            at.push(c);
            let m = std::fs::symlink_metadata(&at)?;
            if !m.file_type().is_dir() {
                return Err(invalid(format!(
                    "archive entry {} lies below a non-directory",
                    rel.display()
                )));
            }
        }
        let mode = entry.header().mode().unwrap_or(0o600) & 0o1777;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            match std::fs::create_dir(&target) {
                Ok(()) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::AlreadyExists
                        && std::fs::symlink_metadata(&target)?.is_dir() => {}
                Err(e) => return Err(e),
            }
            dirs.push((target, mode | 0o700));
        } else if kind.is_symlink() {
            let link = entry
                .link_name()?
                .ok_or_else(|| invalid(format!("link {} has no target", rel.display())))?;
            std::os::unix::fs::symlink(link.as_ref(), &target)?;
        } else {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&target)?;
            let room = caps.max_bytes.saturating_sub(summary.bytes);
            let n = io::copy(&mut (&mut entry).take(room + 1), &mut f)?;
            summary.bytes += n;
            if summary.bytes > caps.max_bytes {
                return Err(invalid(format!(
                    "the archive unpacks to more than {} bytes",
                    caps.max_bytes
                )));
            }
            f.set_permissions(std::fs::Permissions::from_mode((mode & 0o777) | 0o600))?;
        }
    }
    read_to_end(tar)?;
    // Directory modes last, so a read-only directory can still be filled.
    for (d, mode) in dirs.into_iter().rev() {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode & 0o777))?;
    }
    Ok(summary)
}

/// Writes `data` to `path` durably: temp file, fsync, rename, fsync of the directory.
pub fn write_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
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

    fn packed(dir: &Path, skip: &[&str], caps: &Caps) -> io::Result<(Vec<u8>, Summary)> {
        let mut out = Vec::new();
        let summary = pack(dir, skip, caps, &mut out)?;
        Ok((out, summary))
    }

    /// Hands out one byte per read, like a slow network.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(slot)) => {
                    *slot = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    /// Counts what passes through and fails once more than `limit` bytes were written.
    struct Bounded {
        written: u64,
        limit: u64,
    }

    impl Write for Bounded {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written += buf.len() as u64;
            if self.written > self.limit {
                return Err(io::Error::other("the writer is full"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn round_trip_skips_and_replaces() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/c.txt"), b"hello").unwrap();
        std::fs::write(src.path().join("top.json"), b"{}").unwrap();
        std::fs::write(src.path().join("empty"), b"").unwrap();
        std::fs::create_dir_all(src.path().join("cache")).unwrap();
        std::fs::write(src.path().join("cache/big"), vec![0u8; 1000]).unwrap();
        std::os::unix::fs::symlink("a/b/c.txt", src.path().join("link")).unwrap();
        let (archive, _) = packed(src.path(), &["cache"], &Caps::default()).unwrap();

        let dst = tempfile::tempdir().unwrap();
        std::fs::write(dst.path().join("stale"), b"x").unwrap();
        unpack(archive.as_slice(), dst.path(), &Caps::default()).unwrap();
        assert_eq!(
            std::fs::read(dst.path().join("a/b/c.txt")).unwrap(),
            b"hello"
        );
        assert!(dst.path().join("top.json").exists());
        assert_eq!(std::fs::read(dst.path().join("empty")).unwrap(), b"");
        assert!(!dst.path().join("cache").exists());
        assert!(!dst.path().join("stale").exists());
        assert_eq!(
            std::fs::read_link(dst.path().join("link")).unwrap(),
            Path::new("a/b/c.txt")
        );
    }

    #[test]
    fn verify_and_unpack_read_a_stream_one_byte_at_a_time() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("d")).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(src.path().join("d/data"), &data).unwrap();
        std::fs::write(src.path().join("small"), b"x").unwrap();
        let (archive, packed_summary) = packed(src.path(), &[], &Caps::default()).unwrap();
        let summary = verify(Trickle(&archive), &Caps::default()).unwrap();
        assert_eq!(summary, packed_summary);
        assert_eq!(summary.entries, 3);
        assert_eq!(summary.bytes, 100_001);
        let dst = tempfile::tempdir().unwrap();
        unpack(Trickle(&archive), dst.path(), &Caps::default()).unwrap();
        assert_eq!(std::fs::read(dst.path().join("d/data")).unwrap(), data);
        // Cut short anywhere, the same stream is refused.
        let cut = &archive[..archive.len() - 10];
        assert!(verify(Trickle(cut), &Caps::default()).is_err());
    }

    #[test]
    fn whatever_follows_the_last_entry_is_read_and_checked() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("f"), b"data").unwrap();
        let (archive, _) = packed(src.path(), &[], &Caps::default()).unwrap();
        // tar stops at its end marker; a second frame cut short after it is still refused.
        let mut cut = archive.clone();
        cut.extend_from_slice(&archive[..archive.len() / 2]);
        assert!(verify(cut.as_slice(), &Caps::default()).is_err());
        let dst = tempfile::tempdir().unwrap();
        assert!(unpack(cut.as_slice(), dst.path(), &Caps::default()).is_err());
        let mut junk = archive.clone();
        junk.extend_from_slice(b"junk after the archive");
        assert!(verify(junk.as_slice(), &Caps::default()).is_err());
        // A whole second frame of zeros past the end marker: bounded.
        let mut padded = archive.clone();
        padded.extend(zstd::encode_all(&vec![0u8; 2 << 20][..], 1).unwrap());
        let err = verify(padded.as_slice(), &Caps::default()).unwrap_err();
        assert!(err.to_string().contains("after its last entry"), "{err}");
    }

    #[test]
    fn packing_past_the_byte_cap_fails_while_streaming() {
        let src = tempfile::tempdir().unwrap();
        // Incompressible, so the output tracks the input.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..8 {
            let data: Vec<u8> = (0..(1 << 20))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            std::fs::write(src.path().join(format!("f{i}")), data).unwrap();
        }
        let caps = Caps {
            max_bytes: 3 << 20,
            max_entries: 100,
        };
        let mut out = Bounded {
            written: 0,
            limit: 64 << 20,
        };
        let err = pack(src.path(), &[], &caps, &mut out).unwrap_err();
        assert!(err.to_string().contains("more than 3145728 bytes"), "{err}");
        assert!(
            out.written <= 4 << 20,
            "{} bytes went out before the cap stopped packing",
            out.written
        );
        // A writer that fails part-way fails the pack.
        let mut full = Bounded {
            written: 0,
            limit: 1 << 20,
        };
        let err = pack(src.path(), &[], &Caps::default(), &mut full).unwrap_err();
        assert!(err.to_string().contains("the writer is full"), "{err}");
    }

    #[test]
    fn a_file_that_changes_size_while_packed_keeps_its_opening_size() {
        let mut grown = Padded {
            file: &b"abcdef"[..],
            left: 4,
            in_file: true,
        };
        let mut out = Vec::new();
        grown.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abcd");
        let mut shrunk = Padded {
            file: &b"ab"[..],
            left: 4,
            in_file: true,
        };
        let mut out = Vec::new();
        shrunk.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab\0\0");
    }

    #[test]
    fn garbage_is_refused() {
        let dst = tempfile::tempdir().unwrap();
        assert!(unpack(&b"not an archive"[..], dst.path(), &Caps::default()).is_err());
        assert!(verify(&b"not an archive"[..], &Caps::default()).is_err());
    }

    #[test]
    fn special_files_are_skipped_and_links_are_not_followed() {
        let src = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"host secret").unwrap();
        std::os::unix::fs::symlink(outside.path(), src.path().join("escape")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            src.path().join("secret-link"),
        )
        .unwrap();
        nix::unistd::mkfifo(&src.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(src.path().join("sock")).unwrap();
        std::fs::write(src.path().join("ok"), b"fine").unwrap();
        let (archive, summary) = packed(src.path(), &[], &Caps::default()).unwrap();
        assert_eq!(summary.skipped, 2, "the FIFO and the socket");
        let text = zstd::decode_all(archive.as_slice()).unwrap();
        assert!(
            !text.windows(11).any(|w| w == b"host secret"),
            "a link's target was read"
        );
        let v = verify(archive.as_slice(), &Caps::default()).unwrap();
        assert_eq!(v.entries, 3);
    }

    #[test]
    fn caps_hold_on_pack_and_unpack() {
        let src = tempfile::tempdir().unwrap();
        for i in 0..10 {
            std::fs::write(src.path().join(format!("f{i}")), vec![7u8; 1000]).unwrap();
        }
        let small = Caps {
            max_bytes: 5000,
            max_entries: 100,
        };
        assert!(packed(src.path(), &[], &small).is_err());
        assert!(
            packed(
                src.path(),
                &[],
                &Caps {
                    max_bytes: 1 << 20,
                    max_entries: 5
                }
            )
            .is_err()
        );
        let (archive, _) = packed(src.path(), &[], &Caps::default()).unwrap();
        assert!(verify(archive.as_slice(), &small).is_err());
        let dst = tempfile::tempdir().unwrap();
        assert!(unpack(archive.as_slice(), dst.path(), &small).is_err());
    }

    #[test]
    fn unpack_never_writes_through_a_link_it_made() {
        let outside = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(zstd::Encoder::new(Vec::new(), 1).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "a", outside.path()).unwrap();
        let mut f = tar::Header::new_gnu();
        f.set_entry_type(tar::EntryType::Regular);
        f.set_size(3);
        f.set_mode(0o644);
        b.append_data(&mut f, "a/planted", &b"bad"[..]).unwrap();
        let archive = b.into_inner().unwrap().finish().unwrap();
        let dst = tempfile::tempdir().unwrap();
        assert!(unpack(archive.as_slice(), dst.path(), &Caps::default()).is_err());
        assert!(!outside.path().join("planted").exists());
    }
}
