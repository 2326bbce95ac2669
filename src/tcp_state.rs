//! What the kernel knows of a TCP connection that we are not reading: whether the
//! peer has closed it.
//!
//! A connection we stopped reading (backpressure) or have not read yet (a warm
//! outbound connection) can hide its peer's FIN or RST behind queued bytes, or simply
//! because nobody polls it. The socket's TCP state says so without reading.

use std::os::fd::AsRawFd;

/// Whether the peer has closed or reset the connection (or the socket is unusable).
/// States from `linux/tcp.h`: CLOSE_WAIT (peer sent FIN), CLOSE, LAST_ACK, and the
/// closing ones after our own FIN.
pub fn peer_closed(socket: &impl AsRawFd) -> bool {
    peer_closed_fd(socket.as_raw_fd())
}

/// As [`peer_closed`], for a descriptor the caller knows is still open.
pub fn peer_closed_fd(fd: std::os::fd::RawFd) -> bool {
    const TCP_ESTABLISHED: u8 = 1;
    const TCP_SYN_SENT: u8 = 2;
    const TCP_SYN_RECV: u8 = 3;
    const TCP_FIN_WAIT1: u8 = 4;
    const TCP_FIN_WAIT2: u8 = 5;
    // SAFETY: tcp_info is plain old data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let got = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    if got != 0 {
        return true;
    }
    !matches!(info.tcpi_state, TCP_ESTABLISHED | TCP_SYN_SENT | TCP_SYN_RECV | TCP_FIN_WAIT1 | TCP_FIN_WAIT2)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (ours, theirs) = tokio::join!(TcpStream::connect(listener.local_addr().unwrap()), listener.accept());
        (ours.unwrap(), theirs.unwrap().0)
    }

    async fn eventually_closed(socket: &TcpStream) -> bool {
        for _ in 0..50 {
            if peer_closed(socket) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn an_open_connection_is_not_closed() {
        let (ours, _theirs) = pair().await;
        assert!(!peer_closed(&ours));
    }

    #[tokio::test]
    async fn a_fin_behind_unread_bytes_is_seen() {
        let (ours, mut theirs) = pair().await;
        theirs.write_all(b"220 greeting\r\n").await.unwrap();
        drop(theirs);
        assert!(eventually_closed(&ours).await, "FIN behind a greeting");
    }

    #[tokio::test]
    async fn a_reset_is_seen() {
        let (ours, theirs) = pair().await;
        theirs.set_zero_linger().unwrap();
        drop(theirs);
        assert!(eventually_closed(&ours).await, "RST");
    }
}
