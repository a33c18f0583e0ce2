//! Landlock for the agent sandbox: the kernel's own file-access rules, applied by the sandbox's
//! process 1 to itself before it starts the agent, and inherited by everything the agent runs.
//!
//! The mount namespace already shows the agent a read-only system with only its own `state/`,
//! `tmp/` and `home/` writable. Landlock says the same again in another layer of the kernel, so
//! that a mistake in one (a writable mount nobody meant, a write through `/proc`) is caught by
//! the other:
//! - everything may be read and executed;
//! - the writable directories (and the sandbox's private `/tmp` and `/dev/shm`) may be written;
//! - `/dev` may be read and written as files (`/dev/null`, terminals), nothing created there;
//! - nothing else may be written, created, removed, renamed into or truncated: not `/dev`
//!   (a device node or file in `/dev`), not a mount that should have been read-only;
//! - abstract Unix sockets and signals are scoped to the sandbox (ABI 6).
//!
//! Landlock is applied as far as the kernel supports it (ABI 6 and older); on a kernel without
//! it the sandbox runs on its other layers and [`restrict`] says so.

use ::landlock::{
    ABI, Access, AccessFs, BitFlags, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    Scope, path_beneath_rules,
};
use std::path::{Path, PathBuf};

/// The Landlock ABI otm asks for: file access rights up to `IoctlDev`, and scoping.
const TARGET: ABI = ABI::V6;

/// How far the rules took hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Every rule is enforced.
    Full,
    /// The kernel's Landlock is older than ABI 6: some rights are not handled.
    Partial,
    /// The kernel has no Landlock (or it is disabled).
    None,
}

/// Restricts the calling process (and everything it starts from now on) to reading the whole
/// filesystem and writing only below `writable`, `/tmp`, `/dev/shm` and device files in `/dev`.
pub fn restrict(writable: &[PathBuf]) -> Result<Enforcement, String> {
    let all = AccessFs::from_all(TARGET);
    let read = AccessFs::from_read(TARGET);
    let devices: BitFlags<AccessFs> =
        read | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev;
    let mut rw: Vec<&Path> = writable.iter().map(PathBuf::as_path).collect();
    rw.extend([Path::new("/tmp"), Path::new("/dev/shm")]);
    let err = |e: ::landlock::RulesetError| format!("landlock: {e}");
    let status = Ruleset::default()
        .handle_access(all)
        .map_err(err)?
        .scope(Scope::from_all(TARGET))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], read))
        .map_err(err)?
        .add_rules(path_beneath_rules(["/dev"], devices))
        .map_err(err)?
        .add_rules(path_beneath_rules(rw, all))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        RulesetStatus::NotEnforced => Enforcement::None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Landlock is per process and irreversible: the check runs in a child process (this test
    /// binary again, with a variable telling it what to do).
    #[test]
    fn writes_outside_the_writable_directories_are_refused() {
        const CHILD: &str = "OTM_LANDLOCK_TEST_DIR";
        if let Ok(dir) = std::env::var(CHILD) {
            let dir = PathBuf::from(dir);
            let allowed = dir.join("state");
            let enforced = restrict(std::slice::from_ref(&allowed)).expect("restrict");
            if enforced == Enforcement::None {
                println!("landlock: not in this kernel");
                return;
            }
            std::fs::write(allowed.join("ok"), "yes").expect("a write below a writable dir");
            let denied = std::fs::write(dir.join("outside"), "no").unwrap_err();
            assert_eq!(denied.kind(), std::io::ErrorKind::PermissionDenied);
            let renamed = std::fs::rename(allowed.join("ok"), dir.join("moved-out")).unwrap_err();
            assert_eq!(renamed.kind(), std::io::ErrorKind::PermissionDenied);
            std::fs::read_to_string(dir.join("readable")).expect("reads go on");
            std::fs::write("/dev/null", "x").expect("/dev/null stays writable");
            println!("landlock: checked");
            return;
        }
        // Not below /tmp, which the rules keep writable: beside the test binary, or in /var/tmp
        // when the checkout itself is below /tmp.
        let exe = std::env::current_exe().unwrap();
        let near = exe.parent().unwrap();
        let base = if near.starts_with("/tmp") {
            std::path::Path::new("/var/tmp")
        } else {
            near
        };
        let dir = tempfile::tempdir_in(base).unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join("readable"), "r").unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sandbox::landlock::tests::writes_outside_the_writable_directories_are_refused",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the restricted child failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("landlock: checked") || text.contains("landlock: not in this kernel"),
            "{text}"
        );
        assert!(dir.path().join("state/ok").exists());
        assert!(!dir.path().join("outside").exists());
    }
}
