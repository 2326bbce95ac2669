//! Session tests over in-memory pipes: our client against our server, and each
//! against raw frames written by hand.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::buffers::RelayBuffers;
use super::*;
use crate::proto::frame::Command;
use crate::proto::{Decoder, Frame, FrameDecoder};

const PIPE: usize = 256 * 1024;

fn echo_handler() -> StreamHandler {
    Arc::new(|mut stream: Stream| {
        tokio::spawn(async move {
            stream.send_synack(Ok(())).await.unwrap();
            while let Ok(Some(data)) = stream.read().await {
                if stream.write(data).await.is_err() {
                    return;
                }
            }
            let _ = stream.finish().await;
        });
    })
}

fn client_on(io: DuplexStream) -> ClientSession {
    ClientSession::start(io, SessionConfig::default(), ClientSessionOptions::default())
}

fn server_on(io: DuplexStream, handler: StreamHandler) -> ServerSession {
    ServerSession::start(io, SessionConfig::default(), ServerSessionOptions::default(), BytesMut::new(), handler)
}

fn pair() -> (ClientSession, ServerSession) {
    pair_with(ClientSessionOptions::default())
}

fn pair_with(client_options: ClientSessionOptions) -> (ClientSession, ServerSession) {
    let (a, b) = tokio::io::duplex(PIPE);
    let server = server_on(b, echo_handler());
    (ClientSession::start(a, SessionConfig::default(), client_options), server)
}

async fn read_to_fin(stream: &mut Stream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.read().await.unwrap() {
        out.extend_from_slice(&chunk);
    }
    out
}

/// Reads frames written by a session, skipping Waste.
struct RawPeer {
    io: DuplexStream,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl RawPeer {
    fn new(io: DuplexStream) -> RawPeer {
        RawPeer { io, buf: BytesMut::new(), decoder: FrameDecoder::new() }
    }

    async fn next(&mut self) -> Option<Frame> {
        loop {
            while let Ok(Some(frame)) = self.decoder.decode(&mut self.buf) {
                if frame.command != Command::Waste {
                    return Some(frame);
                }
            }
            let read = tokio::time::timeout(Duration::from_secs(5), self.io.read_buf(&mut self.buf)).await;
            if read.expect("peer answered in time").unwrap() == 0 {
                return None;
            }
        }
    }

    async fn send(&mut self, frames: &[Frame]) {
        let mut out = BytesMut::new();
        for frame in frames {
            frame.encode(&mut out).unwrap();
        }
        self.io.write_all(&out).await.unwrap();
    }
}

#[tokio::test]
async fn echo_round_trip_with_large_writes() {
    let (client, _server) = pair();
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    stream.wait_open().await.unwrap();
    assert_eq!(client.peer_version(), 2);
    // 1 MiB in one write: split into frames of at most 65,535 bytes on the way.
    let payload: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut reader, mut writer) = stream.split();
    let send = async {
        writer.write(Bytes::from(payload.clone())).await.unwrap();
        writer.finish().await.unwrap();
    };
    let receive = async {
        let mut out = Vec::new();
        while let Some(chunk) = reader.read().await.unwrap() {
            out.extend_from_slice(&chunk);
        }
        out
    };
    let ((), echoed) = tokio::join!(send, receive);
    assert_eq!(echoed, payload);
}

