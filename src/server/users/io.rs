//! A session's connection seen through its user's plan: bytes counted as they pass (so the
//! live page moves during a long transfer), charged to the quota, and paced by the speed
//! limits.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::User;
use super::rate::RateLimit;

pub struct CountedIo<IO> {
    io: IO,
    user: Arc<User>,
    up_wait: Option<Pin<Box<Sleep>>>,
    down_wait: Option<Pin<Box<Sleep>>>,
}

impl<IO> CountedIo<IO> {
    pub fn new(io: IO, user: Arc<User>) -> CountedIo<IO> {
        CountedIo { io, user, up_wait: None, down_wait: None }
    }
}

/// Ready once `limit` lets bytes through; the sleep is kept between polls. An unlimited
/// user (most) costs one atomic load here, and no clock read.
fn poll_pace(limit: &RateLimit, wait: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> Poll<()> {
    if limit.rate().is_none() {
        *wait = None;
        return Poll::Ready(());
    }
    loop {
        if let Some(sleep) = wait {
            ready!(sleep.as_mut().poll(cx));
        }
        match limit.wait(Instant::now()) {
            None => {
                *wait = None;
                return Poll::Ready(());
            }
            Some(more) => match wait {
                Some(sleep) => sleep.as_mut().reset(Instant::now() + more),
                None => *wait = Some(Box::pin(tokio::time::sleep(more))),
            },
        }
    }
}

/// Charges `bytes` to `limit`, reading the clock only for a limited user.
fn pace_spent(limit: &RateLimit, bytes: usize) {
    if limit.rate().is_some() {
        limit.spend(bytes, Instant::now());
    }
}

fn over_quota() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the user's quota is reached")
}

impl<IO: AsyncRead + Unpin> AsyncRead for CountedIo<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.user.over_quota() {
            return Poll::Ready(Err(over_quota()));
        }
        ready!(poll_pace(&this.user.speed_up, &mut this.up_wait, cx));
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.user.counters.bytes_up.fetch_add(read as u64, Ordering::Relaxed);
            pace_spent(&this.user.speed_up, read);
            this.user.charge(read as u64);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> CountedIo<IO> {
    fn written(&mut self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(written)) = &polled {
            self.user.counters.bytes_down.fetch_add(*written as u64, Ordering::Relaxed);
            pace_spent(&self.user.speed_down, *written);
            self.user.charge(*written as u64);
        }
        polled
    }

    fn poll_ready_to_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.user.over_quota() {
            return Poll::Ready(Err(over_quota()));
        }
        ready!(poll_pace(&self.user.speed_down, &mut self.down_wait, cx));
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CountedIo<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_ready_to_write(cx))?;
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.written(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_ready_to_write(cx))?;
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.written(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
