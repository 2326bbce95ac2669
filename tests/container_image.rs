//! The container image as an operator gets it: `scripts/build-image.sh` builds it with
//! podman, and `contrib/container/compose.yaml`, unchanged, runs it next to its fallback
//! site. Checked here: the image runs as uid 10001 with no shell in it, its HEALTHCHECK
//! answers, a browser gets the site, our client (on the host, with the link the container
//! prints) reaches the site by its compose name through the server, a SIGHUP after an
//! edit of the mounted config adds a user, and the state volume keeps the certificate's
//! pin across a `down` and `up`.
//!
//! No registry is reachable, so the site runs a test image built here from Debian's
//! busybox-static (`busybox httpd`) through compose.yaml's SITE_IMAGE variable, and the
//! containers reach the host only through the port published on loopback.
//!
//! Needs podman, runc, podman-compose and busybox-static (`.ci/run` installs them);
//! without one it says SKIP and why.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use anytls_rs::client::tls::{Trust, client_config};
use common::*;

const SITE_IMAGE: &str = "localhost/anytls-test-site:latest";
const PASSWORD: &str = "container-test-alice-pw";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Why this machine cannot run the test, if it cannot.
fn missing_tools() -> Option<String> {
    for (tool, package) in [("podman", "podman"), ("runc", "runc"), ("podman-compose", "podman-compose")] {
        if !Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Some(format!("{tool} is not installed (Debian package {package})"));
        }
    }
    let static_busybox = Command::new("ldd").arg("/bin/busybox").output().is_ok_and(|o| !o.status.success());
    (!static_busybox).then(|| "no static /bin/busybox for the test site image (Debian package busybox-static)".into())
}

/// podman and podman-compose with this test's engine settings: runc (crun cannot set the
/// limits of this sandbox's containers) and limits under the sandbox's hard ones.
struct Engine {
    conf: PathBuf,
    project_dir: PathBuf,
    project: String,
}

impl Engine {
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command.args(args).current_dir(&self.project_dir).env("CONTAINERS_CONF", &self.conf);
        command
    }

    /// Runs to its end (each command here is bounded by the engine's own timeouts and the
    /// test's `bounded`); the output, and a panic with it if it failed and `must` is set.
    fn run(&self, program: &str, args: &[&str], env: &[(&str, &str)], must: bool) -> Output {
        let mut command = self.command(program, args);
        command.envs(env.iter().copied());
        let output = command.output().unwrap_or_else(|e| panic!("{program}: {e}"));
        if must && !output.status.success() {
            panic!(
                "{program} {args:?} failed ({}):\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        output
    }

    fn podman(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.run("podman", args, &[], true).stdout).into_owned()
    }

    fn compose(&self, args: &[&str], publish: &str) -> Output {
        let mut full = vec!["-p", self.project.as_str()];
        full.extend(args);
        self.run("podman-compose", &full, &[("ANYTLS_PUBLISH", publish), ("SITE_IMAGE", SITE_IMAGE)], false)
    }

    fn server_container(&self) -> String {
        format!("{}_anytls_1", self.project)
    }

    fn logs(&self) -> String {
        let output = self.run("podman", &["logs", &self.server_container()], &[], false);
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v"], "127.0.0.1:1").status;
        // podman-compose 1.0 leaves the project's network behind.
        let _ = self.run("podman", &["network", "rm", &format!("{}_default", self.project)], &[], false);
    }
}

