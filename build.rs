//! Build information for `--version` and `psync_build_info`: the git commit
//! and the enabled features, as `PSYNC_BUILD_COMMIT` and
//! `PSYNC_BUILD_FEATURES` for `env!`.
//!
//! The commit comes from, in order: the `PSYNC_BUILD_COMMIT` environment
//! variable (for packagers building from a tarball); `git rev-parse` when the
//! source is a git checkout; the `COMMIT` file, which `git archive` fills in
//! through `export-subst` (see `.gitattributes`); otherwise `unknown`. A build
//! never fails for want of git.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=COMMIT");
    println!("cargo:rerun-if-env-changed=PSYNC_BUILD_COMMIT");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let commit = std::env::var("PSYNC_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git_commit(&dir))
        .or_else(|| archive_commit(&dir))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PSYNC_BUILD_COMMIT={}", commit.trim());

    // Cargo sets CARGO_FEATURE_<NAME> for each enabled feature.
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| k.strip_prefix("CARGO_FEATURE_").map(str::to_owned))
        .filter(|f| f != "DEFAULT")
        .map(|f| f.to_lowercase().replace('_', "-"))
        .collect();
    features.sort();
    let features = if features.is_empty() {
        "none".to_owned()
    } else {
        features.join(",")
    };
    println!("cargo:rustc-env=PSYNC_BUILD_FEATURES={features}");
}

/// The short commit of a git checkout, with `-dirty` left out on purpose: it
/// would need a rerun on every file change.
fn git_commit(dir: &str) -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    // Only this repository's own git directory, never one of a directory
    // above it (a tarball unpacked inside some other checkout).
    let top = git(&["rev-parse", "--show-toplevel"])?;
    if Path::new(&top).canonicalize().ok()? != Path::new(dir).canonicalize().ok()? {
        return None;
    }
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch ref
    // it points to (a commit), wherever this worktree keeps them.
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={}", abs(dir, &head));
    }
    if let Some(name) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            println!("cargo:rerun-if-changed={}", abs(dir, &path));
        }
        if let Some(packed) = git(&["rev-parse", "--git-path", "packed-refs"]) {
            println!("cargo:rerun-if-changed={}", abs(dir, &packed));
        }
    }
    Some(commit)
}

fn abs(dir: &str, path: &str) -> String {
    if Path::new(path).is_absolute() {
        path.to_owned()
    } else {
        format!("{dir}/{path}")
    }
}

/// `COMMIT` holds `$Format:%h$`, which `git archive` replaces with the
/// commit; in a checkout it is still the placeholder.
fn archive_commit(dir: &str) -> Option<String> {
    let text = std::fs::read_to_string(Path::new(dir).join("COMMIT")).ok()?;
    let text = text.trim();
    (!text.is_empty() && !text.contains("$Format")).then(|| text.to_owned())
}
