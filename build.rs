//! Stamps the commit into `--version` (`anytls-server 0.1.0 (commit abc1234)`).
//! A build outside a git checkout (a source tarball) says `unknown` instead of failing.

use std::process::Command;

fn main() {
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=ANYTLS_COMMIT={commit}");
    // Re-run when HEAD moves: HEAD itself changes on a checkout, the branch's ref on a commit.
    // `--git-path` finds both in a linked worktree too, where .git is a file.
    for file in ["HEAD", "packed-refs"] {
        watch(git(&["rev-parse", "--git-path", file]));
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(git(&["rev-parse", "--git-path", &branch]));
    }
}

/// Tells cargo to re-run when `path` changes, if it exists (a missing file would make
/// cargo re-run the script on every build).
fn watch(path: Option<String>) {
    if let Some(path) = path.filter(|path| std::path::Path::new(path).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
}

/// The trimmed output of `git ARGS`, or None when git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?.trim().to_string();
    (output.status.success() && !text.is_empty()).then_some(text)
}
