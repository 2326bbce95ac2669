//! `[[route]]` rules end to end: our server with a config file of rules, our client in
//! front of it as alice and as bob, real targets on loopback. Checked: each kind of
//! condition blocks what it names and nothing else, the first match wins, the SYNACK
//! names the rule, `/metrics` counts every decision by rule, a SIGHUP changes the rules
//! for new streams while open ones go on, and `check` names a bad rule. Upstreams: a
//! second pair of ours as the SOCKS5 and HTTP CONNECT proxy (with a username and
//! password), a dead one, a silent one, one with a wrong password, and a `direct` one
//! bound to another source address.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

fn rules(echo_port: u16, held_port: u16, extra: &str) -> String {
    format!(
        r#"
[[users]]
name = "alice"
password = "alice-route-pw"

[[users]]
name = "bob"
password = "bob-route-pw"

[[route]]
name = "ads"
domain-suffix = "ads.test"
action = "block"

[[route]]
name = "lists"
rule-set = "blocked.txt"
action = "block"

# First match wins: this never sees what "ads" took.
[[route]]
name = "keyword-ok"
domain-keyword = "ads"
action = "direct"

[[route]]
name = "bob-no-echo"
user = "bob"
port = {echo_port}
action = "block"

[[route]]
name = "loopback-held"
ip-cidr = "127.0.0.0/8"
port = "{held_port}-{held_port}"
network = "tcp"
action = "block"
{extra}"#
    )
}

/// SOCKS5 CONNECT through `proxy`: the reply code.
async fn connect_code(proxy: SocketAddr, host: &str, port: u16) -> u8 {
    socks5_connect(proxy, host, port).await.expect("SOCKS5 to our client").0
}