#[tokio::test]
async fn many_concurrent_streams_share_one_session() {
    let (client, _server) = pair();
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = client.open_stream(Bytes::new()).await.unwrap();
            stream.wait_open().await.unwrap();
            let message = format!("stream {i} says hello").repeat(50);
            stream.write(Bytes::from(message.clone())).await.unwrap();
            stream.finish().await.unwrap();
            assert_eq!(read_to_fin(&mut stream).await, message.as_bytes());
            stream.id()
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn client_first_write_is_settings_syn_and_data() {
    let (a, b) = tokio::io::duplex(PIPE);
    let client = client_on(a);
    let _stream = client.open_stream(Bytes::from_static(b"\x01\x7f\0\0\x01\0\x50")).await.unwrap();
    let mut peer = RawPeer::new(b);
    let settings = peer.next().await.unwrap();
    assert_eq!(settings.command, Command::Settings);
    let settings = Settings::parse(&settings.data);
    assert_eq!(settings.version(), 2);
    assert_eq!(settings.get("padding-md5"), Some("75cff2ad89aadf5e257059ee571ebe11"));
    assert!(settings.get("client").unwrap().starts_with("anytls-rs/"));
    assert_eq!(settings.get(HALF_CLOSE_KEY), Some("1"));
    let syn = peer.next().await.unwrap();
    assert_eq!((syn.command, syn.stream_id), (Command::Syn, 1));
    let push = peer.next().await.unwrap();
    assert_eq!((push.command, push.stream_id, &push.data[..]), (Command::Push, 1, &b"\x01\x7f\0\0\x01\0\x50"[..]));
}

#[tokio::test]
async fn server_answers_settings_with_scheme_update_and_version() {
    let (a, b) = tokio::io::duplex(PIPE);
    let _server = server_on(b, echo_handler());
    let mut peer = RawPeer::new(a);
    let settings = Settings::new().with("v", "2").with("padding-md5", "0000");
    peer.send(&[Frame::new(Command::Settings, 0, settings.encode())]).await;
    let update = peer.next().await.unwrap();
    assert_eq!(update.command, Command::UpdatePaddingScheme);
    assert_eq!(&update.data[..], crate::proto::padding::DEFAULT_SCHEME.as_bytes());
    let version = peer.next().await.unwrap();
    assert_eq!((version.command, &version.data[..]), (Command::ServerSettings, &b"v=2"[..]));
}

#[tokio::test]
async fn client_adopts_an_updated_padding_scheme() {
    let (a, b) = tokio::io::duplex(PIPE);
    let config = SessionConfig::default();
    let client = ClientSession::start(a, config.clone(), ClientSessionOptions::default());
    let _stream = client.open_stream(Bytes::new()).await.unwrap();
    let mut peer = RawPeer::new(b);
    let scheme = b"stop=3\n0=10-10\n1=50-60";
    peer.send(&[Frame::new(Command::UpdatePaddingScheme, 0, &scheme[..])]).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while config.padding.load().stop() != 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("scheme adopted");
}

#[tokio::test]
async fn v1_client_gets_no_server_settings_and_no_synack() {
    let (a, b) = tokio::io::duplex(PIPE);
    let _server = server_on(b, echo_handler());
    let mut peer = RawPeer::new(a);
    let settings = Settings::new().with("v", "1").with("padding-md5", "75cff2ad89aadf5e257059ee571ebe11");
    peer.send(&[
        Frame::new(Command::Settings, 0, settings.encode()),
        Frame::control(Command::Syn, 1),
        Frame::new(Command::Push, 1, &b"ping"[..]),
    ])
    .await;
    // The first thing back is the echo: no ServerSettings, no SYNACK.
    let echo = peer.next().await.unwrap();
    assert_eq!((echo.command, &echo.data[..]), (Command::Push, &b"ping"[..]));
}

#[tokio::test]
async fn syn_before_settings_gets_an_alert_and_a_close() {
    let (a, b) = tokio::io::duplex(PIPE);
    let server = server_on(b, echo_handler());
    let mut peer = RawPeer::new(a);
    peer.send(&[Frame::control(Command::Syn, 1)]).await;
    let alert = peer.next().await.unwrap();
    assert_eq!(alert.command, Command::Alert);
    assert_eq!(&alert.data[..], b"client did not send its settings");
    assert_eq!(peer.next().await, None);
    assert!(server.closed().await.contains("SYN before Settings"));
}

#[tokio::test]
async fn unknown_commands_and_stray_frames_are_skipped() {
    let (a, b) = tokio::io::duplex(PIPE);
    let _server = server_on(b, echo_handler());
    let mut peer = RawPeer::new(a);
    let settings = Settings::new().with("v", "2").with("padding-md5", "75cff2ad89aadf5e257059ee571ebe11");
    peer.send(&[
        Frame::new(Command::Settings, 0, settings.encode()),
        Frame::new(Command::Unknown(42), 0, vec![3u8; 300]),
        Frame::new(Command::Push, 99, &b"for nobody"[..]),
        Frame::control(Command::Fin, 98),
        Frame::new(Command::Waste, 0, vec![0u8; 100]),
        Frame::control(Command::HeartRequest, 0),
        Frame::control(Command::Syn, 1),
        Frame::control(Command::Syn, 1),
        Frame::new(Command::Push, 1, &b"still here"[..]),
    ])
    .await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let frame = peer.next().await.unwrap();
        seen.push((frame.command, frame.stream_id, frame.data));
    }
    assert!(seen.contains(&(Command::ServerSettings, 0, Bytes::from_static(b"v=2"))));
    assert!(seen.contains(&(Command::HeartResponse, 0, Bytes::new())));
    assert!(seen.contains(&(Command::SynAck, 1, Bytes::new())));
    assert!(seen.contains(&(Command::Push, 1, Bytes::from_static(b"still here"))));
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    let (a, b) = tokio::io::duplex(PIPE);
    let handler: StreamHandler = Arc::new(|mut stream: Stream| {
        tokio::spawn(async move {
            stream.send_synack(Ok(())).await.unwrap();
            let request = read_to_fin(&mut stream).await;
            // Answer only after the client's FIN.
            stream.write(Bytes::from(format!("got {} bytes", request.len()))).await.unwrap();
            stream.finish().await.unwrap();
        });
    });
    let _server = server_on(b, handler);
    let client = client_on(a);
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    stream.wait_open().await.unwrap();
    stream.write(Bytes::from_static(b"12345")).await.unwrap();
    stream.finish().await.unwrap();
    assert_eq!(read_to_fin(&mut stream).await, b"got 5 bytes");
}