/// One GET / over TLS (any certificate) to `addr`: the response, head and body.
async fn https_get(addr: SocketAddr) -> String {
    let config = client_config(&Trust::Insecure).expect("TLS settings");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect to the published port");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("TLS with the server");
    tls.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// GET / from `host:port` through our client's SOCKS5 port.
async fn get_through(proxy: SocketAddr, host: &str, port: u16) -> String {
    let (code, mut tcp) = socks5_connect(proxy, host, port).await.expect("SOCKS5 to our client");
    assert_eq!(code, SOCKS5_OK, "CONNECT {host}:{port} refused");
    tcp.write_all(format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
    let (response, _) = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// The link `podman-compose exec` prints for `user`, as the compose file's comment shows.
fn link_of(engine: &Engine, user: &str, host: &str) -> String {
    let output = engine.compose(
        &[
            "exec",
            "-T",
            "anytls",
            "anytls-server",
            "link",
            "--user",
            user,
            "--config",
            "/etc/anytls/server.toml",
            "--host",
            host,
        ],
        "127.0.0.1:1",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find(|l| l.starts_with("anytls://"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no link for {user}:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr)))
}

async fn client_with(link: &str) -> (Process, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-client"));
    command.args(["-l", "127.0.0.1:0", "-s", link]).env("RUST_LOG", OUR_LOG_FILTER);
    let mut process = Process::spawn("anytls-client", command);
    let addr = process
        .wait_for(STARTUP_TIMEOUT, "`proxy on` line", |line| {
            line.split("proxy on ").nth(1)?.split([' ', ',']).next()?.parse().ok()
        })
        .await;
    (process, addr)
}

async fn until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_the_compose_example_with_its_site_health_link_reload_and_kept_state() {
    if let Some(why) = missing_tools() {
        announce(&format!("SKIP container image: {why}"));
        return;
    }
    // The release build inside build-image.sh is most of the time on a fresh checkout.
    bounded(Duration::from_secs(1500), "container image", async {
        let dir = TempDir::new("container");
        let conf = dir.path().join("containers.conf");
        std::fs::write(
            &conf,
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n[engine]\nruntime = \"runc\"\n",
        )
        .unwrap();
        let project_dir = dir.path().join("compose");
        copy_dir(&repo().join("contrib/container"), &project_dir);
        let config = project_dir.join("config/server.toml");
        let example = std::fs::read_to_string(&config).unwrap();
        assert!(example.contains("password = \"change-me-alice\""), "the example's placeholder moved:\n{example}");
        std::fs::write(&config, example.replace("change-me-alice", PASSWORD)).unwrap();
        let engine = Engine { conf, project_dir, project: format!("anytlstest{}", std::process::id()) };

        // The image, by the script the README gives.
        let built = engine.run(&repo().join("scripts/build-image.sh").to_string_lossy(), &[], &[], true);
        let printed = String::from_utf8_lossy(&built.stdout);
        let last = printed.lines().last().unwrap_or_default().to_string();
        let kib: u64 = last.split('(').nth(1).and_then(|s| s.split_whitespace().next()?.parse().ok()).expect(&last);
        announce(&format!("NOTE container image: {last}"));
        assert!(kib < 40 * 1024, "the image grew to {kib} KiB");
        let image = "localhost/anytls-rs:latest";
        let config_of = |format: &str| engine.podman(&["image", "inspect", "--format", format, image]).trim().to_string();
        assert_eq!(config_of("{{.Config.User}}"), "10001:10001");
        assert!(config_of("{{json .Config.Healthcheck}}").contains("\"health\""), "{}", config_of("{{json .Config}}"));
        assert!(config_of("{{json .Config.Volumes}}").contains("/var/lib/anytls"));
        // Nothing but the binaries and their libraries: not even a shell.
        let shell = engine.run("podman", &["run", "--rm", "--entrypoint", "/bin/sh", image, "-c", "true"], &[], false);
        assert!(!shell.status.success(), "the image has a shell");

        // The stand-in for the site image: busybox's httpd where nginx keeps its pages.
        let site = dir.path().join("site-image");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::copy("/bin/busybox", site.join("busybox")).unwrap();
        std::fs::write(
            site.join("Containerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nCMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \
             \"/usr/share/nginx/html\"]\n",
        )
        .unwrap();
        engine.podman(&["build", "-q", "-t", SITE_IMAGE, &site.to_string_lossy()]);

        let port = free_port();
        let publish = format!("127.0.0.1:{port}");
        let published: SocketAddr = publish.parse().unwrap();
        let up = engine.compose(&["up", "-d"], &publish);
        assert!(up.status.success(), "up: {}", String::from_utf8_lossy(&up.stderr));
        let container = engine.server_container();
        // On a timeout, what the check, compose and the containers said.
        let started = Instant::now();
        loop {
            let check = engine.run("podman", &["healthcheck", "run", &container], &[], false);
            if check.status.success() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the HEALTHCHECK passes: not within 30 s; last: {}{}\nup: {}\n{}\n{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr),
                String::from_utf8_lossy(&up.stderr),
                engine.podman(&["ps", "-a"]),
                engine.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let pid = engine.podman(&["inspect", "--format", "{{.State.Pid}}", &container]).trim().to_string();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the server's process");
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default().to_string();
        assert!(uid.split_whitespace().skip(1).all(|id| id == "10001"), "{uid}");

        // A visitor without a password sees the site.
        let page = https_get(published).await;
        assert!(page.contains("<title>Welcome</title>"), "the fallback site: {page}\n{}", engine.logs());

        // A user's link from the container; our client on the host reaches the site by name.
        let link = link_of(&engine, "alice", &publish);
        assert!(link.starts_with(&format!("anytls://{PASSWORD}@{publish}/?pin-sha256=")), "{link}");
        let (_client, proxy) = client_with(&link).await;
        let page = get_through(proxy, "site", 80).await;
        assert!(page.contains("<title>Welcome</title>"), "site:80 through the server: {page}\n{}", engine.logs());

        // An editor writes the config anew; a SIGHUP makes its new user live.
        let edited = std::fs::read_to_string(&config).unwrap()
            + "\n[[users]]\nname = \"bob\"\npassword = \"container-test-bob-pw\"\n";
        let scratch = config.with_extension("toml.new");
        std::fs::write(&scratch, edited).unwrap();
        std::fs::rename(&scratch, &config).unwrap();
        engine.podman(&["kill", "--signal", "HUP", &container]);
        until(Duration::from_secs(10), "the reload", || engine.logs().contains("SIGHUP: reloaded")).await;
        let (_bob, bob_proxy) = client_with(&link_of(&engine, "bob", &publish)).await;
        assert!(get_through(bob_proxy, "site", 80).await.contains("<title>Welcome</title>"), "{}", engine.logs());

        // down and up again: the state volume keeps the certificate, so the pin holds.
        assert!(engine.compose(&["down"], &publish).status.success());
        assert!(engine.compose(&["up", "-d"], &publish).status.success());
        until(Duration::from_secs(30), "the HEALTHCHECK passes again", || {
            engine.run("podman", &["healthcheck", "run", &container], &[], false).status.success()
        })
        .await;
        assert!(engine.logs().contains("kept from the last start"), "{}", engine.logs());
        assert_eq!(link_of(&engine, "alice", &publish), link, "the pin changed across a restart");
    })
    .await
}
