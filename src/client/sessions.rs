//! Sessions to the server: opening them (TCP, TLS, authentication) and reusing
//! idle ones, newest first, as the reference client does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::pool::{Idle, IdlePool, PoolKey, PoolSettings, PoolType, new_pool};
use crate::proto::auth::encode_auth_block;
use crate::proto::{Address, PasswordHash};
use crate::session::{Session, SessionConfig};

/// Opens new authenticated sessions to one server.
pub struct Connector {
    pub server: Address,
    pub server_name: ServerName<'static>,
    pub tls: TlsConnector,
    pub password: PasswordHash,
    pub session_config: SessionConfig,
    pub connect_timeout: Duration,
}

impl Connector {
    pub async fn connect(&self) -> Result<Session, String> {
        let server = self.server.to_string();
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(server.as_str()))
            .await
            .map_err(|_| format!("connect to server {server}: timed out"))?
            .map_err(|err| format!("connect to server {server}: {err}"))?;
        let _ = tcp.set_nodelay(true);
        let handshake = self.tls.connect(self.server_name.clone(), tcp);
        let mut tls = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| format!("TLS handshake with {server}: timed out"))?
            .map_err(|err| format!("{server}: {}", super::tls::explain_handshake_error(&err)))?;
        // One write, one TLS record: reference servers read the block in one go.
        let scheme = self.session_config.padding.load_full();
        let mut block = BytesMut::new();
        encode_auth_block(&self.password, scheme.auth_padding_len(&mut rand::rng()), &mut block);
        tls.write_all(&block).await.map_err(|err| format!("{server}: send authentication: {err}"))?;
        tls.flush().await.map_err(|err| format!("{server}: send authentication: {err}"))?;
        Ok(Session::client(tls, self.session_config.clone()))
    }
}

/// Idle sessions to one server, reused newest first.
pub struct SessionPool {
    key: PoolKey,
    idle: Arc<dyn IdlePool<Session>>,
    pub connector: Connector,
}

/// A session taken from the pool, and whether it was reused.
pub struct Lease {
    pub session: Session,
    pub reused: bool,
}

impl SessionPool {
    pub fn new(connector: Connector, pool_type: PoolType, settings: PoolSettings) -> SessionPool {
        SessionPool { key: connector.server.to_string().into(), idle: new_pool(pool_type, settings), connector }
    }

    /// The newest idle session still alive, or a new one.
    pub async fn acquire(&self) -> Result<Lease, String> {
        while let Some(entry) = self.idle.take(&self.key) {
            if entry.value.is_closed() {
                self.idle.counters().record_cleaned(1);
                continue;
            }
            self.idle.counters().record_checkout();
            return Ok(Lease { session: entry.value, reused: true });
        }
        let session = self.connector.connect().await?;
        self.idle.counters().record_new();
        self.idle.counters().record_checkout();
        Ok(Lease { session, reused: false })
    }

    /// Puts a session whose stream has ended back for reuse.
    pub fn release(&self, session: Session) {
        self.idle.counters().record_checkin();
        if session.is_closed() {
            return;
        }
        if let Err(refused) = self.idle.give(&self.key, Idle::new(session)) {
            refused.value.close("idle pool full");
        }
    }

    /// Closes sessions idle for too long.
    pub fn sweep(&self) {
        for (_, entry) in self.idle.sweep(Instant::now()) {
            entry.value.close("idle timeout");
        }
    }

    pub fn idle_pool(&self) -> &dyn IdlePool<Session> {
        self.idle.as_ref()
    }
}