#[tokio::test]
async fn refused_stream_reports_the_server_text() {
    let (a, b) = tokio::io::duplex(PIPE);
    let handler: StreamHandler = Arc::new(|mut stream: Stream| {
        tokio::spawn(async move {
            stream.send_synack(Err("dial 10.0.0.1:1: connection refused".into())).await.unwrap();
        });
    });
    let _server = server_on(b, handler);
    let client = client_on(a);
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    let err = stream.wait_open().await.unwrap_err();
    assert_eq!(err, OpenError::Refused("dial 10.0.0.1:1: connection refused".into()));
    // The session survives for the next stream.
    let mut next = client.open_stream(Bytes::new()).await.unwrap();
    assert!(matches!(next.wait_open().await, Err(OpenError::Refused(_))));
    assert_eq!(next.id(), 2);
}

#[tokio::test]
async fn v1_server_is_assumed_after_the_grace_period() {
    let (a, b) = tokio::io::duplex(PIPE);
    let options = ClientSessionOptions { v1_grace: Duration::from_millis(100), ..ClientSessionOptions::default() };
    let client = ClientSession::start(a, SessionConfig::default(), options);
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    let _peer = RawPeer::new(b); // reads nothing, answers nothing
    stream.wait_open().await.unwrap();
    assert_eq!(client.peer_version(), 1);
    let mut second = client.open_stream(Bytes::new()).await.unwrap();
    tokio::time::timeout(Duration::from_millis(50), second.wait_open()).await.unwrap().unwrap();
}

#[tokio::test]
async fn wrong_password_style_close_is_reported_not_hung() {
    let (a, b) = tokio::io::duplex(PIPE);
    let client = client_on(a);
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    drop(b); // the server closes without a word
    let err = tokio::time::timeout(Duration::from_secs(5), stream.wait_open()).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("wrong password"), "{err}");
}

#[tokio::test]
async fn alert_from_server_closes_the_client_session() {
    let (a, b) = tokio::io::duplex(PIPE);
    let client = client_on(a);
    let _stream = client.open_stream(Bytes::new()).await.unwrap();
    let mut peer = RawPeer::new(b);
    peer.send(&[Frame::new(Command::Alert, 0, &b"go away"[..])]).await;
    assert!(client.closed().await.contains("go away"));
}

