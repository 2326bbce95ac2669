//! Deploying the server for real, end to end with both binaries on loopback: `--config`
//! files (the examples in docs/examples/) and flag precedence, secrets from the
//! environment and from files (never in /proc/PID/cmdline), named users with their
//! counters, SIGHUP reloads under traffic, the outbound policy for TCP and UDP (the
//! server's own ports, --deny, --deny-private, odd spellings of loopback), and the client
//! command the server prints at start-up.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const LIMIT: Duration = Duration::from_secs(90);

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples").join(name)
}

/// Starts `anytls-server ARGS` with `env`, and waits for its `listening on` line.
async fn server(args: &[&str], env: &[(&str, &str)]) -> (Process, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-server"));
    command.args(args).env("RUST_LOG", OUR_LOG_FILTER).env_remove("ANYTLS_PASSWORD").env_remove("ANYTLS_API_TOKEN");
    command.envs(env.iter().copied());
    let mut process = Process::spawn("anytls-server", command);
    let addr = process.wait_for(STARTUP_TIMEOUT, "`listening on` line", |line| after(line, "listening on ")).await;
    (process, addr)
}

/// Starts `anytls-client ARGS` with `env`, and waits for its `proxy on` line.
async fn client(args: &[&str], env: &[(&str, &str)]) -> (Process, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-client"));
    command.args(args).env("RUST_LOG", OUR_LOG_FILTER).env_remove("ANYTLS_PASSWORD").env_remove("ANYTLS_API_TOKEN");
    command.envs(env.iter().copied());
    let mut process = Process::spawn("anytls-client", command);
    let addr = process.wait_for(STARTUP_TIMEOUT, "`proxy on` line", |line| after(line, "proxy on ")).await;
    (process, addr)
}

/// Our client on a random loopback port, pinned to `server`'s self-signed certificate.
async fn client_of(server: &Process, addr: SocketAddr, password: &str) -> (Process, SocketAddr) {
    let pin = fingerprint(server);
    client(&["-l", "127.0.0.1:0", "-s", &addr.to_string(), "-p", password, "--pin-sha256", &pin], &[]).await
}

fn fingerprint(server: &Process) -> String {
    server
        .log()
        .lines()
        .find_map(|line| line.split("SHA-256 fingerprint ").nth(1).map(|hex| hex.trim().to_string()))
        .expect("a self-signed server logs its fingerprint")
}

fn after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = line.split(marker).nth(1)?;
    rest[..rest.find([' ', ',', ')']).unwrap_or(rest.len())].parse().ok()
}

