//! Listening with room for bursts, and accepting TCP connections without spinning.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Connections the kernel may queue before we accept them. std and tokio listen with
/// 128, which a burst of new connections overflows: the kernel drops the SYNs beyond it
/// and those clients retry a second later (measured: 200 streams opened at once through
/// the pair had a p99 of 1 s). The kernel caps the value at `net.core.somaxconn` (4096 by
/// default since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// The address a listen flag means: a bare port (`8443`) or one after a colon (`:8443`)
/// is on `host` (the flag's own default: all addresses for the server, loopback for the
/// client's proxy and the API); anything else as given.
pub fn listen_address(value: &str, host: &str) -> String {
    let port = value.strip_prefix(':').unwrap_or(value);
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        format!("{host}:{port}")
    } else {
        value.to_string()
    }
}

/// Listens on `address` (`host:port`; the first resolved address that binds) with
/// [`LISTEN_BACKLOG`].
pub async fn listen(address: &str) -> std::io::Result<TcpListener> {
    listen_with(address, false).await
}

/// As [`listen`]; with `v6_only` an IPv6 address takes IPv6 connections only, so that
/// `[::]:P` and `0.0.0.0:P` can both be listened on (Linux otherwise gives `[::]` the
/// IPv4 connections too, and the second bind fails).
pub async fn listen_with(address: &str, v6_only: bool) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(address).await? {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if addr.is_ipv6() && v6_only {
            socket2::SockRef::from(&socket).set_only_v6(true)?;
        }
        // As std and tokio do: a restarted server can bind again at once.
        socket.set_reuseaddr(true)?;
        if let Err(err) = socket.bind(addr) {
            last_error = Some(err);
            continue;
        }
        return socket.listen(LISTEN_BACKLOG);
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{address} resolves to no address"))
    }))
}

const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts the next connection. Accept errors (typically: out of file descriptors)
/// are logged and retried with a growing pause instead of a busy loop.
pub async fn accept_with_backoff(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    accept_any(std::slice::from_ref(listener), &mut 0).await
}

/// As [`accept_with_backoff`], from whichever of `listeners` has a connection first. The
/// listener looked at first moves on each call (`next`), so a flood on one address
/// cannot starve the others.
pub async fn accept_any(listeners: &[TcpListener], next: &mut usize) -> (TcpStream, SocketAddr) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let accepted = std::future::poll_fn(|cx| {
            for i in 0..listeners.len() {
                let index = (*next + i) % listeners.len();
                if let std::task::Poll::Ready(result) = listeners[index].poll_accept(cx) {
                    *next = index + 1;
                    return std::task::Poll::Ready(result);
                }
            }
            std::task::Poll::Pending
        });
        match accepted.await {
            Ok(accepted) => return accepted,
            Err(err) => {
                log::warn!("accept failed: {err}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_or_colon_port_listens_on_the_flags_host() {
        assert_eq!(listen_address("8443", "0.0.0.0"), "0.0.0.0:8443");
        assert_eq!(listen_address(":8443", "0.0.0.0"), "0.0.0.0:8443");
        assert_eq!(listen_address("[::]:8443", "0.0.0.0"), "[::]:8443");
        assert_eq!(listen_address("example.com:1", "127.0.0.1"), "example.com:1");
        assert_eq!(listen_address(":", "127.0.0.1"), ":");
    }
    use std::time::Instant;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_larger_than_the_default_backlog_connects_without_a_retry() {
        let listener = listen("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Nobody accepts: with the default backlog of 128, connections past it would wait
        // for a SYN retransmission (a second) and time out here.
        let started = Instant::now();
        let connects: Vec<_> = (0..300)
            .map(|_| tokio::spawn(tokio::time::timeout(Duration::from_millis(700), TcpStream::connect(addr))))
            .collect();
        let mut held = Vec::new();
        for connect in connects {
            let tcp = connect.await.unwrap().expect("connected without a SYN retry").unwrap();
            held.push(tcp);
        }
        assert!(started.elapsed() < Duration::from_millis(900), "{:?}", started.elapsed());
        drop(listener);
    }

    #[tokio::test]
    async fn connections_on_every_listener_are_accepted_in_turn() {
        let listeners = vec![listen("127.0.0.1:0").await.unwrap(), listen("127.0.0.1:0").await.unwrap()];
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        // Three waiting on the first, one on the second: the second's is not left behind.
        let mut held = Vec::new();
        for addr in [addrs[0], addrs[0], addrs[0], addrs[1]] {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut next = 0;
        let mut local_ports = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = accept_any(&listeners, &mut next).await;
            local_ports.push(tcp.local_addr().unwrap().port());
        }
        assert_eq!(local_ports, [addrs[0].port(), addrs[1].port()], "one from each, in turn");
    }

    #[tokio::test]
    async fn v6_only_lets_the_ipv4_wildcard_share_a_port_with_the_ipv6_one() {
        let Ok(v6) = listen_with("[::]:0", true).await else { return }; // no IPv6 here
        let port = v6.local_addr().unwrap().port();
        let v4 = listen_with(&format!("0.0.0.0:{port}"), true).await;
        assert!(v4.is_ok(), "{v4:?}");
    }

    #[tokio::test]
    async fn an_address_that_does_not_bind_is_an_error() {
        let taken = listen("127.0.0.1:0").await.unwrap();
        let err = listen(&taken.local_addr().unwrap().to_string()).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
