//! `anytls-bench`: a load generator for SOCKS5 proxies, with its own loopback targets.
//!
//! Each subcommand is one bounded run (a count and `--max-seconds`) that prints
//! one human line, or one JSON object with `--json`. The exit status is 0 when
//! everything asked for was done without failures, 1 otherwise.

mod bulk;
mod hold;
mod quiet;
mod report;
mod route;
mod rr;
mod stats;
mod target;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use bulk::{Bulk, Direction};
use hold::Hold;
use quiet::Quiet;
use route::Route;
use rr::Rr;

/// Load generator for SOCKS5 proxies (and the direct baseline), with loopback targets.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the targets (echo, HTTP `GET /bytes/N`, bulk sink/source) until killed;
    /// prints their addresses as one JSON line.
    Target(TargetArgs),
    /// Throughput: move N bytes over K parallel streams (download, then upload).
    Bulk(BulkArgs),
    /// Request/response with a new stream per request: latency and streams/s.
    Rr(RrArgs),
    /// N concurrent long-lived streams with a trickle of traffic; reports failures.
    Hold(HoldArgs),
    /// A wave of N streams held open together and silent for a while, then echoing
    /// again: counts refused and dropped streams.
    Quiet(QuietArgs),
    /// Prints hosts-file lines `127.x.y.z t<i>.<SUFFIX>` for the names `rr --target-names`
    /// sends, each at the address `rr` uses for the same destination without names.
    Hosts(HostsArgs),
}

#[derive(Args, Debug)]
struct HostsArgs {
    /// How many names (as `rr --distinct-targets`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    distinct_targets: u32,
    /// The names' suffix (as `rr --target-names`).
    #[arg(long, value_name = "SUFFIX", value_parser = rr::parse_name_suffix)]
    target_names: String,
}

#[derive(Args, Debug)]
struct TargetArgs {
    /// Address to bind; port 0 picks three free ports, port P uses P, P+1, P+2.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

/// How to reach the target: exactly one of --socks and --direct.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct RouteArgs {
    /// SOCKS5 proxy (no authentication) to send the load through.
    #[arg(long, value_name = "ADDR")]
    socks: Option<SocketAddr>,
    /// Connect to the target directly (the baseline).
    #[arg(long)]
    direct: bool,
}

impl RouteArgs {
    fn route(&self) -> Route {
        self.socks.map_or(Route::Direct, Route::Socks)
    }
}

/// Options every load subcommand shares.
#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    route: RouteArgs,
    /// `inproc` starts the targets in this process; otherwise the address of the
    /// matching target port of a running `anytls-bench target`.
    #[arg(long, default_value = "inproc")]
    target: TargetSpec,
    /// Hard limit on the run's duration, in seconds.
    #[arg(long, default_value_t = 60)]
    max_seconds: u64,
    /// Print one JSON object instead of the human line.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct BulkArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Bytes per direction over all streams (suffixes K, M, G = KiB, MiB, GiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    bytes: u64,
    /// Parallel streams.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    streams: u64,
    /// Directions to measure.
    #[arg(long, value_enum, default_value_t = Direction::Both)]
    direction: Direction,
}

#[derive(Args, Debug)]
struct RrArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Requests in all (each on a new connection).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Response body size in bytes (suffixes K, M, G).
    #[arg(long, default_value = "1K", value_parser = parse_size)]
    size: u64,
    /// Spread the requests over this many destinations 127.0.0.1, 127.0.0.2, … (with
    /// --target's port; the target must listen on 0.0.0.0). 0: --target only.
    #[arg(long, default_value_t = 0)]
    distinct_targets: u32,
    /// With --distinct-targets: the index of the first request's destination.
    #[arg(long, default_value_t = 0)]
    target_offset: u64,
    /// With --distinct-targets: send this many requests in a row to each destination
    /// (they are in flight together), then move to the next.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    repeat: u64,
    /// With --distinct-targets and --socks: send destination i as the SOCKS5 name
    /// `t<i>.<SUFFIX>` instead of its address, for the proxy's server to resolve (see the
    /// `hosts` subcommand). Not with --direct: the bench would resolve the names itself,
    /// and the baseline would no longer be the plain connection the proxies are compared to.
    #[arg(long, value_name = "SUFFIX", value_parser = rr::parse_name_suffix, conflicts_with = "direct")]
    target_names: Option<String>,
}