async fn users_json(api: SocketAddr) -> Value {
    let (status, body) = api_get(api, "/api/users", None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn user<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["users"].as_array().unwrap().iter().find(|u| u["user"] == name).unwrap_or_else(|| panic!("{name} in {json}"))
}

/// The value of the sample `series` (name and labels) in a Prometheus body.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The NUL-separated command line of a running process.
fn cmdline(process: &Process) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", process.pid())).unwrap()).replace('\0', " ")
}
/// An echo target on a loopback address other than 127.0.0.1.
async fn spawn_echo_on(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------
// Config files and secrets

#[tokio::test]
async fn the_example_server_config_loads_and_command_line_flags_win() {
    bounded(LIMIT, "example server config", async {
        let config = example("anytls-server.toml");
        let (mut server, addr) = server(
            &[
                "--config",
                config.to_str().unwrap(),
                "-l",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
                "--max-outbound-connections",
                "7",
            ],
            &[],
        )
        .await;
        let log = server.log();
        // From the file: the users, the policy; from the command line: listen, api, the limit.
        assert!(log.contains("(2 users: alice, bob)"), "{log}");
        assert!(
            log.contains("private addresses (--deny-private)") && log.contains("--deny 192.0.2.0/24 198.51.100.0/24"),
            "{log}"
        );
        assert!(log.contains("max 7 connections per target"), "{log}");
        assert!(log.contains("route rules, first match wins, then direct: no-smtp (block)"), "{log}");
        assert!(addr.ip().is_loopback());
        let api = api_address(&mut server).await;
        assert!(api.ip().is_loopback() && api.port() != 9090, "--api from the command line: {api}");
        // Alice's password from the file works; her stream to loopback is refused by the
        // file's deny-private (which needs an authenticated session to be reached at all).
        let echo = spawn_echo().await;
        let (_alice, proxy) = client_of(&server, addr, "change-me-alice").await;
        assert!(!echoes_via(proxy, "127.0.0.1", echo.port()).await);
        assert!(server.log_shows("is a private address (--deny-private)", Duration::from_secs(5)).await);
    })
    .await
}

#[tokio::test]
async fn the_example_client_config_loads_and_the_command_line_replaces_its_lists() {
    bounded(LIMIT, "example client config", async {
        let (server, addr) = server(&["-l", "127.0.0.1:0", "--user", "carol:file-secret"], &[]).await;
        let dir = TempDir::new("deploy-client-config");
        let secret = dir.path().join("password");
        std::fs::write(&secret, "file-secret\n").unwrap();
        let config = example("anytls-client.toml");
        let pin = fingerprint(&server);
        // The file names proxy.example.com and a password file that does not exist here:
        // -s and --password-file on the command line replace them; max-streams-per-session
        // and policy come from the file.
        let (_client, proxy) = client(
            &[
                "--config",
                config.to_str().unwrap(),
                "-l",
                "127.0.0.1:0",
                "-s",
                &addr.to_string(),
                "--password-file",
                secret.to_str().unwrap(),
                "--pin-sha256",
                &pin,
            ],
            &[],
        )
        .await;
        let echo = spawn_echo().await;
        assert!(echoes_via(proxy, "127.0.0.1", echo.port()).await, "{}", server.log());
        // ANYTLS_PASSWORD in the environment also beats the file's password-file.
        let (_client, proxy) = client(
            &["--config", config.to_str().unwrap(), "-l", "127.0.0.1:0", "-s", &addr.to_string(), "--pin-sha256", &pin],
            &[("ANYTLS_PASSWORD", "file-secret")],
        )
        .await;
        assert!(echoes_via(proxy, "127.0.0.1", echo.port()).await, "{}", server.log());
    })
    .await
}

#[tokio::test]
async fn a_broken_config_file_stops_start_up_with_a_clear_error() {
    bounded(LIMIT, "broken config", async {
        let dir = TempDir::new("deploy-broken");
        for (text, expected) in [
            ("lisen = \"127.0.0.1:0\"\n", "unknown key `lisen`"),
            ("listen = \n", "line 1"),
            ("max-sessions = \"many\"\n", "many"),
        ] {
            let file = dir.path().join("bad.toml");
            std::fs::write(&file, text).unwrap();
            let output = Command::new(env!("CARGO_BIN_EXE_anytls-server"))
                .args(["--config", file.to_str().unwrap(), "-p", "x"])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{text}");
            assert!(stderr.contains(expected), "{text}: {stderr}");
        }
    })
    .await
}

#[tokio::test]
async fn secrets_from_the_environment_and_files_stay_out_of_the_command_line() {
    bounded(LIMIT, "secrets", async {
        let dir = TempDir::new("deploy-secrets");
        let password = "env-only-password-7f3a";
        let token = "env-only-token-91c2";
        let (mut server, addr) = server(
            &["-l", "127.0.0.1:0", "--api", "127.0.0.1:0"],
            &[("ANYTLS_PASSWORD", password), ("ANYTLS_API_TOKEN", token)],
        )
        .await;
        let api = api_address(&mut server).await;
        let file = dir.path().join("client.password");
        std::fs::write(&file, format!("{password}\n")).unwrap();
        let pin = fingerprint(&server);
        let (client, proxy) = client(
            &[
                "-l",
                "127.0.0.1:0",
                "-s",
                &addr.to_string(),
                "--password-file",
                file.to_str().unwrap(),
                "--pin-sha256",
                &pin,
            ],
            &[],
        )
        .await;
        let echo = spawn_echo().await;
        assert!(echoes_via(proxy, "127.0.0.1", echo.port()).await, "{}", server.log());
        for process in [&server, &client] {
            let line = cmdline(process);
            assert!(!line.contains(password) && !line.contains(token), "{}: {line}", process.name());
        }
        // The token from the environment guards the API.
        assert_eq!(api_get(api, "/api/users", None).await.0, 401);
        assert_eq!(api_get(api, "/api/users", Some(token)).await.0, 200);
        // A password from a server-side file works the same way.
        let server_file = dir.path().join("server.passwords");
        std::fs::write(&server_file, "first-from-file\nsecond-from-file\n").unwrap();
        let (file_server, file_addr) =
            self::server(&["-l", "127.0.0.1:0", "--password-file", server_file.to_str().unwrap()], &[]).await;
        assert!(!cmdline(&file_server).contains("from-file"));
        let (_second, proxy) = client_of(&file_server, file_addr, "second-from-file").await;
        assert!(echoes_via(proxy, "127.0.0.1", echo.port()).await, "{}", file_server.log());
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Named users

#[tokio::test]
async fn per_user_counters_show_in_the_api_and_metrics() {
    bounded(LIMIT, "per-user counters", async {
        let (mut server, addr) =
            server(&["-l", "127.0.0.1:0", "--api", "127.0.0.1:0", "--user", "alice:pw-a", "--user", "bob:pw-b"], &[])
                .await;
        let api = api_address(&mut server).await;
        let echo = spawn_echo().await;
        let (_alice, alice_proxy) = client_of(&server, addr, "pw-a").await;
        let (_bob, bob_proxy) = client_of(&server, addr, "pw-b").await;
        for i in 0..3 {
            echo_roundtrip(socks5_open(alice_proxy, echo).await, &payload(100_000, i)).await;
        }
        echo_roundtrip(socks5_open(bob_proxy, echo).await, &payload(10_000, 9)).await;
        // A wrong password: the client's request fails, the server counts it.
        let (_mallory, mallory_proxy) = client_of(&server, addr, "wrong").await;
        assert!(!echoes_via(mallory_proxy, "127.0.0.1", echo.port()).await);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let json = loop {
            let json = users_json(api).await;
            let done = user(&json, "bob")["streams"] == 1 && json["auth_failures"].as_u64() >= Some(1);
            if done || tokio::time::Instant::now() > deadline {
                break json;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (a, b) = (user(&json, "alice"), user(&json, "bob"));
        assert_eq!((a["streams"].as_u64(), b["streams"].as_u64()), (Some(3), Some(1)), "{json}");
        for (who, sent) in [(a, 300_000), (b, 10_000)] {
            assert!(who["bytes_up"].as_u64().unwrap() >= sent, "{json}");
            assert!(who["bytes_down"].as_u64().unwrap() >= sent, "{json}");
        }
        assert!(a["bytes_up"].as_u64() > b["bytes_up"].as_u64() && a["active"] == true, "{json}");
        assert!(json["auth_failures"].as_u64().unwrap() >= 1, "{json}");
        let (status, metrics) = api_get(api, "/metrics", None).await;
        assert_eq!(status, 200);
        assert_eq!(sample(&metrics, "anytls_user_streams_total{user=\"alice\"}"), Some(3.0), "{metrics}");
        assert_eq!(sample(&metrics, "anytls_user_streams_total{user=\"bob\"}"), Some(1.0), "{metrics}");
        assert!(sample(&metrics, "anytls_user_bytes_down_total{user=\"alice\"}").unwrap() >= 300_000.0);
        assert!(sample(&metrics, "anytls_auth_failures_total{reason=\"invalid\"}").unwrap() >= 1.0, "{metrics}");
        // The live page asks /api/users for its users table.
        let (_, page) = api_get(api, "/", None).await;
        assert!(page.contains("/api/users") && page.contains("id=\"users\""));
    })
    .await
}

/// Echoes `chunk` over `tcp` every 20 ms until `stop`; returns the round trips made, or the
/// first error.
async fn keep_echoing(mut tcp: TcpStream, stop: tokio::sync::watch::Receiver<bool>) -> Result<usize, String> {
    let chunk = payload(2048, 5);
    let mut back = vec![0u8; chunk.len()];
    let mut rounds = 0;
    while !*stop.borrow() {
        tcp.write_all(&chunk).await.map_err(|e| format!("write after {rounds}: {e}"))?;
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back))
            .await
            .map_err(|_| format!("no echo after {rounds}"))?
            .map_err(|e| format!("read after {rounds}: {e}"))?;
        if back != chunk {
            return Err(format!("corrupt echo after {rounds}"));
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(rounds)
}

#[tokio::test]
async fn sighup_adds_and_removes_users_under_traffic_without_losing_other_streams() {
    bounded(LIMIT, "SIGHUP reload", async {
        let dir = TempDir::new("deploy-sighup");
        let config = dir.path().join("server.toml");
        let users = |names: &[(&str, &str)]| {
            names.iter().map(|(n, p)| format!("[[users]]\nname = \"{n}\"\npassword = \"{p}\"\n")).collect::<String>()
        };
        std::fs::write(&config, format!("listen = \"127.0.0.1:0\"\n{}", users(&[("alice", "pa"), ("bob", "pb")])))
            .unwrap();
        let (server, addr) = server(&["--config", config.to_str().unwrap()], &[]).await;
        let echo = spawn_echo().await;
        let (_alice, alice_proxy) = client_of(&server, addr, "pa").await;
        let (_bob, bob_proxy) = client_of(&server, addr, "pb").await;
        let (_carol, carol_proxy) = client_of(&server, addr, "pc").await;
        assert!(!echoes_via(carol_proxy, "127.0.0.1", echo.port()).await, "carol is not a user yet");

        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut alice_streams = Vec::new();
        for _ in 0..3 {
            let tcp = socks5_open(alice_proxy, echo).await;
            alice_streams.push(tokio::spawn(keep_echoing(tcp, stopped.clone())));
        }
        let bob_stream = tokio::spawn(keep_echoing(socks5_open(bob_proxy, echo).await, stopped.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Bob out, carol in.
        std::fs::write(&config, format!("listen = \"127.0.0.1:0\"\n{}", users(&[("alice", "pa"), ("carol", "pc")])))
            .unwrap();
        server.signal("HUP");
        assert!(server.log_shows("added: carol, removed: bob", Duration::from_secs(5)).await, "{}", server.log());
        let bob_end =
            tokio::time::timeout(Duration::from_secs(10), bob_stream).await.expect("bob's stream ends").unwrap();
        assert!(bob_end.is_err(), "bob's stream was closed: {bob_end:?}");
        assert!(echoes_via(carol_proxy, "127.0.0.1", echo.port()).await, "carol is a user now");
        assert!(!echoes_via(bob_proxy, "127.0.0.1", echo.port()).await, "bob is no longer one");

        // A broken file is refused and changes nothing.
        std::fs::write(&config, "listen = \"127.0.0.1:0\"\n[[users]]\nname = \"alice\"\n").unwrap();
        server.signal("HUP");
        assert!(server.log_shows("reload refused, the running configuration stays", Duration::from_secs(5)).await);
        assert!(server.log().contains("needs `name` and `password`"), "{}", server.log());
        assert!(echoes_via(carol_proxy, "127.0.0.1", echo.port()).await, "carol still a user");
        assert!(echoes_via(alice_proxy, "127.0.0.1", echo.port()).await, "alice still a user");

        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.send_replace(true);
        for stream in alice_streams {
            let rounds = stream.await.unwrap().unwrap_or_else(|why| panic!("alice's stream was lost: {why}"));
            assert!(rounds > 10, "alice's streams kept going ({rounds} round trips)");
        }
    })
    .await
}

#[tokio::test]
async fn check_validates_a_config_without_serving_and_names_each_problem() {
    bounded(LIMIT, "check", async {
        let dir = TempDir::new("deploy-check");
        let (one_dir, other_dir) = (dir.path().join("one"), dir.path().join("other"));
        std::fs::create_dir_all(&one_dir).unwrap();
        std::fs::create_dir_all(&other_dir).unwrap();
        let (one, other) = (TestPki::write_to(&one_dir), TestPki::write_to(&other_dir));
        let good = dir.path().join("good.toml");
        let cert = one.server_cert.display().to_string();
        std::fs::write(
            &good,
            format!(
                "listen = \"127.0.0.1:0\"\ncert = \"{cert}\"\nkey = \"{}\"\n[[users]]\nname = \"amy\"\npassword = \"a long pass phrase\"\n",
                one.server_key.display()
            ),
        )
        .unwrap();
        let (status, out) = server_command(&["check", "--config", good.to_str().unwrap()], dir.path()).await;
        assert!(status.success() && out.contains("good.toml: configuration OK"), "{out}");
        assert!(!out.contains("listening on"), "check serves nothing: {out}");

        // A key of another certificate, two users with one password, a padding file that is
        // not there, and an API on the listen port: every problem, each on its line.
        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            format!(
                "listen = \"127.0.0.1:9443\"\napi = \"127.0.0.1:9443\"\ncert = \"{cert}\"\nkey = \"{}\"\n\
                 padding-scheme = \"{}/missing.scheme\"\n[[users]]\nname = \"amy\"\npassword = \"same\"\n\
                 [[users]]\nname = \"ben\"\npassword = \"same\"\n",
                other.server_key.display(),
                dir.path().display()
            ),
        )
        .unwrap();
        let (status, out) = server_command(&["check", "--config", bad.to_str().unwrap()], dir.path()).await;
        assert!(!status.success(), "{out}");
        let problems: Vec<&str> = out.lines().filter(|l| l.starts_with("anytls-server check: ") && !l.contains("warning:")).collect();
        assert_eq!(problems.len(), 4, "{out}");
        for part in ["users:", "missing.scheme", "--cert/--key:", "--listen and --api are both 127.0.0.1:9443"] {
            assert!(out.contains(part), "{part} in:\n{out}");
        }
        assert!(out.contains("warning: user amy: weak password"), "{out}");

        // A mistake in the file itself names its file and line, as at start-up.
        std::fs::write(&bad, "listen = \"127.0.0.1:0\"\nmax-sesions = 5\n").unwrap();
        let (status, out) = server_command(&["check", "--config", bad.to_str().unwrap()], dir.path()).await;
        assert!(!status.success() && out.contains("bad.toml:2: unknown key `max-sesions`"), "{out}");
        assert!(out.contains("did you mean `max-sessions`?"), "{out}");
    })
    .await
}

#[tokio::test]
async fn the_clients_check_loads_every_server_and_its_trust() {
    bounded(LIMIT, "client check", async {
        let dir = TempDir::new("deploy-client-check");
        let config = dir.path().join("client.toml");
        let pin = "ab".repeat(32);
        std::fs::write(&config, format!("server = [\"anytls://pw@127.0.0.1:9/?pin-sha256={pin}\"]\n")).unwrap();
        let check = |args: Vec<String>| async move {
            let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-client"));
            command.arg("check").args(args).env_remove("ANYTLS_PASSWORD");
            let mut process = Process::spawn("anytls-client check", command);
            let status = process.wait_exit(Duration::from_secs(20)).await.expect("check ends by itself");
            (status, process.log())
        };
        let (status, out) = check(vec!["--config".into(), config.display().to_string()]).await;
        assert!(status.success() && out.contains("client.toml: configuration OK"), "{out}");
        let missing = dir.path().join("missing-ca.pem").display().to_string();
        let args = ["-s", "127.0.0.1:9", "-p", "pw", "--ca", &missing, "-s", "anytls://pw@h:1/?security=reality"];
        let (status, out) = check(args.iter().map(|a| a.to_string()).collect()).await;
        assert!(!status.success(), "{out}");
        assert!(out.contains("cannot read CA file") && out.contains("security=reality"), "{out}");
    })
    .await
}

#[tokio::test]
async fn sighup_says_which_changed_flags_wait_for_a_restart() {
    bounded(LIMIT, "SIGHUP restart flags", async {
        let dir = TempDir::new("deploy-restart-flags");
        let config = dir.path().join("server.toml");
        let users = "[[users]]\nname = \"amy\"\npassword = \"pa\"\n";
        std::fs::write(&config, format!("listen = \"127.0.0.1:0\"\n{users}")).unwrap();
        let (server, _addr) = server(&["--config", config.to_str().unwrap()], &[]).await;
        std::fs::write(
            &config,
            format!("listen = \"127.0.0.1:0\"\nmax-sessions = 5\nconnect-timeout-secs = 2\n{users}"),
        )
        .unwrap();
        server.signal("HUP");
        let said = "SIGHUP: changed but applied only by a restart: --connect-timeout-secs, --max-sessions";
        let warned = server.log_shows("SIGHUP: changed but applied only by a restart", Duration::from_secs(5)).await;
        assert!(warned && server.log().contains(said), "{}", server.log());
    })
    .await
}

#[tokio::test]
async fn sighup_reloads_the_certificate_for_new_connections() {
    bounded(LIMIT, "certificate reload", async {
        let dir = TempDir::new("deploy-cert");
        let (old, new) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::create_dir_all(&old).unwrap();
        std::fs::create_dir_all(&new).unwrap();
        let (old, new) = (TestPki::write_to(&old), TestPki::write_to(&new));
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::copy(&old.server_cert, &cert).unwrap();
        std::fs::copy(&old.server_key, &key).unwrap();
        let (server, addr) = server(
            &["-l", "127.0.0.1:0", "-p", "pw", "--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()],
            &[],
        )
        .await;
        let echo = spawn_echo().await;
        let trusting = |ca: &Path| {
            let ca = ca.to_str().unwrap().to_string();
            async move { client(&["-l", "127.0.0.1:0", "-s", &addr.to_string(), "-p", "pw", "--ca", &ca], &[]).await }
        };
        let (_before, proxy) = trusting(&old.ca_cert).await;
        assert!(echoes_via(proxy, "127.0.0.1", echo.port()).await, "{}", server.log());

        std::fs::copy(&new.server_cert, &cert).unwrap();
        std::fs::copy(&new.server_key, &key).unwrap();
        server.signal("HUP");
        assert!(server.log_shows("SIGHUP: reloaded", Duration::from_secs(5)).await, "{}", server.log());
        let (_after, proxy) = trusting(&new.ca_cert).await;
        assert!(echoes_via(proxy, "127.0.0.1", echo.port()).await, "new connections get the new certificate");
        let (_stale, proxy) = trusting(&old.ca_cert).await;
        assert!(!echoes_via(proxy, "127.0.0.1", echo.port()).await, "the old certificate is no longer served");

        // A key that is not a key: refused, the new certificate stays.
        std::fs::write(&key, "not a key\n").unwrap();
        server.signal("HUP");
        assert!(server.log_shows("reload refused", Duration::from_secs(5)).await, "{}", server.log());
        let (_still, proxy) = trusting(&new.ca_cert).await;
        assert!(echoes_via(proxy, "127.0.0.1", echo.port()).await, "the running certificate stays");
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Outbound policy

/// Spellings of loopback that reach 127.0.0.1 (or the host) when dialed as names.
const LOOPBACK_FORMS: [&str; 6] = ["127.0.0.1", "localhost", "0.0.0.0", "2130706433", "0x7f000001", "::ffff:127.0.0.1"];

#[tokio::test]
async fn the_servers_own_ports_are_refused_in_every_spelling() {
    bounded(LIMIT, "own ports", async {
        let (mut server, addr) = server(&["-l", "127.0.0.1:0", "-p", "pw", "--api", "127.0.0.1:0"], &[]).await;
        let api = api_address(&mut server).await;
        let (_client, proxy) = client_of(&server, addr, "pw").await;
        let echo = spawn_echo().await;
        let mut refused = 0;
        for port in [addr.port(), api.port()] {
            for host in LOOPBACK_FORMS {
                let reply = socks5_connect(proxy, host, port).await.map(|(code, _)| code);
                assert!(matches!(reply, Ok(code) if code != SOCKS5_OK), "{host}:{port} reached: {reply:?}");
                refused += 1;
            }
        }
        // Other loopback ports stay reachable: only the server's own are refused by default.
        for host in LOOPBACK_FORMS {
            assert!(echoes_via(proxy, host, echo.port()).await, "{host}:{} should work", echo.port());
        }
        let logged = server.wait_lines(&["is the server's own address"], refused, Duration::from_secs(5)).await;
        let log = server.log();
        assert!(logged, "{log}");
        let (_, metrics) = api_get(api, "/metrics", None).await;
        assert_eq!(sample(&metrics, "anytls_policy_refused_total{reason=\"own_address\"}"), Some(refused as f64));
    })
    .await
}

#[tokio::test]
async fn deny_rules_refuse_tcp_streams_after_name_resolution() {
    bounded(LIMIT, "deny TCP", async {
        let allowed = spawn_echo().await;
        let denied = spawn_echo_on("127.0.0.2").await;
        let (server, addr) = server(&["-l", "127.0.0.1:0", "-p", "pw", "--deny", "127.0.0.2/32"], &[]).await;
        let (_client, proxy) = client_of(&server, addr, "pw").await;
        assert!(echoes_via(proxy, "127.0.0.1", allowed.port()).await);
        // A name is dialed at the (IPv4) address that was checked; the target listens on it.
        assert!(echoes_via(proxy, "localhost", allowed.port()).await, "{}", server.log());
        for host in ["127.0.0.2", "2130706434", "0x7f000002", "::ffff:127.0.0.2", "127.2"] {
            let reply = socks5_connect(proxy, host, denied.port()).await.map(|(code, _)| code);
            assert!(matches!(reply, Ok(code) if code != SOCKS5_OK), "{host} reached: {reply:?}");
        }
        assert!(server.log_shows("is in --deny 127.0.0.2/32", Duration::from_secs(5)).await, "{}", server.log());

        // --deny-private: loopback in every spelling, and names that resolve to it.
        let (private, private_addr) = self::server(&["-l", "127.0.0.1:0", "-p", "pw", "--deny-private"], &[]).await;
        let (_client, proxy) = client_of(&private, private_addr, "pw").await;
        for host in LOOPBACK_FORMS {
            let reply = socks5_connect(proxy, host, allowed.port()).await.map(|(code, _)| code);
            assert!(matches!(reply, Ok(code) if code != SOCKS5_OK), "{host} reached: {reply:?}");
        }
        // The refusals reached the client; their log lines may still be in the pipe.
        let logged = private
            .wait_lines(&["is a private address (--deny-private)"], LOOPBACK_FORMS.len(), Duration::from_secs(5))
            .await;
        let log = private.log();
        assert!(logged, "{log}");
        assert!(
            log.contains("localhost: 127.0.0.1:") || log.contains("localhost: [::1]:"),
            "names say what they resolved to"
        );
    })
    .await
}

/// A SOCKS5 UDP association through `proxy`: its control connection and relay address.
async fn associate(proxy: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(&[5, 1, 0]).await.unwrap();
    let mut method = [0u8; 2];
    tcp.read_exact(&mut method).await.unwrap();
    tcp.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).await.unwrap();
    assert_eq!((head[1], head[3]), (0, 1), "an IPv4 relay address");
    let mut ip = [0u8; 4];
    tcp.read_exact(&mut ip).await.unwrap();
    let port = tcp.read_u16().await.unwrap();
    (tcp, SocketAddr::new(IpAddr::from(ip), port))
}

async fn udp_echo_on(ip: &str) -> SocketAddr {
    let socket = UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..len], from).await;
        }
    });
    addr
}

/// Sends one datagram to `host:port` through the relay; the reply's payload, if any in 1.5 s.
async fn udp_round_trip(app: &UdpSocket, relay: SocketAddr, host: &str, port: u16, payload: &[u8]) -> Option<Vec<u8>> {
    let mut datagram = vec![0, 0, 0, 3, host.len() as u8];
    datagram.extend_from_slice(host.as_bytes());
    datagram.extend_from_slice(&port.to_be_bytes());
    datagram.extend_from_slice(payload);
    app.send_to(&datagram, relay).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (len, _) = tokio::time::timeout(Duration::from_millis(1500), app.recv_from(&mut buf)).await.ok()?.ok()?;
    // RSV RSV FRAG, then an IPv4 source address (type 1, 4 bytes, port).
    Some(buf[10..len].to_vec())
}

#[tokio::test]
async fn deny_rules_refuse_udp_datagrams() {
    bounded(LIMIT, "deny UDP", async {
        let allowed = udp_echo_on("127.0.0.1").await;
        let denied = udp_echo_on("127.0.0.2").await;
        let (mut server, addr) =
            server(&["-l", "127.0.0.1:0", "-p", "pw", "--deny", "127.0.0.2/32", "--api", "127.0.0.1:0"], &[]).await;
        let api = api_address(&mut server).await;
        let (_client, proxy) = client_of(&server, addr, "pw").await;
        let (_control, relay) = associate(proxy).await;
        let app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(
            udp_round_trip(&app, relay, "127.0.0.1", allowed.port(), b"one").await.as_deref(),
            Some(&b"one"[..])
        );
        for host in ["127.0.0.2", "2130706434", "::ffff:127.0.0.2"] {
            assert_eq!(udp_round_trip(&app, relay, host, denied.port(), b"two").await, None, "{host} reached");
        }
        // The association goes on for allowed targets.
        assert_eq!(
            udp_round_trip(&app, relay, "localhost", allowed.port(), b"three").await.as_deref(),
            Some(&b"three"[..])
        );
        let (_, metrics) = api_get(api, "/metrics", None).await;
        assert_eq!(sample(&metrics, "anytls_policy_refused_total{reason=\"deny\"}"), Some(3.0), "{metrics}");
        assert!(
            server.log_shows("refused by outbound policy: 127.0.0.2:", Duration::from_secs(5)).await,
            "{}",
            server.log()
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Start-up

#[tokio::test]
async fn the_printed_link_connects_a_client_as_it_is() {
    bounded(LIMIT, "printed link", async {
        let (server, _addr) = server(&["-l", "127.0.0.1:0", "--user", "dora:p@ss w/rd"], &[]).await;
        // Printed on stdout just after the `listening on` line of the log: wait for both.
        let printed = server.wait_lines(&["client link: ", "client command: "], 2, Duration::from_secs(10)).await;
        assert!(printed, "{}", server.log());
        let log = server.log();
        let link = log.lines().find_map(|l| l.strip_prefix("client link: ")).expect("a link is printed").to_string();
        let command = log.lines().find(|l| l.starts_with("client command: anytls-client ")).expect("a command");
        assert!(link.contains("pin-sha256=") && command.contains("--pin-sha256 "), "{log}");
        // Not a terminal: the password is a placeholder, never written to logs.
        assert!(!log.contains("p@ss") && !log.contains("p%40ss"), "{log}");
        let link = link.replace("PASSWORD", "p%40ss%20w%2Frd");
        let (_client, proxy) = client(&["-l", "127.0.0.1:0", "-s", &link], &[]).await;
        let echo = spawn_echo().await;
        assert!(echoes_via(proxy, "127.0.0.1", echo.port()).await, "{}", server.log());
    })
    .await
}

#[tokio::test]
async fn the_self_signed_certificate_is_kept_across_restarts_and_each_user_gets_a_link() {
    bounded(LIMIT, "kept certificate", async {
        let state = TempDir::new("deploy-kept-cert");
        let users = ["--user", "amy:pa", "--user", "ben:p b"];
        let env = [("STATE_DIRECTORY", state.path().to_str().unwrap())];
        let start = |port: String| {
            let mut args = vec!["-l".to_string(), format!("127.0.0.1:{port}")];
            args.extend(users.iter().map(|a| a.to_string()));
            args
        };
        let first_args = start("0".into());
        let (first, addr) = server(&first_args.iter().map(String::as_str).collect::<Vec<_>>(), &env).await;
        let pin = fingerprint(&first);
        assert!(first.log().contains("new and kept for later starts"), "{}", first.log());
        drop(first);
        let again_args = start(addr.port().to_string());
        let (again, addr) = server(&again_args.iter().map(String::as_str).collect::<Vec<_>>(), &env).await;
        assert_eq!(fingerprint(&again), pin, "a restart keeps the certificate");
        assert!(again.log().contains("kept from the last start"), "{}", again.log());

        // `link --user ben`: his password and the kept pin; a client connects with it as it is.
        let mut link_args = vec!["link", "--user", "ben", "--qr"];
        link_args.extend(again_args.iter().map(String::as_str));
        let (status, out) = server_command(&link_args, state.path()).await;
        assert!(status.success(), "{out}");
        let link = out.lines().find(|l| l.starts_with("anytls://")).expect("a link").to_string();
        assert_eq!(link, format!("anytls://p%20b@127.0.0.1:{}/?pin-sha256={pin}", addr.port()));
        assert!(out.contains('\u{2580}') || out.contains('\u{2584}'), "a QR code in half blocks:\n{out}");
        let (_client, proxy) = client(&["-l", "127.0.0.1:0", "-s", &link], &[]).await;
        let echo = spawn_echo().await;
        assert!(echoes_via(proxy, "127.0.0.1", echo.port()).await, "{}", again.log());

        let mut unknown = vec!["link", "--user", "nobody"];
        unknown.extend(users);
        let (status, out) = server_command(&unknown, state.path()).await;
        assert!(!status.success() && out.contains("no user \"nobody\" (users: amy, ben)"), "{out}");

        // --state-dir off: a new certificate at every start, and start-up says what that means.
        let (off, _) = server(&["-l", "127.0.0.1:0", "--state-dir", "off", "-p", "pw"], &env).await;
        assert!(off.log().contains("not kept (--state-dir off)"), "{}", off.log());
        assert_ne!(fingerprint(&off), pin);
    })
    .await
}

/// `health` with the server's own flags: exit 0 while it serves, with nothing above DEBUG
/// in the server's log for it (a container runs it every 30 s); exit 1 with the reason
/// once it has stopped.
#[tokio::test]
async fn health_answers_while_the_server_serves_and_fails_once_it_stopped() {
    bounded(LIMIT, "health", async {
        let (server_process, addr) = server(&["-l", "127.0.0.1:0", "--user", "hal:health-check-pw"], &[]).await;
        assert!(server_process.log_shows("client link: ", Duration::from_secs(5)).await);
        let before = server_process.log().lines().count();
        let state = TempDir::new("deploy-health");
        let listen = addr.to_string();
        for _ in 0..3 {
            let (status, out) =
                server_command(&["health", "-l", &listen, "--user", "hal:health-check-pw"], state.path()).await;
            assert!(status.success(), "{out}");
            assert!(out.contains(&format!("{addr}: TLS handshake in ")), "{out}");
        }
        // Each probe's close reaches the server as one DEBUG line, and nothing else does.
        assert!(server_process.wait_lines(&["closed before sending anything"], 3, Duration::from_secs(5)).await);
        let log = server_process.log();
        let since: Vec<&str> = log.lines().skip(before).collect();
        assert!(since.len() == 3 && since.iter().all(|l| l.contains("[DEBUG]")), "{since:#?}");
        drop(server_process);
        let (status, out) = server_command(&["health", "-l", &listen, "-p", "x"], state.path()).await;
        assert!(!status.success(), "{out}");
        assert!(out.contains(&format!("anytls-server health: {addr}: cannot connect: ")), "{out}");
    })
    .await
}

#[tokio::test]
async fn links_in_other_clients_spellings_work_and_those_that_cannot_are_refused_at_start() {
    bounded(LIMIT, "link spellings", async {
        let (server, addr) = server(&["-l", "127.0.0.1:0", "--user", "erin:pw"], &[]).await;
        let pin = fingerprint(&server);
        let echo = spawn_echo().await;
        let link = format!("anytls://pw@{addr}/?pinSHA256={pin}&fp=chrome&alpn=h2#Erin%27s%20server");
        let (client_process, proxy) = client(&["-l", ":0", "-s", &link], &[]).await;
        assert!(echoes_via(proxy, "127.0.0.1", echo.port()).await, "{}", client_process.log());
        assert!(client_process.log_shows("the link's fp=chrome", Duration::from_secs(5)).await);
        assert!(client_process.log().contains("the link's alpn=h2"), "{}", client_process.log());

        for (link, reason) in [
            (format!("anytls://pw@{addr}/?security=reality&pbk=key"), "security=reality"),
            (format!("vless://pw@{addr}?security=tls"), "vless:// is another protocol"),
        ] {
            let mut command = Command::new(env!("CARGO_BIN_EXE_anytls-client"));
            command.args(["-l", "127.0.0.1:0", "-s", &link]);
            let mut refused = Process::spawn("anytls-client", command);
            let status = refused.wait_exit(Duration::from_secs(10)).await.expect("the client stops at once");
            assert!(!status.success() && refused.log().contains(reason), "{link}: {}", refused.log());
        }
    })
    .await
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/anytls-server.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains("ExecStart=/usr/local/bin/anytls-server --config /etc/anytls/server.toml"));
    assert!(text.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        announce("SKIP the_systemd_unit_passes_systemd_analyze_verify: no systemd-analyze");
        return;
    }
    // verify also checks that ExecStart exists: point it at the binary under test.
    let dir = TempDir::new("deploy-unit");
    let copy = dir.path().join("anytls-server.service");
    std::fs::write(&copy, text.replace("/usr/local/bin/anytls-server", env!("CARGO_BIN_EXE_anytls-server"))).unwrap();
    let output = Command::new("systemd-analyze").arg("verify").arg(&copy).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && !said.contains("Unknown"), "systemd-analyze verify: {said}");
}

#[test]
fn help_is_grouped_with_value_names_and_every_flag_is_in_the_readme() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for (binary, headings) in [
        (
            env!("CARGO_BIN_EXE_anytls-server"),
            &["Listening and TLS:", "Configuration, users and secrets:", "Outbound pool:"][..],
        ),
        (env!("CARGO_BIN_EXE_anytls-client"), &["Local proxy:", "Servers:", "Server certificate:", "Sessions:"][..]),
    ] {
        let output = Command::new(binary).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        for heading in headings.iter().chain(&["Monitoring:"]) {
            assert!(help.lines().any(|line| line == *heading), "{binary}: no heading {heading}:\n{help}");
        }
        for placeholder in ["<PASSWORDS>", "<SERVERS>", "<USERS>", "<CONNECT_TIMEOUT_SECS>"] {
            assert!(!help.contains(placeholder), "{binary}: {placeholder} in --help");
        }
        let flags = help
            .split_whitespace()
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(|w| w.trim_end_matches(',').split(['=', '[']).next().unwrap().to_string());
        for flag in flags.filter(|f| {
            f != "--help"
                && f != "--version"
                && f.chars().skip(2).all(|c| c.is_ascii_lowercase() || c == '-' || c.is_ascii_digit())
        }) {
            let documented = readme.match_indices(&flag).any(|(at, _)| {
                let next = readme[at + flag.len()..].chars().next().unwrap_or(' ');
                !(next.is_ascii_alphanumeric() || next == '-') && readme[..at].ends_with(['`', ' '])
            });
            assert!(documented, "{binary}: {flag} is not in the README");
        }
    }
}

/// Every table in the README and docs renders: it starts after a blank line with a header
/// and a separator row, and each row has the header's number of cells (a row that follows a
/// paragraph, or an unescaped `|` in a cell, breaks it on the page).
#[test]
fn the_readme_and_docs_tables_are_whole() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let cells = |line: &str| line.trim().trim_matches('|').replace("\\|", "").split('|').count();
    let mut broken = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut in_code = false;
        let mut header = 0;
        for (i, line) in lines.iter().enumerate() {
            if line.starts_with("```") {
                in_code = !in_code;
            }
            if in_code || !line.starts_with('|') {
                header = 0;
                continue;
            }
            let place = format!("{}:{}", file.file_name().unwrap().to_string_lossy(), i + 1);
            if header == 0 {
                let before_is_blank = i == 0 || lines[i - 1].trim().is_empty();
                let separator =
                    lines.get(i + 1).is_some_and(|next| next.starts_with("| ---") || next.starts_with("|---"));
                if !before_is_blank || !separator {
                    broken.push(format!("{place}: a table row outside a table"));
                }
                header = cells(line);
            } else if cells(line) != header {
                broken.push(format!("{place}: {} cells where the header has {header}", cells(line)));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}
