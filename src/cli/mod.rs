//! Command-line compatibility with the reference binaries, which use Go-style
//! single-dash long flags (`-sni NAME`, `-padding-scheme FILE`).

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