#[tokio::test]
async fn a_stalled_stream_exerts_backpressure_with_bounded_memory() {
    let (a, b) = tokio::io::duplex(PIPE);
    let config = SessionConfig::default();
    let client = ClientSession::start(a, config.clone(), ClientSessionOptions::default());
    let mut stalled = client.open_stream(Bytes::new()).await.unwrap();
    let mut peer = RawPeer::new(b);
    let settings = peer.next().await.unwrap();
    assert_eq!(settings.command, Command::Settings);
    peer.send(&[Frame::new(Command::ServerSettings, 0, &b"v=2"[..]), Frame::control(Command::SynAck, 1)]).await;
    stalled.wait_open().await.unwrap();
    // Push 64 MiB at a stream that nobody reads: the writes must block well before that.
    let chunk = Frame::new(Command::Push, 1, vec![7u8; 65_535]);
    let mut encoded = BytesMut::new();
    chunk.encode(&mut encoded).unwrap();
    let encoded = encoded.freeze();
    let mut written = 0usize;
    let pushed = tokio::time::timeout(Duration::from_secs(2), async {
        while written < 64 << 20 {
            peer.io.write_all(&encoded).await.unwrap();
            written += encoded.len();
        }
    })
    .await;
    assert!(pushed.is_err(), "the session kept reading a stalled stream");
    // Queue + reader buffer + pipe: a few MiB at most.
    assert!(written < (config.stream_queue + 8) * 65_542 + 2 * PIPE, "{written} bytes accepted");
    // Reading again drains every whole frame that was written.
    let frames = written / encoded.len();
    let drain = async {
        for _ in 0..frames {
            assert_eq!(stalled.read().await.unwrap().unwrap().len(), 65_535);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), drain).await.expect("queued data drains");
}

#[tokio::test]
async fn our_pair_negotiates_half_close() {
    let (client, server) = pair();
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    stream.wait_open().await.unwrap();
    assert!(client.half_close() && server.half_close() && stream.half_close());
}

/// A loopback TCP pair: what the relay gets, and the far end the test drives.
async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connect = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
    let (accepted, connected) = tokio::join!(listener.accept(), connect);
    (accepted.unwrap().0, connected.unwrap())
}

/// A reference-style server: v2, no half-close, SYNACK for stream 1.
async fn reference_server(io: DuplexStream) -> RawPeer {
    let mut peer = RawPeer::new(io);
    assert_eq!(peer.next().await.unwrap().command, Command::Settings);
    assert_eq!(peer.next().await.unwrap().command, Command::Syn);
    peer.send(&[Frame::new(Command::ServerSettings, 0, &b"v=2"[..]), Frame::control(Command::SynAck, 1)]).await;
    peer
}

#[tokio::test]
async fn with_a_reference_peer_its_fin_ends_the_relay_and_is_not_answered() {
    let (a, b) = tokio::io::duplex(PIPE);
    let client = client_on(a);
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    let mut peer = reference_server(b).await;
    stream.wait_open().await.unwrap();
    assert!(!stream.half_close());
    let (local, mut app) = tcp_pair().await;
    let relay = tokio::spawn(async move { relay(stream, local, &RelayBuffers::default()).await });
    peer.send(&[Frame::new(Command::Push, 1, &b"answer"[..]), Frame::control(Command::Fin, 1)]).await;
    let mut got = Vec::new();
    app.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"answer");
    // The relay is over although the app never closed its side, and no FIN went back.
    let (stats, error) = tokio::time::timeout(Duration::from_secs(5), relay).await.unwrap().unwrap();
    assert_eq!((stats.received, error), (6, None));
    peer.send(&[Frame::control(Command::HeartRequest, 0)]).await;
    let next = peer.next().await.unwrap();
    assert_eq!(next.command, Command::HeartResponse, "no FIN before it: {next:?}");
}

