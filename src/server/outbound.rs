//! Serving one stream: read its destination, dial it, answer SYNACK, relay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::ServerContext;
use super::access_log::{Network, Outcome, StreamClient, Traffic};
pub use super::dial::{DialError, Dialer, LookupOwner};
use super::limits::StreamTicket;
use super::outbound_pool::Outbound;
use super::udp::{UdpSettings, serve_udp};
use super::upstream::Connected;
use crate::framed::{Framed, ReadError};
use crate::proto::Address;
use crate::proto::address::AddressDecoder;
use crate::proto::udp::is_udp_over_tcp;
use crate::session::{RelayError, Stream, relay_to_end};

/// The reference client closes a reused session whose SYN gets no SYNACK within
/// 3 s. From the SYN on, answer by this time: a destination not received by then is
/// refused, and a dial still going is answered "ok" (a later failure then ends the
/// stream with FIN).
const SYNACK_BUDGET: Duration = Duration::from_millis(2500);
/// Longest destination in SOCKS form: type, length, 255-byte name, port.
const MAX_ADDRESS_LEN: usize = 1 + 1 + 255 + 2;

/// Reads the destination from the stream's first data; returns it with whatever
/// payload followed it in the same frames.
async fn read_destination(stream: &mut Stream) -> Result<(Address, BytesMut), NoDestination> {
    let mut framed = Framed::new(AddressDecoder::socks(), MAX_ADDRESS_LEN);
    match framed.next(stream).await {
        Ok(Some(address)) => Ok((address, framed.into_buffer())),
        Ok(None) | Err(ReadError::Truncated { .. }) => Err(NoDestination::Closed),
        Err(ReadError::TooLong { .. }) => Err(NoDestination::TooLong),
        Err(ReadError::Decode(err)) => Err(NoDestination::Invalid(err.to_string())),
        Err(ReadError::Read(err)) => Err(NoDestination::Stream(err.to_string())),
        Err(ReadError::TimedOut) => Err(NoDestination::InTime),
    }
}

/// Why a stream got no destination; the text is its SYNACK error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum NoDestination {
    #[error("stream closed before its destination")]
    Closed,
    #[error("destination address too long")]
    TooLong,
    #[error("invalid destination address: {0}")]
    Invalid(String),
    #[error("{0}")]
    Stream(String),
    #[error("no destination received within {SYNACK_BUDGET:?}")]
    InTime,
}

/// Serves one stream to the end, then writes its access log record. `client` names
/// the client in logs; `ticket` is the stream's place under the server's caps, given
/// back when the stream ends; names it needs are `lookups`'s (its session's).
pub async fn serve_stream(
    mut stream: Stream,
    context: Arc<ServerContext>,
    udp: UdpSettings,
    client: StreamClient,
    ticket: StreamTicket,
    lookups: LookupOwner,
) {
    let started = Instant::now();
    let synack_deadline = tokio::time::Instant::now() + SYNACK_BUDGET;
    let destination = tokio::time::timeout_at(synack_deadline, read_destination(&mut stream)).await;
    let (destination, early_payload) = match destination.unwrap_or_else(|_| Err(NoDestination::InTime)) {
        Ok(found) => found,
        Err(why) => {
            log::warn!("{}: stream {}: {why}", client.peer, stream.id());
            let _ = stream.send_synack(Err(why.to_string())).await;
            let outcome = Outcome::BadRequest(why.to_string());
            context.access_log.record(&client, Network::Tcp, None, Traffic::default(), started, outcome);
            return;
        }
    };
    if is_udp_over_tcp(&destination) {
        ticket.user_counters().udp_streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // UDP over TCP has its own sockets; the outbound TCP pool is not involved.
        return serve_udp(stream, early_payload, udp, client, context.clone(), lookups).await;
    }
    // Only built when there is a log to write it to: the data path stays as it was.
    let requested = context.access_log.is_on().then(|| destination.to_string());
    let (outcome, traffic) =
        serve_tcp(stream, &context, &client, destination, early_payload, synack_deadline, &lookups).await;
    context.access_log.record(&client, Network::Tcp, requested.as_deref(), traffic, started, outcome);
}