impl RrArgs {
    /// What clap cannot say: names need destinations to name.
    fn check(&self) -> Result<(), String> {
        if self.target_names.is_some() && self.distinct_targets == 0 {
            return Err("--target-names needs --distinct-targets N (names t0 .. t<N-1>)".into());
        }
        Ok(())
    }
}

#[derive(Args, Debug)]
struct HoldArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Concurrent streams.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    streams: u64,
    /// How long every stream stays open, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Time between one stream's messages, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    interval_ms: u64,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    open_concurrency: u64,
}

#[derive(Args, Debug)]
struct QuietArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Streams held open together.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=200_000))]
    streams: u64,
    /// How long every stream stays silent once all are open, in seconds.
    #[arg(long, default_value_t = 10.0)]
    quiet_secs: f64,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    open_concurrency: u64,
    /// Echo target expected to stop answering during the wave (its streams are
    /// reported apart and do not fail the run).
    #[arg(long, value_name = "ADDR", requires = "stall_streams")]
    stall_target: Option<SocketAddr>,
    /// Extra streams to --stall-target.
    #[arg(long, default_value_t = 0, requires = "stall_target")]
    stall_streams: u64,
    /// Time an open or an echo may take before the stream counts as failed, in seconds.
    #[arg(long, default_value_t = 10.0)]
    echo_timeout_secs: f64,
}

/// Where the load goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetSpec {
    InProcess,
    Addr(SocketAddr),
}

impl std::str::FromStr for TargetSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "inproc" {
            return Ok(TargetSpec::InProcess);
        }
        s.parse().map(TargetSpec::Addr).map_err(|_| format!("expected `inproc` or IP:PORT, got {s:?}"))
    }
}

/// A byte count with an optional binary suffix: `512`, `64K`, `256M`, `1G` (also `KiB`...).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return Err(format!("unknown size suffix {suffix:?} (use K, M or G)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("size too large: {s:?}"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // A big `quiet` or `hold` needs one descriptor per stream (and the in-process target
    // another), far above the usual soft limit of 1,024.
    let fds = anytls_rs::resources::raise_fd_limit();
    log::debug!("open files limit: {fds}");
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(why) => {
            eprintln!("anytls-bench: {why}");
            ExitCode::from(1)
        }
    }
}

