//! The packaging promise: `cargo install --path .` installs the product, anytls-server
//! and anytls-client, and nothing else; the load generator is a workspace member of its
//! own. Read from `cargo metadata`, so a binary added to the wrong package fails here.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// `cargo metadata --no-deps` of this workspace.
fn metadata() -> Value {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("run cargo metadata");
    assert!(output.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
}

/// The package called `name`, which must be a member of the workspace.
fn member<'a>(metadata: &'a Value, name: &str) -> &'a Value {
    let package = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|package| package["name"] == name)
        .unwrap_or_else(|| panic!("no package {name} in the workspace"));
    let members = metadata["workspace_members"].as_array().expect("workspace_members");
    assert!(members.contains(&package["id"]), "{name} is not a workspace member: {members:?}");
    package
}

/// The sorted names of `package`'s binary targets.
fn bins(package: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = package["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter(|target| target["kind"].as_array().is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin")))
        .map(|target| target["name"].as_str().expect("target name"))
        .collect();
    names.sort_unstable();
    names
}

#[test]
fn the_root_package_installs_exactly_the_server_and_the_client() {
    let metadata = metadata();
    let root = member(&metadata, "anytls-rs");
    let root_manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    assert_eq!(Path::new(root["manifest_path"].as_str().expect("manifest_path")), root_manifest);
    assert_eq!(bins(root), ["anytls-client", "anytls-server"]);
}

#[test]
fn the_load_generator_is_a_member_of_its_own() {
    let metadata = metadata();
    let bench = member(&metadata, "anytls-bench");
    assert!(bench["manifest_path"].as_str().expect("manifest_path").ends_with("tools/anytls-bench/Cargo.toml"));
    assert_eq!(bins(bench), ["anytls-bench"]);
    // The kit the tests and the bench share installs nothing.
    assert_eq!(bins(member(&metadata, "anytls-testkit")), Vec::<&str>::new());
    // The man page and completion writer is a packaging tool, not part of the product.
    let docgen = member(&metadata, "anytls-docgen");
    assert!(docgen["manifest_path"].as_str().expect("manifest_path").ends_with("tools/anytls-docgen/Cargo.toml"));
    assert_eq!(bins(docgen), ["anytls-docgen"]);
}

#[test]
fn every_workspace_member_names_its_license() {
    let metadata = metadata();
    for name in ["anytls-rs", "anytls-bench", "anytls-testkit", "anytls-docgen"] {
        assert_eq!(member(&metadata, name)["license"], "MIT", "{name}");
    }
    assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join("LICENSE").is_file());
}

/// The Debian package's unit is contrib's but for the binary's path and the man page, so a
/// hardening change to one that misses the other fails here.
#[test]
fn the_packaged_unit_is_contribs_with_the_packaged_paths() {
    let read = |path: &str| std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    let directives = |unit: String| -> Vec<String> {
        unit.lines().filter(|line| !line.is_empty() && !line.starts_with('#')).map(str::to_string).collect()
    };
    let contrib = directives(read("contrib/anytls-server.service").replace("/usr/local/bin/", "/usr/bin/"));
    let packaged = directives(read("debian/anytls-server.service"));
    let expected: Vec<String> = contrib
        .iter()
        .flat_map(|line| match line.starts_with("Description=") {
            true => vec![line.clone(), "Documentation=man:anytls-server(1)".to_string()],
            false => vec![line.clone()],
        })
        .collect();
    assert_eq!(packaged, expected);
    for hardening in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "StateDirectory=anytls",
        "User=anytls",
    ] {
        assert!(packaged.iter().any(|line| line == hardening), "the packaged unit lacks {hardening}");
    }
}
