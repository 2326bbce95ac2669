//! The command line of both binaries: the one place that knows clap. It holds each
//! binary's flags (`server`, `client`), reads `--config` files (`config_file`), and turns
//! flags into the settings types the library exposes; `src/bin/*.rs` only call in.
//!
//! Here are the parts both binaries share: compatibility with the reference binaries'
//! Go-style single-dash long flags (`-sni NAME`, `-padding-scheme FILE`), the keepalive
//! flags, the named values of domain types, and how a binary exits.

pub mod client;
pub mod config_file;
pub mod health;
pub mod server;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};

use crate::client::failover::Policy;
use crate::logging::LogFormat;
use crate::pool::PoolType;
use crate::session::buffers::BufferPoolMode;

/// What `--version` prints after the binary's name: the crate version and the commit it
/// was built from (stamped by build.rs; `unknown` outside a git checkout).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("ANYTLS_COMMIT"), ")");

/// Rewrites `-name` / `-name=value` to `--name…` when `name` is one of `long_flags`,
/// so reference command lines work unchanged; everything else is left alone.
pub fn accept_single_dash_long_flags(args: impl IntoIterator<Item = String>, long_flags: &[&str]) -> Vec<String> {
    args.into_iter()
        .map(|arg| {
            let Some(flag) = arg.strip_prefix('-').filter(|rest| !rest.starts_with('-')) else { return arg };
            let name = flag.split('=').next().unwrap_or_default();
            if name.len() > 1 && long_flags.contains(&name) { format!("-{arg}") } else { arg }
        })
        .collect()
}

/// A duration flag in seconds where 0 means "never" (or "off").
pub fn secs_or_never(secs: u64) -> Option<std::time::Duration> {
    (secs > 0).then(|| std::time::Duration::from_secs(secs))
}

/// How both binaries watch their TCP connections for a peer that vanished (see
/// [`crate::keepalive`]); flattened into each binary's flags.
#[derive(clap::Args, Debug, Clone)]
pub struct KeepaliveArgs {
    /// TCP keepalive on every connection accepted or dialed: quiet time before the first
    /// probe, in seconds (0 = keepalive off).
    #[arg(long, default_value_t = 30, value_name = "SECS", help_heading = "Connections")]
    pub tcp_keepalive_secs: u64,
    /// Time between keepalive probes, in seconds.
    #[arg(long, default_value_t = 15, value_name = "SECS", help_heading = "Connections")]
    pub tcp_keepalive_interval_secs: u64,
    /// Unanswered keepalive probes before the connection is dropped.
    #[arg(long, default_value_t = 4, value_name = "N", help_heading = "Connections")]
    pub tcp_keepalive_probes: u32,
    /// TCP_USER_TIMEOUT: data unacknowledged this long drops the connection, in seconds
    /// (0 = the kernel's default, about 15 minutes).
    #[arg(long, default_value_t = 90, value_name = "SECS", help_heading = "Connections")]
    pub tcp_user_timeout_secs: u64,
}

impl KeepaliveArgs {
    pub fn keepalive(&self) -> crate::keepalive::Keepalive {
        crate::keepalive::Keepalive {
            idle: secs_or_never(self.tcp_keepalive_secs),
            interval: std::time::Duration::from_secs(self.tcp_keepalive_interval_secs.max(1)),
            probes: self.tcp_keepalive_probes.max(1),
            user_timeout: secs_or_never(self.tcp_user_timeout_secs),
        }
    }
}

/// A domain type with a fixed list of named values (`--pool-type lock`): the list and
/// the words come from the type, so a new value needs no change here.
pub trait NamedValue:
    std::str::FromStr<Err: std::error::Error + Send + Sync + 'static> + Clone + Send + Sync + 'static
{
    fn all() -> &'static [Self];
    fn name(&self) -> &'static str;
    /// Shown beside the name in `--help`.
    fn description(&self) -> &'static str;
}

impl NamedValue for PoolType {
    fn all() -> &'static [Self] {
        &PoolType::ALL
    }
    fn name(&self) -> &'static str {
        PoolType::name(*self)
    }
    fn description(&self) -> &'static str {
        PoolType::description(*self)
    }
}

impl NamedValue for BufferPoolMode {
    fn all() -> &'static [Self] {
        &BufferPoolMode::ALL
    }
    fn name(&self) -> &'static str {
        BufferPoolMode::name(*self)
    }
    fn description(&self) -> &'static str {
        BufferPoolMode::description(*self)
    }
}