async fn server_with(config: &Path) -> (Server, SocketAddr) {
    start_server_with_api(&["--config", &config.display().to_string()]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_rules_block_what_they_name_count_by_rule_and_reload_on_sighup() {
    bounded(LIMIT, "routes", async {
        let dir = TempDir::new("routing");
        let (echo, held) = (spawn_echo().await, spawn_echo().await);
        std::fs::write(dir.path().join("blocked.txt"), "# trackers\nfull:tracker.test\n127.0.0.3/32\n").unwrap();
        let config = dir.path().join("server.toml");
        std::fs::write(&config, rules(echo.port(), held.port(), "")).unwrap();
        let (server, api) = server_with(&config).await;
        let pin = server.fingerprint.clone().expect("a self-signed pin");
        let trust = ["--pin-sha256", pin.as_str()];
        let alice = start_client(server.addr, "alice-route-pw", &trust).await;
        let bob = start_client(server.addr, "bob-route-pw", &trust).await;
        assert!(
            server.process.log_shows("route rules, first match wins, then direct: ads (block)", STARTUP_TIMEOUT).await
        );

        // Direct: no rule matches (or "keyword-ok" does).
        assert!(echoes_via(alice.addr, "127.0.0.1", echo.port()).await, "{}", server.process.log());
        assert!(echoes_via(alice.addr, "localhost", echo.port()).await);
        // Blocked by name, without a lookup (the names do not exist): a refusal, at once.
        for (host, rule) in [("ads.test", "ads"), ("x.ads.test", "ads"), ("tracker.test", "lists")] {
            assert_ne!(connect_code(alice.addr, host, 443).await, SOCKS5_OK, "{host}");
            let line = format!("{host}:443 is blocked by route {rule}");
            assert!(server.process.log_shows(&line, Duration::from_secs(5)).await, "{line}\n{}", server.process.log());
        }
        // "keyword-ok" comes after "ads": an ads name not under ads.test goes direct (and
        // fails to resolve: a dial error, not a rule's refusal).
        let _ = connect_code(alice.addr, "myads.invalid", 443).await;
        // By address: the rule set's range, and a range after resolution on one port only.
        assert_ne!(connect_code(alice.addr, "127.0.0.3", echo.port()).await, SOCKS5_OK);
        assert!(!echoes_via(alice.addr, "localhost", held.port()).await, "localhost resolves into 127.0.0.0/8");
        assert!(!echoes_via(alice.addr, "127.0.0.1", held.port()).await);
        // By user: bob may not reach the echo port; alice may.
        assert!(!echoes_via(bob.addr, "127.0.0.1", echo.port()).await);
        assert!(echoes_via(alice.addr, "127.0.0.1", echo.port()).await);

        let (_, metrics) = api_get(api, "/metrics", None).await;
        let count = |rule: &str, action: &str| {
            counter_sample(&metrics, &format!("anytls_route_decisions_total{{rule=\"{rule}\",action=\"{action}\"}}"))
        };
        assert_eq!(count("ads", "block"), Some(2), "{metrics}");
        assert_eq!(count("lists", "block"), Some(2), "{metrics}");
        assert_eq!(count("keyword-ok", "direct"), Some(1), "{metrics}");
        assert_eq!(count("bob-no-echo", "block"), Some(1), "{metrics}");
        assert_eq!(count("loopback-held", "block"), Some(2), "{metrics}");
        assert_eq!(count("default", "direct"), Some(3), "{metrics}");
        assert_eq!(counter_sample(&metrics, "anytls_policy_refused_total{reason=\"route\"}"), Some(7), "{metrics}");

        // A stream open before the reload goes on; new ones see the new rules.
        let (code, mut open) = socks5_connect(alice.addr, "127.0.0.1", echo.port()).await.unwrap();
        assert_eq!(code, SOCKS5_OK);
        let extra = format!(
            "\n[[route]]\nname = \"alice-no-echo\"\nuser = \"alice\"\nport = {}\naction = \"block\"\n",
            echo.port()
        );
        std::fs::write(&config, rules(echo.port(), held.port(), &extra)).unwrap();
        server.process.signal("HUP");
        assert!(server.process.log_shows("6 route rules", Duration::from_secs(10)).await, "{}", server.process.log());
        assert!(!echoes_via(alice.addr, "127.0.0.1", echo.port()).await, "the new rule blocks alice");
        open.write_all(b"still").await.unwrap();
        let mut back = [0u8; 5];
        open.read_exact(&mut back).await.expect("the open stream goes on");
        let (_, metrics) = api_get(api, "/metrics", None).await;
        let kept = counter_sample(&metrics, "anytls_route_decisions_total{rule=\"ads\",action=\"block\"}");
        assert_eq!(kept, Some(2), "a kept rule keeps its count across the reload: {metrics}");
        assert!(metrics.contains("rule=\"alice-no-echo\",action=\"block\"} 1"), "{metrics}");
    })
    .await
}

/// `check` (and so a reload) names a bad rule: an unknown key with its line and the key it
/// was meant as, a bad action by rule name, an unreadable rule set.
#[tokio::test]
async fn check_names_a_bad_rule() {
    bounded(LIMIT, "route check", async {
        let dir = TempDir::new("routing-check");
        let cases = [
            (
                "[[route]]\nname = \"a\"\ndomian-suffix = \"x.test\"\naction = \"block\"\n",
                "bad.toml:4: unknown key `domian-suffix` in [[route]] #1",
            ),
            (
                "[[route]]\nname = \"a\"\naction = \"drop\"\n",
                "[[route]] a: action \"drop\": expected \"direct\", \"block\" or \"upstream:NAME\"",
            ),
            ("[[route]]\nrule-set = \"missing.txt\"\naction = \"block\"\n", "missing.txt: cannot read"),
            (
                "[[route]]\nname = \"w\"\naction = \"upstream:warp\"\n",
                "[[route]] w: action \"upstream:warp\": no [[upstream]] is named \"warp\" (there are: none)",
            ),
            (
                "[[upstream]]\nname = \"warp\"\ntype = \"socks5\"\naddres = \"127.0.0.1:1\"\n",
                "bad.toml:5: unknown key `addres` in [[upstream]] #1",
            ),
        ];
        for (text, expected) in cases {
            let file = dir.path().join("bad.toml");
            std::fs::write(&file, format!("password = \"check-route-pw\"\n{text}")).unwrap();
            let (status, out) = server_command(&["check", "--config", &file.display().to_string()], dir.path()).await;
            assert!(!status.success() && out.contains(expected), "{expected}:\n{out}");
        }
    })
    .await
}

/// Answers each connection with the address it came from, then closes.
async fn spawn_peer_teller() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, peer)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.write_all(peer.ip().to_string().as_bytes()).await;
            });
        }
    });
    addr
}