/// Runs one subcommand; `Ok(false)` when the run had failures.
#[tokio::main]
async fn run(command: Command) -> Result<bool, String> {
    let (run_args, pick): (&RunArgs, fn(target::Targets) -> SocketAddr) = match &command {
        Command::Target(args) => return serve_targets(args.listen).await,
        Command::Hosts(args) => {
            for line in rr::hosts_lines(args.distinct_targets, &args.target_names) {
                println!("{line}");
            }
            return Ok(true);
        }
        Command::Bulk(a) => (&a.run, |t| t.bulk),
        Command::Rr(a) => {
            a.check()?;
            (&a.run, |t| t.http)
        }
        Command::Hold(a) => (&a.run, |t| t.echo),
        Command::Quiet(a) => (&a.run, |t| t.echo),
    };
    let target = match run_args.target {
        TargetSpec::Addr(addr) => addr,
        TargetSpec::InProcess => {
            let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
            pick(target::start(loopback).await.map_err(|e| format!("cannot start the targets: {e}"))?)
        }
    };
    let route = run_args.route.route();
    let json = run_args.json;
    let deadline = Instant::now() + Duration::from_secs(run_args.max_seconds);
    let report = match command {
        Command::Target(_) | Command::Hosts(_) => unreachable!("done above"),
        Command::Bulk(a) => {
            Bulk { route, target, bytes: a.bytes, streams: a.streams as usize, direction: a.direction, deadline }
                .run()
                .await
        }
        Command::Rr(a) => {
            Rr {
                route,
                target,
                requests: a.requests,
                concurrency: a.concurrency as usize,
                size: a.size,
                distinct_targets: a.distinct_targets,
                target_offset: a.target_offset,
                repeat: a.repeat,
                target_names: a.target_names,
                deadline,
            }
            .run()
            .await
        }
        Command::Hold(a) => {
            Hold {
                route,
                target,
                streams: a.streams as usize,
                seconds: a.seconds.max(0.0),
                interval: Duration::from_millis(a.interval_ms),
                open_concurrency: a.open_concurrency as usize,
                deadline,
            }
            .run()
            .await
        }
        Command::Quiet(a) => {
            Quiet {
                route,
                target,
                streams: a.streams as usize,
                quiet: Duration::from_secs_f64(a.quiet_secs.max(0.0)),
                open_concurrency: a.open_concurrency as usize,
                stall_target: a.stall_target,
                stall_streams: a.stall_streams as usize,
                echo_timeout: Duration::from_secs_f64(a.echo_timeout_secs.max(0.001)),
                deadline,
            }
            .run()
            .await
        }
    };
    report.print(json);
    Ok(report.ok)
}

