//! The data path: accept client connections, admit each as a session under
//! the held route, dial the listener's [`Target`] (the active datacenter's
//! DB or Redis, or the proxy's own datacenter's on a local-read listener)
//! and copy bytes both ways.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{Instrument, debug, info_span, warn};

use crate::error::Error;
use crate::metrics::{
    CLIENT_TO_DB, DB_TO_CLIENT, Metrics, REFUSED_MAX_SESSIONS, REFUSED_NO_LOCAL_ROUTE, REFUSED_NO_REDIS_ROUTE,
    REFUSED_NO_ROUTE,
};
use crate::routes::{Routes, Ticket};
pub use crate::target::{Target, Tier};

/// Size of each direction's copy buffer: a session holds two.
const BUFFER: usize = 16 * 1024;

/// Pause after a failed accept (out of file descriptors, say) so that the
/// loop does not spin on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What every session needs.
#[derive(Clone)]
pub struct Forwarder {
    /// The server this listener forwards to.
    pub target: Target,
    /// The held route and the session registry.
    pub routes: Arc<Routes>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Bounds the open sessions (`--max-sessions`).
    pub sessions: Arc<Semaphore>,
    /// How long a dial of the DB may take.
    pub connect_timeout: Duration,
}

impl Forwarder {
    /// Accepts client connections until `shutdown` resolves. A connection
    /// that arrives over the session limit or before any route is closed
    /// at once.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let (client, peer) = tokio::select! {
                biased;
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "accepting a client connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = self.sessions.clone().try_acquire_owned() else {
                self.metrics.refused_total.with_label_values(&[REFUSED_MAX_SESSIONS]).inc();
                debug!(%peer, "session limit reached; closing the connection");
                continue;
            };
            let this = self.clone();
            let admitted = self.routes.admit(&self.target, move |ticket| {
                let span = info_span!(
                    "session",
                    id = ticket.id,
                    %peer,
                    epoch = ticket.route.epoch,
                    tier = this.target.tier.name(),
                    datacenter = %this.target.datacenter(&ticket.route),
                    local = !this.target.follows_flips(),
                );
                tokio::spawn(this.session(client, ticket, permit).instrument(span))
            });
            if admitted.is_err() {
                self.metrics.refused_total.with_label_values(&[REFUSED_NO_ROUTE]).inc();
                debug!(%peer, "no route yet; closing the connection");
            }
        }
    }

    /// One client session: ends when either side closes, on an IO error, or
    /// when a flip or the shutdown aborts the task (which drops both sockets).
    async fn session(self, client: TcpStream, ticket: Ticket, _permit: OwnedSemaphorePermit) {
        let datacenter = self.target.datacenter(&ticket.route).to_string();
        let Some(address) = self.target.address(&ticket.route) else {
            if self.target.follows_flips() {
                // A Redis listener under a route that does not move Redis.
                self.metrics.refused_total.with_label_values(&[REFUSED_NO_REDIS_ROUTE]).inc();
                warn!(
                    reason = REFUSED_NO_REDIS_ROUTE,
                    "closing the client: the route names no Redis for the active datacenter"
                );
            } else {
                // A local-read listener under a route that does not name
                // this proxy's datacenter (or, for Redis, its Redis).
                self.metrics.refused_total.with_label_values(&[REFUSED_NO_LOCAL_ROUTE]).inc();
                warn!(
                    reason = REFUSED_NO_LOCAL_ROUTE,
                    "closing the client: the route names no {} for this proxy's datacenter {datacenter}",
                    self.target.tier.name()
                );
            }
            return;
        };
        let db = match self.dial(&datacenter, address).await {
            Ok(db) => db,
            Err(e) => {
                self.metrics.connect_errors_total.with_label_values(&[&datacenter]).inc();
                warn!(reason = e.reason(), error = %e, "closing the client: the DB is unreachable");
                return;
            }
        };
        // MySQL and Redis are request/response with small packets: do not
        // let Nagle hold them back.
        let _ = client.set_nodelay(true);
        let _ = db.set_nodelay(true);
        debug!(db = ?db.peer_addr().ok(), "session open");
        let (client_rx, client_tx) = client.into_split();
        let (db_rx, db_tx) = db.into_split();
        let up = self.metrics.bytes_total.with_label_values(&[CLIENT_TO_DB]);
        let down = self.metrics.bytes_total.with_label_values(&[DB_TO_CLIENT]);
        let ended = tokio::select! {
            r = pump(client_rx, db_tx, &up) => ("client", r),
            r = pump(db_rx, client_tx, &down) => ("db", r),
        };
        match ended {
            (side, Ok(())) => debug!(closed_by = side, "session closed"),
            (side, Err(e)) => debug!(side, error = %e, "session ended by an IO error"),
        }
        drop(ticket.guard);
    }

    async fn dial(&self, datacenter: &str, address: &str) -> Result<TcpStream, Error> {
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(Error::Connect { datacenter: datacenter.into(), address: address.into(), source }),
            Err(_) => Err(Error::ConnectTimeout {
                datacenter: datacenter.into(),
                address: address.into(),
                timeout: self.connect_timeout,
            }),
        }
    }
}

/// Copies `from` to `to` until `from` ends, counting the bytes as they go
/// (not at the end: a killed session's bytes count too). At the end, passes
/// the end on to `to`.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    bytes: &IntCounter,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        bytes.inc_by(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pump_copies_everything_counts_it_and_passes_the_end_on() {
        let (mut writer, reader) = tokio::io::duplex(64);
        let (sink, mut out) = tokio::io::duplex(1 << 20);
        let bytes = IntCounter::new("pumped", "test").unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let feeder = tokio::spawn(async move {
            writer.write_all(&sent).await.unwrap();
        });
        let copy = tokio::spawn({
            let bytes = bytes.clone();
            async move { pump(reader, sink, &bytes).await }
        });
        let mut got = Vec::new();
        out.read_to_end(&mut got).await.unwrap();
        feeder.await.unwrap();
        copy.await.unwrap().unwrap();
        assert_eq!(got, data);
        assert_eq!(bytes.get(), data.len() as u64);
    }
}
