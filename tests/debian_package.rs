//! The Debian package, as an operator meets it: `scripts/build-deb.sh` builds it (or
//! ANYTLS_DEB names one already built), its contents and conffiles are what the README
//! promises, `dpkg -i` installs it, the installed server starts from the installed config,
//! the man page and unit are where man and systemd look, lintian finds no error, and
//! `dpkg --purge` takes it all away. Also `cargo install --path . --locked`, the README's
//! other way in, installs exactly the two binaries.
//!
//! Installing needs root and dpkg: without them the test says SKIP. The package is purged
//! on the way out, also when an assertion fails halfway. Each wait is bounded by the step
//! itself; building the release binaries is the bulk (minutes from a clean target).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const PACKAGE: &str = "anytls-rs";
const CONFIG: &str = "/etc/anytls/server.toml";
const UNIT: &str = "/usr/lib/systemd/system/anytls-server.service";

/// Every file the README says the package brings.
const PACKAGED_FILES: &[&str] = &[
    "./usr/bin/anytls-server",
    "./usr/bin/anytls-client",
    "./usr/lib/systemd/system/anytls-server.service",
    "./etc/anytls/server.toml",
    "./usr/share/man/man1/anytls-server.1.gz",
    "./usr/share/man/man1/anytls-client.1.gz",
    "./usr/share/bash-completion/completions/anytls-server",
    "./usr/share/bash-completion/completions/anytls-client",
    "./usr/share/zsh/vendor-completions/_anytls-server",
    "./usr/share/zsh/vendor-completions/_anytls-client",
    "./usr/share/fish/vendor_completions.d/anytls-server.fish",
    "./usr/share/fish/vendor_completions.d/anytls-client.fish",
    "./usr/share/doc/anytls-rs/copyright",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `program ARGS`, failing the test when it cannot start or exits non-zero.
fn run(program: &str, args: &[&str]) -> String {
    let output = output(program, args);
    assert!(output.status.success(), "{program} {args:?} failed:\n{}", said(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|err| panic!("cannot run {program}: {err}"))
}

fn said(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn have(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|out| out.status.success())
}

fn installed() -> bool {
    let output = output("dpkg-query", &["-W", "-f", "${Status}", PACKAGE]);
    String::from_utf8_lossy(&output.stdout).contains("ok installed")
}

/// The .deb: ANYTLS_DEB if given, else what scripts/build-deb.sh builds (its last line).
fn package() -> PathBuf {
    if let Some(deb) = std::env::var_os("ANYTLS_DEB") {
        return PathBuf::from(deb);
    }
    let script = root().join("scripts/build-deb.sh");
    let started = std::time::Instant::now();
    let output = Command::new(&script).output().expect("run scripts/build-deb.sh");
    assert!(output.status.success(), "scripts/build-deb.sh failed:\n{}", said(&output));
    announce(&format!("NOTE debian_package: scripts/build-deb.sh took {:.0?}", started.elapsed()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    PathBuf::from(stdout.lines().last().expect("build-deb.sh prints the .deb's path").trim())
}

/// Purges the package when dropped, so a failed assertion cannot leave it installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let output = output("dpkg", &["--purge", PACKAGE]);
        if !output.status.success() {
            announce(&format!("WARNING debian_package: dpkg --purge {PACKAGE} failed:\n{}", said(&output)));
        }
    }
}

#[tokio::test]
async fn the_debian_package_installs_runs_and_purges_cleanly() {
    let is_root = run("id", &["-u"]).trim() == "0";
    if !is_root || !have("dpkg") || !have("dpkg-deb") {
        announce("SKIP the_debian_package_installs_runs_and_purges_cleanly: needs root, dpkg and dpkg-deb");
        return;
    }
    // Installing over an operator's copy and then purging it would destroy their setup.
    assert!(!installed(), "{PACKAGE} is already installed on this machine; remove it before running this test");
    let deb = package();
    let deb = deb.to_str().expect("a UTF-8 path");
    check_contents(deb);
    check_lintian(deb);

    let guard = Installed;
    run("dpkg", &["-i", deb]);
    check_installed_files();
    check_installed_server().await;
    drop(guard);
    assert!(!installed(), "{PACKAGE} still installed after dpkg --purge");
    for gone in ["/usr/bin/anytls-server", "/usr/bin/anytls-client", UNIT, CONFIG] {
        assert!(!Path::new(gone).exists(), "{gone} left after dpkg --purge");
    }
}

fn check_contents(deb: &str) {
    let listing = run("dpkg-deb", &["-c", deb]);
    let paths: Vec<&str> = listing.lines().filter_map(|line| line.split_whitespace().nth(5)).collect();
    for file in PACKAGED_FILES {
        assert!(paths.contains(file), "{file} is not in the package:\n{listing}");
    }
    let conffiles = run("dpkg-deb", &["-I", deb, "conffiles"]);
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), [CONFIG], "conffiles");
    let control = run("dpkg-deb", &["-I", deb, "control"]);
    assert!(control.contains(&format!("Package: {PACKAGE}\n")), "{control}");
    assert!(control.contains(&format!("Version: {}-1\n", env!("CARGO_PKG_VERSION"))), "{control}");
}