/// `target`: serves until the process is killed.
async fn serve_targets(listen: SocketAddr) -> Result<bool, String> {
    let targets = target::start(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    println!("{}", targets.to_json());
    std::future::pending::<()>().await;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("anytls-bench").chain(args.iter().copied()))
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("1T").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn bulk_with_socks_and_defaults() {
        let cli = parse(&["bulk", "--socks", "127.0.0.1:1080", "--bytes", "1G", "--streams", "4"]).unwrap();
        let Command::Bulk(a) = cli.command else { panic!("not bulk") };
        assert_eq!(a.run.route.route(), Route::Socks("127.0.0.1:1080".parse().unwrap()));
        assert_eq!((a.bytes, a.streams, a.direction), (1 << 30, 4, Direction::Both));
        assert_eq!((a.run.target, a.run.max_seconds, a.run.json), (TargetSpec::InProcess, 60, false));
    }

    #[test]
    fn rr_direct_with_target_address_and_json() {
        let cli = parse(&[
            "rr",
            "--direct",
            "--requests",
            "50",
            "--concurrency",
            "4",
            "--size",
            "2K",
            "--target",
            "127.0.0.1:9000",
            "--json",
            "--max-seconds",
            "5",
        ])
        .unwrap();
        let Command::Rr(a) = cli.command else { panic!("not rr") };
        assert_eq!(a.run.route.route(), Route::Direct);
        assert_eq!((a.requests, a.concurrency, a.size), (50, 4, 2048));
        assert_eq!(a.run.target, TargetSpec::Addr("127.0.0.1:9000".parse().unwrap()));
        assert!(a.run.json);
        assert_eq!(a.run.max_seconds, 5);
    }

    #[test]
    fn hold_defaults() {
        let cli = parse(&["hold", "--socks", "127.0.0.1:1", "--streams", "10", "--seconds", "2"]).unwrap();
        let Command::Hold(a) = cli.command else { panic!("not hold") };
        assert_eq!((a.streams, a.seconds, a.interval_ms, a.open_concurrency), (10, 2.0, 1000, 64));
    }

    #[test]
    fn quiet_defaults_and_stall_options_go_together() {
        let cli = parse(&["quiet", "--socks", "127.0.0.1:1", "--streams", "5000", "--quiet-secs", "12"]).unwrap();
        let Command::Quiet(a) = cli.command else { panic!("not quiet") };
        assert_eq!((a.streams, a.quiet_secs, a.open_concurrency, a.stall_streams), (5000, 12.0, 64, 0));
        assert_eq!(a.stall_target, None);
        assert!(parse(&["quiet", "--direct", "--stall-streams", "3"]).is_err());
        assert!(parse(&["quiet", "--direct", "--stall-target", "127.0.0.1:9"]).is_err());
        let cli = parse(&["quiet", "--direct", "--stall-target", "127.0.0.1:9", "--stall-streams", "3"]).unwrap();
        let Command::Quiet(a) = cli.command else { panic!("not quiet") };
        assert_eq!((a.stall_target, a.stall_streams), (Some("127.0.0.1:9".parse().unwrap()), 3));
    }

    #[test]
    fn rr_distinct_targets() {
        let cli = parse(&["rr", "--direct", "--distinct-targets", "20000"]).unwrap();
        let Command::Rr(a) = cli.command else { panic!("not rr") };
        assert_eq!(a.distinct_targets, 20_000);
        assert_eq!((a.repeat, a.target_names), (1, None));
    }

    #[test]
    fn rr_target_names_go_through_socks_only_and_need_destinations() {
        let cli = parse(&[
            "rr",
            "--socks",
            "127.0.0.1:1080",
            "--distinct-targets",
            "500",
            "--target-names",
            "Bench.Test",
            "--repeat",
            "2",
        ])
        .unwrap();
        let Command::Rr(a) = cli.command else { panic!("not rr") };
        assert_eq!((a.distinct_targets, a.repeat, a.target_names.as_deref()), (500, 2, Some("bench.test")));
        assert_eq!(a.check(), Ok(()));
        let err = parse(&["rr", "--direct", "--distinct-targets", "5", "--target-names", "bench.test"]).unwrap_err();
        assert!(err.to_string().contains("--direct"), "{err}");
        assert!(parse(&["rr", "--socks", "127.0.0.1:1", "--distinct-targets", "5", "--target-names", "a..b"]).is_err());
        assert!(parse(&["rr", "--direct", "--repeat", "0"]).is_err());
        let cli = parse(&["rr", "--socks", "127.0.0.1:1", "--target-names", "bench.test"]).unwrap();
        let Command::Rr(a) = cli.command else { panic!("not rr") };
        assert!(a.check().unwrap_err().contains("--distinct-targets"));
    }

    #[test]
    fn hosts_takes_a_count_and_a_suffix() {
        let cli = parse(&["hosts", "--distinct-targets", "3", "--target-names", "bench.test"]).unwrap();
        let Command::Hosts(a) = cli.command else { panic!("not hosts") };
        assert_eq!((a.distinct_targets, a.target_names.as_str()), (3, "bench.test"));
        assert!(parse(&["hosts", "--distinct-targets", "0", "--target-names", "bench.test"]).is_err());
        assert!(parse(&["hosts", "--distinct-targets", "3"]).is_err());
        assert!(parse(&["hosts", "--distinct-targets", "3", "--target-names", "bad_name"]).is_err());
    }

    #[test]
    fn route_is_required_and_exclusive() {
        assert!(parse(&["rr"]).is_err());
        assert!(parse(&["rr", "--direct", "--socks", "127.0.0.1:1"]).is_err());
        assert!(parse(&["bulk", "--socks", "not-an-address"]).is_err());
    }

    #[test]
    fn rejects_bad_numbers_and_targets() {
        assert!(parse(&["bulk", "--direct", "--streams", "0"]).is_err());
        assert!(parse(&["rr", "--direct", "--requests", "0"]).is_err());
        assert!(parse(&["rr", "--direct", "--target", "elsewhere"]).is_err());
        assert!(parse(&["bulk", "--direct", "--bytes", "12X"]).is_err());
    }

    #[test]
    fn target_listen_default() {
        let cli = parse(&["target"]).unwrap();
        let Command::Target(a) = cli.command else { panic!("not target") };
        assert_eq!(a.listen, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
    }
}
