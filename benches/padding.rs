//! What downlink padding costs per session: our client and server sessions over an
//! in-memory pipe (no TLS, so the figure is the padding's own work: planning, Waste frames
//! and the extra writes), one stream, a 1 KiB echo and a 16 KiB answer, without padding,
//! with the built-in downlink scheme and with a heavy one. Printed first: the bytes the
//! server writes per session in each case, the cost in bandwidth.

use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use anytls_rs::proto::PaddingScheme;
use anytls_rs::proto::padding::DEFAULT_DOWNLINK_SCHEME;
use anytls_rs::session::{
    ClientSession, ClientSessionOptions, ServerSession, ServerSessionOptions, SessionConfig, Stream, StreamHandler,
};
use bytes::{Bytes, BytesMut};
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const HEAVY: &str = "stop=8\n0=1000-1500\n1=1400-4000,1400-4000\n2=4000-8000\n3=4000-8000\n4=1000-4000\n5=1000-4000\n\
                     6=1000-4000\n7=1000-4000";

/// The server's end of the pipe, counting the bytes it writes.
struct Counted {
    io: DuplexStream,
    written: Arc<AtomicUsize>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = written {
            self.written.fetch_add(n, Ordering::Relaxed);
        }
        written
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Answers each stream's request with the request and then 16 KiB, as a small page would.
fn page_handler() -> StreamHandler {
    Arc::new(|mut stream: Stream| {
        tokio::spawn(async move {
            let _ = stream.send_synack(Ok(())).await;
            if let Ok(Some(request)) = stream.read().await {
                let _ = stream.write(request).await;
                let _ = stream.write(Bytes::from(vec![7u8; 16 * 1024])).await;
            }
            let _ = stream.finish().await;
        });
    })
}

/// One session: a stream, its request and the whole answer; the bytes the server wrote.
async fn one_session(downlink: Option<Arc<PaddingScheme>>) -> usize {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let written = Arc::new(AtomicUsize::new(0));
    let options = ServerSessionOptions { downlink_padding: downlink, ..ServerSessionOptions::default() };
    let io = Counted { io: b, written: written.clone() };
    let server = ServerSession::start(io, SessionConfig::default(), options, BytesMut::new(), page_handler());
    let client = ClientSession::start(a, SessionConfig::default(), ClientSessionOptions::default());
    // The destination in SOCKS form (127.0.0.1:80), then the request.
    let mut first = vec![0x01, 127, 0, 0, 1, 0, 80];
    first.extend_from_slice(&[1u8; 1024]);
    let mut stream = client.open_stream(Bytes::from(first)).await.expect("open");
    stream.wait_open().await.expect("SYNACK");
    let mut got = 0;
    while let Ok(Some(chunk)) = stream.read().await {
        got += chunk.len();
    }
    // The handler echoes what it read first: the destination (7 bytes) and the request.
    assert_eq!(got, 7 + 1024 + 16 * 1024);
    drop((stream, client, server));
    written.load(Ordering::Relaxed)
}

fn per_session(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let schemes = [
        ("off", None),
        ("built-in", Some(Arc::new(PaddingScheme::load(DEFAULT_DOWNLINK_SCHEME.as_bytes()).unwrap()))),
        ("heavy", Some(Arc::new(PaddingScheme::load(HEAVY.as_bytes()).unwrap()))),
    ];
    for (name, scheme) in &schemes {
        let bytes: Vec<usize> = (0..200).map(|_| runtime.block_on(one_session(scheme.clone()))).collect();
        let mean = bytes.iter().sum::<usize>() as f64 / bytes.len() as f64;
        println!("downlink padding {name}: {mean:.0} bytes written by the server per session (mean of 200)");
    }
    let mut group = c.benchmark_group("session with downlink padding");
    for (name, scheme) in &schemes {
        group.bench_function(*name, |b| b.iter(|| black_box(runtime.block_on(one_session(scheme.clone())))));
    }
    group.finish();
}

criterion_group!(benches, per_session);
criterion_main!(benches);