/// The TCP part of [`serve_stream`]: policy, dial, SYNACK, relay; how it ended and what
/// it carried (up counts the payload that came with the destination).
async fn serve_tcp(
    mut stream: Stream,
    context: &ServerContext,
    client: &StreamClient,
    destination: Address,
    early_payload: BytesMut,
    synack_deadline: tokio::time::Instant,
    lookups: &LookupOwner,
) -> (Outcome, Traffic) {
    let nothing = Traffic::default();
    let peer = client.peer.as_str();
    let pool = &context.pool;
    let checked = match context.policy.check_destination(destination, &client.user, pool.names(), lookups).await {
        Ok(checked) => checked,
        Err(refusal) => {
            log::warn!("{peer}: stream {}: {refusal}", stream.id());
            let _ = stream.send_synack(Err(refusal.to_string())).await;
            return (Outcome::Refused(refusal.to_string()), nothing);
        }
    };
    let destination = checked.destination;
    // The pool never refuses: past its per-target limit it dials unpooled. A stream
    // through an upstream is not pooled (see super::upstream).
    let dial = async {
        match &checked.upstream {
            None => pool.acquire(&destination, lookups).await.map(Dialed::Pool),
            Some(upstream) => {
                upstream.connect(&destination, pool.dialer(), pool.names(), lookups).await.map(Dialed::Upstream)
            }
        }
    };
    tokio::pin!(dial);
    let answered_early;
    let dialed = tokio::select! {
        dialed = &mut dial => { answered_early = false; dialed }
        _ = tokio::time::sleep_until(synack_deadline) => {
            // Keep the client's session alive: say yes now, FIN later if the dial fails.
            answered_early = true;
            if let Err(closed) = stream.send_synack(Ok(())).await {
                return (Outcome::SessionClosed(closed.to_string()), nothing);
            }
            dial.await
        }
    };
    let outbound = match dialed {
        Ok(outbound) => outbound,
        Err(err) => {
            log::warn!("{peer}: {err}");
            if !answered_early {
                let _ = stream.send_synack(Err(err.to_string())).await;
            }
            return (Outcome::DialFailed(err.to_string()), nothing); // dropping the stream sends FIN where one is owed
        }
    };
    if !answered_early && let Err(closed) = stream.send_synack(Ok(())).await {
        return (Outcome::SessionClosed(closed.to_string()), nothing);
    }
    // What an upstream sent past its answer is the destination's first bytes. A pooled
    // connection's place is held until the stream ends (the target's limit and gauges).
    let (mut tcp, how, early_down, _pool_place) = match outbound {
        Dialed::Pool(outbound) => {
            let how = if outbound.reused { "warm" } else { "new" };
            let (tcp, place) = outbound.into_parts();
            (tcp, how, BytesMut::new(), Some(place))
        }
        Dialed::Upstream(connected) => (connected.tcp, "upstream", connected.early, None),
    };
    let early_down_len = early_down.len() as u64;
    if !early_down.is_empty()
        && let Err(closed) = stream.write(early_down.freeze()).await
    {
        return (Outcome::SessionClosed(closed.to_string()), nothing);
    }
    if !early_payload.is_empty()
        && let Err(err) = tcp.write_all(&early_payload).await
    {
        return (Outcome::Error(format!("tcp: {err}")), nothing);
    }
    match &checked.upstream {
        Some(upstream) => log::debug!("{peer}: stream {} -> {destination} via upstream {}", stream.id(), upstream.name),
        None => log::debug!("{peer}: stream {} -> {destination} ({how} connection)", stream.id()),
    }
    // The stream owns the connection until it ends; it is then closed, never pooled.
    let (stats, error) = relay_to_end(stream, tcp, &context.relay_buffers).await;
    // The relay's `sent` went into the stream (down to the client), its `received` came
    // out of it (up to the destination), after the payload the SYN carried.
    let traffic = Traffic { up: early_payload.len() as u64 + stats.received, down: early_down_len + stats.sent };
    let outcome = match error {
        None => Outcome::Ok,
        Some(RelayError::Idle(why)) => Outcome::IdleTimeout(why),
        Some(RelayError::Session(closed)) => Outcome::SessionClosed(closed.to_string()),
        Some(error @ RelayError::Io(_)) => Outcome::Error(error.to_string()),
    };
    match outcome.reason() {
        Some(error) => {
            log::debug!("{peer}: {destination}: relay ended: {error} ({} bytes up, {} down)", traffic.up, traffic.down)
        }
        None => log::debug!("{peer}: {destination}: {} bytes up, {} down", traffic.up, traffic.down),
    }
    (outcome, traffic)
}

/// A stream's outbound connection: from the pool, or through an upstream.
enum Dialed {
    Pool(Outbound),
    Upstream(Connected),
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::BytesMut;

