//! `anytls-client`: a local SOCKS5/SOCKS4/HTTP proxy that tunnels over AnyTLS.

// jemalloc gives memory back after waves of load; glibc malloc kept growing (docs/memory.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// jemalloc's options: a background thread hands freed pages back after about a second,
/// also while the process is idle (without it only new allocations trigger that).
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    anytls_rs::cli::client::main()
}