#[tokio::test]
async fn with_a_reference_peer_our_fin_ends_the_relay() {
    let (a, b) = tokio::io::duplex(PIPE);
    let client = client_on(a);
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    let mut peer = reference_server(b).await;
    stream.wait_open().await.unwrap();
    let (local, mut app) = tcp_pair().await;
    let relay = tokio::spawn(async move { relay(stream, local, &RelayBuffers::default()).await });
    app.write_all(b"request").await.unwrap();
    app.shutdown().await.unwrap();
    let push = peer.next().await.unwrap();
    assert_eq!((push.command, &push.data[..]), (Command::Push, &b"request"[..]));
    assert_eq!(peer.next().await.unwrap().command, Command::Fin);
    // The reference server considers the stream closed: the relay must not wait for its FIN.
    let (stats, error) = tokio::time::timeout(Duration::from_secs(5), relay).await.unwrap().unwrap();
    assert_eq!((stats.sent, error), (7, None));
}

/// Streams opened at once on a new session: Settings must still be the first frame
/// the server sees (a SYN before it gets an Alert and kills the session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_opens_never_put_a_syn_before_settings() {
    for round in 0..1000 {
        let (client, _server) = pair();
        let mut opens = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let client = client.clone();
            opens.spawn(async move {
                let mut stream = client.open_stream(Bytes::from_static(b"x")).await?;
                stream.wait_open().await.map_err(|err| SessionClosed(err.to_string().into()))
            });
        }
        while let Some(opened) = opens.join_next().await {
            assert_eq!(opened.unwrap(), Ok(()), "round {round}");
        }
    }
}

#[tokio::test]
async fn a_session_we_close_ourselves_is_not_blamed_on_the_password() {
    let (a, _b) = tokio::io::duplex(PIPE);
    let client = client_on(a);
    client.close("idle timeout");
    assert_eq!(&*client.closed().await, "idle timeout");
}

#[tokio::test]
async fn a_quiet_stream_survives_several_heartbeats_on_a_fast_link() {
    // In-memory pipes answer within microseconds: the case where a heartbeat's answer
    // lands in the same clock tick as its request.
    let options = ClientSessionOptions {
        heartbeat_interval: Some(Duration::from_millis(100)),
        heartbeat_timeout: Duration::from_millis(100),
        ..ClientSessionOptions::default()
    };
    let (client, _server) = pair_with(options);
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    stream.wait_open().await.unwrap();
    let reads_when_quiet = client.shared.last_received.reads();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!client.is_closed(), "closed: {:?}", client.shared.close_reason());
    let answers = client.shared.last_received.reads() - reads_when_quiet;
    assert!(answers >= 3, "only {answers} heartbeat answers in 1.5 s of quiet");
    stream.write(Bytes::from_static(b"still here")).await.unwrap();
    assert_eq!(&stream.read().await.unwrap().unwrap()[..], b"still here");
}

/// Waits until nothing but `weak` itself refers to a session: every task has ended.
async fn wait_for_every_task_to_end(weak: &std::sync::Weak<Shared>, side: &str) {
    let ended = async {
        while weak.upgrade().is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(3), ended).await.unwrap_or_else(|_| {
        panic!("{side}: {} references left 3 s after close", weak.strong_count());
    });
}