/// lintian may warn (the config is mode 640 on purpose: it holds passwords) but finds no error.
fn check_lintian(deb: &str) {
    if !have("lintian") {
        announce("SKIP debian_package lintian: lintian is not installed (.ci/run installs it)");
        return;
    }
    let output = output("lintian", &[deb]);
    let report = said(&output);
    announce(&format!(
        "NOTE debian_package lintian: {} errors, {} warnings",
        report.lines().filter(|line| line.starts_with("E: ")).count(),
        report.lines().filter(|line| line.starts_with("W: ")).count()
    ));
    assert!(!report.lines().any(|line| line.starts_with("E: ")), "lintian reports errors:\n{report}");
}

fn check_installed_files() {
    let config = std::fs::metadata(CONFIG).expect("the config is installed");
    assert_eq!(config.permissions().mode() & 0o777, 0o640, "{CONFIG} holds passwords");
    let anytls_gid = run("getent", &["group", "anytls"]);
    assert_eq!(config.gid().to_string(), anytls_gid.split(':').nth(2).expect("a gid"), "{CONFIG}'s group");

    let version = run("/usr/bin/anytls-server", &["--version"]);
    assert!(version.starts_with(&format!("anytls-server {} (commit ", env!("CARGO_PKG_VERSION"))), "{version}");
    let version = run("/usr/bin/anytls-client", &["--version"]);
    assert!(version.starts_with(&format!("anytls-client {} (commit ", env!("CARGO_PKG_VERSION"))), "{version}");

    let man_page = Path::new("/usr/share/man/man1/anytls-server.1.gz");
    assert!(man_page.is_file(), "no {}", man_page.display());
    if have("man") {
        assert_eq!(run("man", &["-w", "anytls-server"]).trim(), man_page.to_str().unwrap());
    }

    let unit = std::fs::read_to_string(UNIT).expect("the unit is installed");
    for line in [
        "ExecStart=/usr/bin/anytls-server --config /etc/anytls/server.toml",
        "Documentation=man:anytls-server(1)",
        "User=anytls",
        "StateDirectory=anytls",
    ] {
        assert!(unit.lines().any(|l| l == line), "{UNIT} lacks {line}");
    }
    if have("systemd-analyze") {
        let output = output("systemd-analyze", &["verify", UNIT]);
        let said = said(&output);
        assert!(output.status.success() && !said.contains("Unknown"), "systemd-analyze verify {UNIT}: {said}");
    } else {
        announce("SKIP debian_package systemd-analyze verify: no systemd-analyze");
    }
}

/// The installed server starts from the installed config, on loopback (the config's
/// 0.0.0.0:8443 and the API's 9090 are replaced by ephemeral loopback ports).
async fn check_installed_server() {
    let mut command = Command::new("/usr/bin/anytls-server");
    command.args(["--config", CONFIG, "-l", "127.0.0.1:0", "--api", "127.0.0.1:0"]);
    command.env("RUST_LOG", "info").env_remove("ANYTLS_PASSWORD").env_remove("ANYTLS_API_TOKEN");
    let mut server = Process::spawn("installed anytls-server", command);
    server
        .wait_for(STARTUP_TIMEOUT, "`listening on 127.0.0.1:` line", |line| {
            line.contains("listening on 127.0.0.1:").then_some(())
        })
        .await;
    assert!(server.log().contains("(2 users: alice, bob)"), "{}", server.log());
    drop(server);
}

#[test]
fn cargo_install_locked_installs_exactly_the_server_and_the_client() {
    let dir = TempDir::new("cargo-install");
    let output = Command::new(env!("CARGO"))
        .args(["install", "--path", ".", "--locked", "--root"])
        .arg(dir.path())
        .current_dir(root())
        .output()
        .expect("run cargo install");
    assert!(output.status.success(), "cargo install --path . --locked:\n{}", said(&output));
    let mut installed: Vec<String> = std::fs::read_dir(dir.path().join("bin"))
        .expect("a bin directory")
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    installed.sort();
    assert_eq!(installed, ["anytls-client", "anytls-server"]);
}
