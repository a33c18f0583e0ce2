//! Building otm's images offline for tests that run them with podman.

use otm_testkit::podman::{Podman, check};
use std::path::Path;
use std::process::Command;

/// `OTM_TEST_IMAGES`: `1` builds the images and runs the reference agent's; `all` also runs
/// OpenClaw in its image (a minute or two more). Prints why a test is skipped otherwise.
pub fn enabled(test: &str, level: &str) -> bool {
    let set = std::env::var("OTM_TEST_IMAGES").unwrap_or_default();
    let on = set == "all" || (set == "1" && level == "1");
    if !on {
        eprintln!(
            "{test}: skipped: set OTM_TEST_IMAGES={level} to build the images and run them with \
             podman (apt-get install podman runc slirp4netns)"
        );
    }
    on
}

/// Builds `which` (`otm` or `openclaw`) offline from this build's `otm` with
/// `scripts/build-images`, tagged `version`, which also runs `otm --version` (and
/// `openclaw --version`) in it; returns its name.
pub fn build_image(podman: &Podman, which: &str, version: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-images");
    let mut build = Command::new(script);
    build.args([
        "--offline",
        "--only",
        which,
        "--otm-binary",
        env!("CARGO_BIN_EXE_otm"),
        "--version",
        version,
    ]);
    if let Some(conf) = podman.conf() {
        build.env("CONTAINERS_CONF", conf);
    }
    let out = build.output().expect("scripts/build-images runs");
    check("scripts/build-images", &out);
    match which {
        "otm" => format!("localhost/otm:{version}"),
        _ => format!("localhost/otm-openclaw:{version}"),
    }
}