    use super::{Dialer, serve_stream};
    use crate::pool::PoolType;
    use crate::server::ServerContext;
    use crate::server::limits::{Gate, ServerLimits};
    use crate::server::outbound_pool::{OutboundPool, OutboundSettings};
    use crate::server::udp::UdpSettings;
    use crate::session::{ClientSession, ServerSession, SessionConfig, StreamHandler};

    /// A client session against an in-process server session whose streams go through
    /// the real `serve_stream`. Both handles are returned: dropping one closes its session.
    pub(crate) fn session_pair(udp: UdpSettings) -> (ClientSession, ServerSession) {
        let (client, server, _pool) = session_pair_with(4, Duration::from_secs(2), udp);
        (client, server)
    }

    /// As [`session_pair`], with a per-target limit and connect timeout of choice; also
    /// returns the server's pool.
    pub(crate) fn session_pair_with(
        max_per_target: usize,
        connect_timeout: Duration,
        udp: UdpSettings,
    ) -> (ClientSession, ServerSession, OutboundPool) {
        let settings = OutboundSettings {
            pool_type: PoolType::Lock,
            max_per_target,
            min_idle: 0,
            max_idle_total: 4,
            max_idle_time: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(60),
            warm_after: Duration::ZERO,
        };
        let pool = OutboundPool::new(
            settings,
            Dialer {
                connect_timeout,
                keepalive: Default::default(),
                strategy: Default::default(),
                resolver: Default::default(),
            },
        );
        let gate = Arc::new(Gate::new(ServerLimits::default()));
        let users = crate::server::users::Users::new(crate::server::users::UserEntry::unnamed(vec![
            crate::proto::PasswordHash::of("test"),
        ]))
        .expect("one user");
        let context = Arc::new(ServerContext::new(Arc::new(users), pool.clone()));
        let user = Arc::new(crate::server::users::UserCounters::default());
        let handler: StreamHandler = Arc::new(move |stream| {
            let ticket = gate.admit_stream(&user, 1).expect("room for test streams");
            let lookups = context.pool.names().own().clone();
            let client = crate::server::access_log::StreamClient { peer: "test".into(), user: "test".into() };
            tokio::spawn(serve_stream(stream, context.clone(), udp, client, ticket, lookups));
        });
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = ServerSession::start(b, SessionConfig::default(), Default::default(), BytesMut::new(), handler);
        (ClientSession::start(a, SessionConfig::default(), Default::default()), server, pool)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::session::OpenError;

    #[tokio::test]
    async fn a_stream_without_a_destination_is_refused_within_the_synack_budget() {
        let (client, _server) = test_support::session_pair(UdpSettings::default());
        let mut stream = client.open_stream(Bytes::new()).await.unwrap();
        let started = tokio::time::Instant::now();
        let answer = stream.wait_open().await;
        assert_eq!(answer, Err(OpenError::Refused(NoDestination::InTime.to_string())));
        assert!(started.elapsed() < Duration::from_secs(3), "answered within the 3 s rule");
        // The session is unharmed.
        let mut next = client.open_stream(Bytes::from_static(&[9])).await.unwrap();
        assert!(matches!(next.wait_open().await, Err(OpenError::Refused(why)) if why.contains("address type")));
    }

    #[tokio::test]
    async fn a_dead_target_is_refused_with_text_the_client_maps_to_a_socks_code() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = Address::socket(listener.local_addr().unwrap());
        drop(listener);
        let (client, _server) = test_support::session_pair(UdpSettings::default());
        let mut first = bytes::BytesMut::new();
        target.encode(&mut first);
        let mut stream = client.open_stream(first.freeze()).await.unwrap();
        let Err(OpenError::Refused(why)) = stream.wait_open().await else { panic!("refused expected") };
        assert_eq!(why, format!("dial {target}: connection refused"));
    }

    #[tokio::test]
    async fn streams_beyond_the_per_target_limit_all_open() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = Address::socket(listener.local_addr().unwrap());
        let _keep_accepting = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        // One pooled slot; five held streams.
        let (client, _server, _pool) =
            test_support::session_pair_with(1, Duration::from_secs(5), UdpSettings::default());
        let mut first = bytes::BytesMut::new();
        target.encode(&mut first);
        let first = first.freeze();
        let mut held = Vec::new();
        for _ in 0..5 {
            let mut stream = client.open_stream(first.clone()).await.unwrap();
            let started = tokio::time::Instant::now();
            assert_eq!(stream.wait_open().await, Ok(()));
            assert!(started.elapsed() < Duration::from_secs(1), "opened without waiting for a slot");
            held.push(stream);
        }
    }
}