/// A server that takes streams and never reads them: its reader blocks on a full
/// stream queue, the pipe fills, then the client's writer and its stream writes block.
#[tokio::test]
async fn a_hard_close_ends_every_task_and_fails_a_blocked_write() {
    let held = Arc::new(Mutex::new(Vec::new()));
    let handler: StreamHandler = {
        let held = held.clone();
        Arc::new(move |stream| held.lock().unwrap().push(stream))
    };
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = server_on(b, handler);
    let client = client_on(a);
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    let writes = tokio::spawn(async move {
        let chunk = Bytes::from(vec![0u8; 65_535]);
        loop {
            if let Err(err) = stream.write(chunk.clone()).await {
                return err;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!writes.is_finished(), "the writes should be blocked by now");
    let (client_tasks, server_tasks) = (Arc::downgrade(&client.shared), Arc::downgrade(&server.shared));
    client.close("test: hard close");
    server.close("test: hard close");
    let err = tokio::time::timeout(Duration::from_secs(2), writes).await.expect("blocked write ended").unwrap();
    assert!(err.0.contains("hard close"), "{err}");
    drop((client, server));
    held.lock().unwrap().clear();
    wait_for_every_task_to_end(&client_tasks, "client").await;
    wait_for_every_task_to_end(&server_tasks, "server").await;
}

/// A relay whose target neither reads nor writes is blocked on both TCP directions;
/// the session closing must still end it.
#[tokio::test]
async fn a_relay_blocked_on_a_silent_target_ends_when_its_session_closes() {
    let (to_target, _silent_target) = tcp_pair().await;
    let to_target = Mutex::new(Some(to_target));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let done_tx = Mutex::new(Some(done_tx));
    let handler: StreamHandler = Arc::new(move |mut stream: Stream| {
        let (tcp, done) = (to_target.lock().unwrap().take().unwrap(), done_tx.lock().unwrap().take().unwrap());
        tokio::spawn(async move {
            stream.send_synack(Ok(())).await.unwrap();
            let _ = done.send(relay(stream, tcp, &RelayBuffers::default()).await);
        });
    });
    let (a, b) = tokio::io::duplex(PIPE);
    let server = server_on(b, handler);
    let client = client_on(a);
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    stream.wait_open().await.unwrap();
    // More than the target's socket buffers take: the relay's TCP write blocks.
    let _writes = tokio::spawn(async move {
        let chunk = Bytes::from(vec![0u8; 65_535]);
        while stream.write(chunk.clone()).await.is_ok() {}
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.close("test: session closed under a blocked relay");
    let (_, error) = tokio::time::timeout(Duration::from_secs(2), done_rx).await.expect("relay ended").unwrap();
    assert!(error.as_deref().unwrap_or_default().contains("blocked relay"), "{error:?}");
}

/// A server session whose handler keeps every stream it is given, unanswered and unread,
/// as a relay still dialing would; and the raw client in front of it, past Settings.
async fn holding_server(options: ServerSessionOptions) -> (ServerSession, RawPeer, Arc<std::sync::Mutex<Vec<Stream>>>) {
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler: StreamHandler = {
        let held = held.clone();
        Arc::new(move |stream| held.lock().unwrap().push(stream))
    };
    let (a, b) = tokio::io::duplex(PIPE);
    let server = ServerSession::start(b, SessionConfig::default(), options, BytesMut::new(), handler);
    let mut peer = RawPeer::new(a);
    let settings = Settings::new().with("v", "2").with("padding-md5", "75cff2ad89aadf5e257059ee571ebe11");
    peer.send(&[Frame::new(Command::Settings, 0, settings.encode())]).await;
    assert_eq!(peer.next().await.unwrap().command, Command::ServerSettings, "the default scheme: no update");
    (server, peer, held)
}

#[tokio::test]
async fn a_fin_does_not_free_the_place_of_a_stream_still_being_served() {
    let options = ServerSessionOptions { max_streams: 2, ..ServerSessionOptions::default() };
    let (server, mut peer, held) = holding_server(options).await;
    // SYN, destination, FIN: the attack's shape. The streams' handlers still hold them.
    for sid in 1..=2 {
        peer.send(&[Frame::control(Command::Syn, sid), Frame::new(Command::Push, sid, &b"x"[..])]).await;
        peer.send(&[Frame::control(Command::Fin, sid)]).await;
    }
    peer.send(&[Frame::control(Command::Syn, 3)]).await;
    let refused = peer.next().await.unwrap();
    assert_eq!((refused.command, refused.stream_id), (Command::SynAck, 3));
    assert_eq!(&refused.data[..], b"too many streams on this session");
    assert_eq!(server.open_streams(), 2);
    // Their relays end: the places come back.
    held.lock().unwrap().clear();
    assert_eq!(server.open_streams(), 0);
    peer.send(&[Frame::control(Command::Syn, 4), Frame::control(Command::HeartRequest, 0)]).await;
    loop {
        let frame = peer.next().await.unwrap();
        assert_ne!(frame.command, Command::SynAck, "stream 4 refused");
        if frame.command == Command::HeartResponse {
            break;
        }
        assert_eq!(frame.command, Command::Fin, "the dropped streams' FINs, then the answer");
    }
    assert_eq!(held.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn stream_id_zero_is_refused_and_the_session_goes_on() {
    let (_server, mut peer, held) = holding_server(ServerSessionOptions::default()).await;
    peer.send(&[Frame::control(Command::Syn, 0)]).await;
    let refused = peer.next().await.unwrap();
    assert_eq!(
        (refused.command, refused.stream_id, &refused.data[..]),
        (Command::SynAck, 0, &b"stream id 0 is reserved"[..])
    );
    assert!(held.lock().unwrap().is_empty());
    peer.send(&[Frame::control(Command::Syn, 1), Frame::control(Command::HeartRequest, 0)]).await;
    assert_eq!(peer.next().await.unwrap().command, Command::HeartResponse);
    assert_eq!(held.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_idle_server_session_is_closed_and_a_busy_one_is_not() {
    let timeout = Duration::from_millis(300);
    let options = ServerSessionOptions { idle_session_timeout: Some(timeout), ..ServerSessionOptions::default() };
    let (idle, _peer, _) = holding_server(options.clone()).await;
    let started = tokio::time::Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(3), idle.closed()).await.expect("idle session reaped");
    assert!(reason.contains("idle"), "{reason}");
    assert!(started.elapsed() >= timeout, "not before the timeout");

    // A stream alive and silent keeps its session, however quiet.
    let (busy, mut peer, _held) = holding_server(options).await;
    peer.send(&[Frame::control(Command::Syn, 1)]).await;
    tokio::time::sleep(timeout * 3).await;
    assert!(!busy.is_closed(), "a session with a live stream was reaped");
}

#[tokio::test]
async fn one_byte_pushes_in_a_row_reach_the_stream_as_few_chunks() {
    let (_server, mut peer, held) = holding_server(ServerSessionOptions::default()).await;
    let mut frames = vec![Frame::control(Command::Syn, 1)];
    frames.extend((0..4000u32).map(|i| Frame::new(Command::Push, 1, vec![(i % 251) as u8])));
    frames.push(Frame::control(Command::Fin, 1));
    peer.send(&frames).await;
    let mut stream = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(stream) = held.lock().unwrap().pop() {
                return stream;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let mut chunks = 0;
    let mut data = Vec::new();
    while let Some(chunk) = stream.read().await.unwrap() {
        chunks += 1;
        data.extend_from_slice(&chunk);
    }
    assert_eq!(data, (0..4000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(), "every byte, in order");
    // 32,000 bytes on the wire arrive in a few pipe reads; without joining, 4,000 chunks.
    assert!(chunks <= 16, "{chunks} chunks for 4,000 one-byte pushes");
}

#[tokio::test]
async fn a_stream_queues_at_most_its_buffer_when_the_connection_does_not_drain() {
    // The peer never reads: what one stream's writes are accepted before they wait is
    // its send window, plus the pipe and the batch being written into it.
    const PIPE_SMALL: usize = 64 * 1024;
    let (a, b) = tokio::io::duplex(PIPE_SMALL);
    let config = SessionConfig::default();
    let options = ClientSessionOptions { v1_grace: Duration::from_millis(10), ..ClientSessionOptions::default() };
    let client = ClientSession::start(a, config.clone(), options);
    let mut stream = client.open_stream(Bytes::new()).await.unwrap();
    stream.wait_open().await.unwrap(); // assumes a v1 server after the grace time
    let _peer = b; // open, never read
    let chunk = Bytes::from(vec![5u8; 16 * 1024]);
    let mut accepted = 0usize;
    while tokio::time::timeout(Duration::from_millis(200), stream.write(chunk.clone())).await.is_ok() {
        accepted += chunk.len();
        assert!(accepted < 16 << 20, "writes never waited");
    }
    // Without the window: the session's 16-frame queue and a 256 KiB batch, over 500 KiB.
    let bound = config.stream_buffer + PIPE_SMALL + chunk.len();
    assert!(accepted <= bound, "{accepted} bytes accepted from one stream (bound {bound})");
}

#[tokio::test]
async fn a_stream_the_client_opened_is_open_on_the_server_without_waiting() {
    let (_server, mut peer, held) = holding_server(ServerSessionOptions::default()).await;
    peer.send(&[Frame::control(Command::Syn, 1)]).await;
    let mut accepted = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(stream) = held.lock().unwrap().pop() {
                return stream;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    // No answer is owed to the side that accepted it: nothing to wait for.
    let open = tokio::time::timeout(Duration::from_millis(100), accepted.wait_open()).await;
    assert_eq!(open.expect("no wait for an answer"), Ok(()));
}

/// The server's end of a pipe that notes the length of each write it is given (a
/// session's writer makes one write per TLS record it wants, so these are the records).
struct WriteSizes {
    io: DuplexStream,
    sizes: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl tokio::io::AsyncRead for WriteSizes {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteSizes {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.io).poll_write(cx, data);
        if let std::task::Poll::Ready(Ok(n)) = written {
            self.sizes.lock().unwrap().push(n);
        }
        written
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A raw client's Settings, SYN and request to the echo server behind `downlink`; the
/// sizes of the server's writes and the frames the client got (Waste skipped).
async fn serve_one_echo(downlink: Option<&str>) -> (Vec<usize>, Vec<Frame>) {
    let (a, b) = tokio::io::duplex(PIPE);
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let io = WriteSizes { io: b, sizes: sizes.clone() };
    let downlink_padding = downlink.map(|text| Arc::new(PaddingScheme::load(text.as_bytes()).unwrap()));
    let options = ServerSessionOptions { downlink_padding, ..ServerSessionOptions::default() };
    let _server = ServerSession::start(io, SessionConfig::default(), options, BytesMut::new(), echo_handler());
    let mut peer = RawPeer::new(a);
    let settings = Settings::new().with("v", "2").with("padding-md5", "75cff2ad89aadf5e257059ee571ebe11");
    peer.send(&[Frame::new(Command::Settings, 0, settings.encode())]).await;
    let mut frames = vec![peer.next().await.unwrap()];
    peer.send(&[Frame::control(Command::Syn, 1), Frame::new(Command::Push, 1, &b"hello"[..])]).await;
    while frames.iter().filter(|f| f.command == Command::Push).count() == 0 {
        frames.push(peer.next().await.expect("the echo"));
    }
    let sizes = sizes.lock().unwrap().clone();
    (sizes, frames)
}

#[tokio::test]
async fn a_server_with_a_downlink_scheme_pads_its_first_writes_and_clients_see_the_same_frames() {
    let scheme = "stop=2\n0=500-500\n1=800-800,300-300";
    let (padded, frames) = serve_one_echo(Some(scheme)).await;
    // Write 0, the Settings answer: one 500-byte record. Write 1 (the SYNACK, perhaps with
    // the echo): 800 bytes, then a Waste frame of 300 bytes of data.
    assert_eq!(padded[..3], [500, 800, 300 + crate::proto::frame::HEADER_LEN], "{padded:?}");
    let seen: Vec<(Command, u32, &[u8])> = frames.iter().map(|f| (f.command, f.stream_id, &f.data[..])).collect();
    assert_eq!(
        seen,
        [(Command::ServerSettings, 0, &b"v=2"[..]), (Command::SynAck, 1, &b""[..]), (Command::Push, 1, &b"hello"[..])]
    );

    let (plain, frames_unpadded) = serve_one_echo(None).await;
    assert_eq!(plain[0], crate::proto::frame::HEADER_LEN + 3, "unpadded, the Settings answer is 10 bytes: {plain:?}");
    assert_eq!(frames_unpadded.len(), frames.len());
}
