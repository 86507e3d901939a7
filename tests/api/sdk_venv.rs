//! The virtualenv with the pinned Python client SDKs (`tests/sdk/requirements.txt`) under the
//! target directory, built on first use. Shared by the API tests (`sdk.rs`) and the federation
//! tests, which include this file by path.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const REQUIREMENTS: &str = include_str!("../sdk/requirements.txt");

/// The virtualenv's Python, creating the virtualenv if needed. Each set of requirements gets its
/// own directory, built privately and renamed into place, so concurrent test processes never see
/// (or delete) a half-built one. Tests run on several threads of one process, so the build is
/// also done once per process (the staging name carries the process id only).
pub fn sdk_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(build_sdk_venv).clone()
}

fn build_sdk_venv() -> PathBuf {
    let hash =
        REQUIREMENTS.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let root = tmp.join(format!("sdk-venv-{hash:016x}"));
    let python = root.join("bin/python");
    if root.join(".complete").exists() {
        return python;
    }
    let staging = tmp.join(format!("sdk-venv-staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let status = Command::new("python3").args(["-m", "venv"]).arg(&staging).status().expect("python3 is installed");
    assert!(status.success(), "python3 -m venv failed");
    let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/requirements.txt");
    let status = Command::new(staging.join("bin/python"))
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements)
        .status()
        .expect("pip runs");
    assert!(status.success(), "pip install -r tests/sdk/requirements.txt failed");
    std::fs::write(staging.join(".complete"), REQUIREMENTS).unwrap();
    if std::fs::rename(&staging, &root).is_err() {
        // Another process finished first; its venv is just as good.
        let _ = std::fs::remove_dir_all(&staging);
    }
    python
}

/// `node`, after `npm ci` of `tests/sdk/js` (pinned by its package-lock.json) has run once per
/// process; `node_modules` is gitignored.
pub fn sdk_js_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/js");
        let lock = std::fs::read(dir.join("package-lock.json")).unwrap();
        let stamp = dir.join("node_modules/.hearth-lock");
        if std::fs::read(&stamp).ok().as_deref() != Some(&lock[..]) {
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .status()
                .expect("npm is installed");
            assert!(status.success(), "npm ci in tests/sdk/js failed");
            std::fs::write(&stamp, &lock).unwrap();
        }
        dir
    })
    .clone()
}