/// Greets first (`HELLO\n`, as SMTP or SSH servers do), then echoes.
async fn spawn_greeter() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                tcp.write_all(b"HELLO\n").await?;
                let (mut read, mut write) = tcp.split();
                tokio::io::copy(&mut read, &mut write).await.map(drop)
            });
        }
    });
    addr
}

/// Accepts and never answers: an upstream that hangs.
async fn spawn_silent() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    (addr, task)
}

async fn read_some(tcp: &mut tokio::net::TcpStream, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut got)).await.expect("in time").expect("bytes");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_carry_what_rules_send_them_and_a_bad_one_fails_the_stream_clearly() {
    bounded(LIMIT, "upstreams", async {
        // The upstream proxy: a second pair of ours, its local port asking for a password.
        let far = start_server("far-pw", &[]).await;
        let far_pin = far.fingerprint.clone().expect("a self-signed pin");
        let proxy_args = ["--pin-sha256", far_pin.as_str(), "--socks-user", "up", "--socks-pass", "up-pw"];
        let proxy = start_client(far.addr, "far-pw", &proxy_args).await;
        let (echo, greeter, teller) = (spawn_echo().await, spawn_greeter().await, spawn_peer_teller().await);
        let (silent, _silent_task) = spawn_silent().await;
        let dead = free_port();

        let dir = TempDir::new("routing-upstreams");
        let config = dir.path().join("server.toml");
        let text = format!(
            r#"
password = "near-pw"

[[upstream]]
name = "socks"
type = "socks5"
address = "{proxy}"
username = "up"
password = "up-pw"

[[upstream]]
name = "web"
type = "http"
address = "{proxy}"
username = "up"
password = "up-pw"

[[upstream]]
name = "wrong-password"
type = "socks5"
address = "{proxy}"
username = "up"
password = "not-it"

[[upstream]]
name = "dead"
type = "http"
address = "127.0.0.1:{dead}"

[[upstream]]
name = "silent"
type = "socks5"
address = "{silent}"
connect-timeout-secs = 1

[[upstream]]
name = "second-address"
type = "direct"
bind-address = "127.0.0.2"

[[route]]
name = "echo-via-socks"
port = {echo_port}
action = "upstream:socks"

[[route]]
name = "greeter-via-web"
port = {greeter_port}
action = "upstream:web"

[[route]]
name = "to-wrong"
domain = "wrong.test"
action = "upstream:wrong-password"

[[route]]
name = "to-dead"
domain = "dead.test"
action = "upstream:dead"

[[route]]
name = "to-silent"
domain = "silent.test"
action = "upstream:silent"

[[route]]
name = "teller-bound"
port = {teller_port}
action = "upstream:second-address"
"#,
            proxy = proxy.addr,
            echo_port = echo.port(),
            greeter_port = greeter.port(),
            teller_port = teller.port(),
        );
        std::fs::write(&config, text).unwrap();
        let (near, api) = server_with(&config).await;
        let pin = near.fingerprint.clone().expect("a self-signed pin");
        let client = start_client(near.addr, "near-pw", &["--pin-sha256", pin.as_str()]).await;
        assert!(near.process.log_shows("upstream socks: socks5 at", STARTUP_TIMEOUT).await, "{}", near.process.log());

        // SOCKS5 with a password; the name goes to the upstream as a name.
        assert!(echoes_via(client.addr, "localhost", echo.port()).await, "{}", near.process.log());
        let asked = format!("-> localhost:{} ", echo.port());
        assert!(
            far.process.log_shows(&asked, Duration::from_secs(5)).await,
            "the far server dialed it:\n{}",
            far.process.log()
        );
        assert!(echoes_via(client.addr, "127.0.0.1", echo.port()).await);

        // HTTP CONNECT; the target speaks first, and its greeting arrives.
        let (code, mut greeted) = socks5_connect(client.addr, "127.0.0.1", greeter.port()).await.unwrap();
        assert_eq!(code, SOCKS5_OK, "{}", near.process.log());
        assert_eq!(read_some(&mut greeted, 6).await, b"HELLO\n");
        greeted.write_all(b"ping").await.unwrap();
        assert_eq!(read_some(&mut greeted, 4).await, b"ping");
        drop(greeted);

        // `direct` bound to 127.0.0.2: the target sees that address.
        let (code, mut told) = socks5_connect(client.addr, "127.0.0.1", teller.port()).await.unwrap();
        assert_eq!(code, SOCKS5_OK, "{}", near.process.log());
        assert_eq!(read_some(&mut told, 9).await, b"127.0.0.2");

        // Failures: a clear refusal, at once or within the upstream's own timeout.
        let started = std::time::Instant::now();
        assert_eq!(connect_code(client.addr, "dead.test", 80).await, SOCKS5_REFUSED);
        let line = "dial dead.test:80 via upstream dead: upstream 127.0.0.1:";
        assert!(near.process.log_shows(line, Duration::from_secs(5)).await, "{}", near.process.log());
        assert_ne!(connect_code(client.addr, "wrong.test", 80).await, SOCKS5_OK);
        let line = "via upstream wrong-password: upstream ";
        assert!(near.process.log_shows(line, Duration::from_secs(5)).await, "{}", near.process.log());
        assert!(near.process.log().contains("it refused the username and password"), "{}", near.process.log());
        assert_eq!(connect_code(client.addr, "silent.test", 80).await, SOCKS5_TIMED_OUT);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(8), "the silent upstream's 1 s timeout bounds it: {took:?}");

        let (_, metrics) = api_get(api, "/metrics", None).await;
        let upstream = |family: &str, name: &str| {
            counter_sample(&metrics, &format!("anytls_upstream_{family}_total{{upstream=\"{name}\"}}"))
        };
        assert_eq!(upstream("streams", "socks"), Some(2), "{metrics}");
        assert_eq!(upstream("failures", "socks"), Some(0), "{metrics}");
        assert_eq!(upstream("streams", "web"), Some(1), "{metrics}");
        assert_eq!(upstream("streams", "second-address"), Some(1), "{metrics}");
        for failed in ["dead", "wrong-password", "silent"] {
            assert_eq!(upstream("failures", failed), Some(1), "{failed}: {metrics}");
        }
        let decided = "anytls_route_decisions_total{rule=\"echo-via-socks\",action=\"upstream:socks\"}";
        assert_eq!(counter_sample(&metrics, decided), Some(2), "{metrics}");
    })
    .await
}

/// `--dns-strategy`: `ipv6-only` refuses a name with IPv4 addresses only (or dials its
/// IPv6 one, where the echo is not), `ipv4-only` and `prefer-ipv6` reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns_strategy_chooses_which_family_a_name_is_dialed_on() {
    bounded(LIMIT, "dns strategy", async {
        let echo = spawn_echo().await;
        for (strategy, reaches) in [("ipv6-only", false), ("ipv4-only", true), ("prefer-ipv6", true)] {
            let server = start_server("dns-pw", &["--dns-strategy", strategy]).await;
            let pin = server.fingerprint.clone().expect("a self-signed pin");
            let client = start_client(server.addr, "dns-pw", &["--pin-sha256", pin.as_str()]).await;
            assert_eq!(
                echoes_via(client.addr, "localhost", echo.port()).await,
                reaches,
                "{strategy}: {}",
                server.process.log()
            );
            // An address is dialed as given, whatever the strategy.
            assert!(echoes_via(client.addr, "127.0.0.1", echo.port()).await, "{strategy}");
            if !reaches {
                let log = server.process.log();
                assert!(log.contains("no IPv6 address (--dns-strategy ipv6-only)") || log.contains("[::1]"), "{log}");
            }
        }
    })
    .await
}
