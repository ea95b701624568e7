//! The gRPC server's TLS: its certificate and key files, re-read every
//! [`RELOAD_INTERVAL`], so a rotated certificate (a renewed Kubernetes
//! Secret, which swaps its `..data` symlink) is served to new connections
//! without a restart; connections already open keep theirs.
//!
//! The handshakes run in tasks of their own with a deadline, so a client
//! that stalls its handshake holds up neither the accept loop nor anyone
//! else; only finished TLS connections reach the server.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

/// How often the certificate files are compared with the ones in use.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Finished handshakes waiting for the server to take them; the accept loop
/// waits when the server is this far behind.
const ACCEPTED_QUEUE: usize = 128;

/// The gRPC server's certificate and key (PEM files).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl ServerTls {
    /// Reads and checks the pair (that the key is the certificate's).
    pub fn check(&self) -> anyhow::Result<()> {
        let (cert, key) = self.read()?;
        certified_key(&cert, &key)
            .map(|_| ())
            .with_context(|| format!("{} / {}", self.cert_file.display(), self.key_file.display()))
    }

    fn read(&self) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        Ok((read(&self.cert_file)?, read(&self.key_file)?))
    }
}

/// The key pair of `cert` and `key` (PEM), checked to belong together.
fn certified_key(cert: &[u8], key: &[u8]) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>().context("certificate PEM")?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in the certificate file");
    let key = PrivateKeyDer::from_pem_slice(key).context("private key PEM")?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(chain, key, &provider).context("certificate and key")?;
    Ok(ck)
}

/// Hands out the certificate in use and swaps it when the files change.
#[derive(Debug)]
struct Reloading {
    files: ServerTls,
    current: RwLock<(Vec<u8>, Vec<u8>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("certificate lock").2.clone())
    }
}

impl Reloading {
    /// Installs the files' pair if it differs from the one in use; a pair
    /// that does not load is logged and the old one kept.
    fn reload(&self) {
        let (cert, key) = match self.files.read() {
            Ok(pair) => pair,
            Err(e) => {
                return warn!(error = %format!("{e:#}"), "TLS certificate files unreadable; serving the previous one");
            }
        };
        {
            let cur = self.current.read().expect("certificate lock");
            if cur.0 == cert && cur.1 == key {
                return;
            }
        }
        match certified_key(&cert, &key) {
            Ok(ck) => {
                *self.current.write().expect("certificate lock") = (cert, key, Arc::new(ck));
                info!(cert = %self.files.cert_file.display(), "TLS certificate reloaded");
            }
            // A renewal writes the two files one after the other: the next
            // poll sees the pair complete.
            Err(e) => warn!(error = %format!("{e:#}"), "TLS certificate files do not load; serving the previous one"),
        }
    }
}

/// The accepted TLS connections of `listener`, with the certificate of
/// `files` (read now: a bad pair fails the start, then re-read every
/// [`RELOAD_INTERVAL`]). The accept and reload tasks end when the stream is
/// dropped.
pub fn incoming(
    listener: TcpListener,
    files: &ServerTls,
) -> anyhow::Result<ReceiverStream<std::io::Result<TlsStream<TcpStream>>>> {
    let (cert, key) = files.read()?;
    let ck = certified_key(&cert, &key)
        .with_context(|| format!("{} / {}", files.cert_file.display(), files.key_file.display()))?;
    let resolver = Arc::new(Reloading { files: files.clone(), current: RwLock::new((cert, key, Arc::new(ck))) });
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(async move {
        let mut reload = tokio::time::interval(RELOAD_INTERVAL);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                _ = reload.tick() => {
                    resolver.reload();
                    continue;
                }
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: retry shortly.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Replies are small frames: see the plaintext path in `run_with`.
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    // A plaintext client, a client that does not trust the
                    // certificate, or a stalled one: its connection only.
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    Ok(ReceiverStream::new(rx))
}
