//! `anytls-docgen OUT_DIR`: writes the man pages and the bash, zsh and fish completions
//! of both binaries from their clap definitions, so they cannot drift from `--help`.
//! scripts/build-deb.sh packages what it writes:
//!
//!   OUT_DIR/man/anytls-server.1, OUT_DIR/man/anytls-client.1
//!   OUT_DIR/completions/{bash,zsh,fish}/…  (named as each shell looks them up)

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Command;
use clap_complete::Shell;

fn main() -> ExitCode {
    let Some(out_dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: anytls-docgen OUT_DIR");
        return ExitCode::from(2);
    };
    let commands = [anytls_rs::cli::server::command(), anytls_rs::cli::client::command()];
    match commands.into_iter().try_for_each(|command| write_docs(command, &out_dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("anytls-docgen: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `command`'s man page and its completion script for each shell under `out_dir`.
fn write_docs(mut command: Command, out_dir: &Path) -> std::io::Result<()> {
    let name = command.get_name().to_string();
    let man_dir = out_dir.join("man");
    std::fs::create_dir_all(&man_dir)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    std::fs::write(man_dir.join(format!("{name}.1")), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let shell_dir = out_dir.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&shell_dir)?;
        clap_complete::generate_to(shell, &mut command, &name, &shell_dir)?;
    }
    Ok(())
}