impl NamedValue for Policy {
    fn all() -> &'static [Self] {
        &Policy::ALL
    }
    fn name(&self) -> &'static str {
        Policy::name(*self)
    }
    fn description(&self) -> &'static str {
        Policy::description(*self)
    }
}

impl NamedValue for LogFormat {
    fn all() -> &'static [Self] {
        &LogFormat::ALL
    }
    fn name(&self) -> &'static str {
        LogFormat::name(*self)
    }
    fn description(&self) -> &'static str {
        LogFormat::description(*self)
    }
}

/// The value parser of a flag taking one of `T`'s names: clap checks and lists the
/// names (in `--help` and errors), `T`'s `FromStr` makes the value.
pub fn named<T: NamedValue>() -> impl TypedValueParser<Value = T> {
    let names = T::all().iter().map(|value| PossibleValue::new(value.name()).help(value.description()));
    PossibleValuesParser::new(names).try_map(|name| name.parse::<T>())
}

/// The one-line help of `--pool-type`: what `engines` are, then each engine's name and
/// what it is made of, from [`PoolType::ALL`].
pub fn pool_type_help(engines: &str) -> String {
    let each = PoolType::ALL.map(|kind| format!("{} ({})", kind.name(), kind.summary()));
    format!("{engines}: {}", each.join(", "))
}

/// How `check` ends, for both binaries: each problem on its own line (stderr), or
/// `configuration OK` (stdout, after the file's name), and the exit code that says which.
pub fn check_report(program: &str, config: Option<&std::path::Path>, problems: &[String]) -> std::process::ExitCode {
    for problem in problems {
        eprintln!("{program} check: {problem}");
    }
    if !problems.is_empty() {
        return std::process::ExitCode::FAILURE;
    }
    let file = config.map(|f| format!("{}: ", f.display())).unwrap_or_default();
    println!("{file}configuration OK");
    std::process::ExitCode::SUCCESS
}

/// A binary's exit: success, or one human line on stderr and a failure code
/// (never a panic or a debug dump).
pub fn exit_with(binary: &str, result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("{binary}: {why}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(args: &[&str]) -> Vec<String> {
        accept_single_dash_long_flags(args.iter().map(|a| a.to_string()), &["sni", "padding-scheme"])
    }

    #[test]
    fn the_keepalive_flags_default_to_the_library_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            keepalive: KeepaliveArgs,
        }
        let flags = Flags::parse_from(["x"]);
        assert_eq!(flags.keepalive.keepalive(), crate::keepalive::Keepalive::default());
        let off = Flags::parse_from(["x", "--tcp-keepalive-secs", "0", "--tcp-user-timeout-secs", "0"]);
        assert_eq!(off.keepalive.keepalive(), crate::keepalive::Keepalive::OFF);
    }

    #[test]
    fn a_named_flag_accepts_exactly_the_names_of_its_type() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[arg(long, value_parser = named::<PoolType>(), default_value_t = PoolType::LockFree)]
            pool_type: PoolType,
        }
        let command = <Flags as clap::CommandFactory>::command();
        let arg = command.get_arguments().find(|arg| arg.get_id() == "pool_type").unwrap();
        let listed: Vec<String> = arg.get_possible_values().iter().map(|v| v.get_name().to_string()).collect();
        assert_eq!(listed, PoolType::ALL.map(|kind| kind.name().to_string()));
        for kind in PoolType::ALL {
            assert_eq!(Flags::parse_from(["x", "--pool-type", kind.name()]).pool_type, kind);
        }
        assert_eq!(Flags::parse_from(["x"]).pool_type, PoolType::LockFree);
        assert!(Flags::try_parse_from(["x", "--pool-type", "mutex"]).is_err());
    }

    #[test]
    fn the_pool_type_help_lists_every_engine() {
        assert_eq!(
            pool_type_help("Outbound pool engine"),
            "Outbound pool engine: lock (a mutex), lockfree (arc-swap + epoch stacks), highperf (sharded)"
        );
    }

    #[test]
    fn reference_style_flags_become_long_flags() {
        assert_eq!(
            rewrite(&["x", "-sni", "a.example", "-padding-scheme=f"]),
            ["x", "--sni", "a.example", "--padding-scheme=f"]
        );
    }

    #[test]
    fn short_flags_values_and_unknown_names_are_untouched() {
        assert_eq!(rewrite(&["-l", "-p", "-snip", "--sni", "-", "-s"]), ["-l", "-p", "-snip", "--sni", "-", "-s"]);
    }
}
