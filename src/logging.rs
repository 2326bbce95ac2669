//! One log format for both binaries: `2026-01-01T00:00:00Z [INFO] message`.

use std::io::Write;

/// INFO by default; `RUST_LOG` overrides (e.g. `RUST_LOG=debug`).
pub fn init() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|out, record| writeln!(out, "{} [{}] {}", out.timestamp_seconds(), record.level(), record.args()))
        .init();
}
