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
