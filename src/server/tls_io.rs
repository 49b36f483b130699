//! TLS over a non-blocking socket, driven the way the session drives a plain one: no
//! futures, only `poll_*` and `try_*` calls. Generic over the side of the connection
//! (`rustls::ClientConnection` to servers, `rustls::ServerConnection` for clients), so the
//! client listener can wrap its sockets in the same type.
//!
//! rustls keeps two buffers that a plain socket does not have, and both can stall a loop
//! that only watches the socket:
//! - decrypted plaintext not yet read: a "socket readable" wait would never end, so reads
//!   take what rustls holds first and touch the socket only when it holds nothing;
//! - ciphertext not yet written: a write can be accepted into rustls and the socket still
//!   be full, so [`TlsIo::wants_write`] says so and [`TlsIo::poll_flush_tls`] (the TLS
//!   stream's "write ready") writes it, registering for writability while it cannot.

use std::io::{self, IoSlice, Read, Write};
use std::ops::DerefMut;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ConnectionCommon, SideData};

/// A non-blocking socket [`TlsIo`] reads ciphertext from and writes it to.
pub trait RawSocket: AsyncWrite + Unpin {
    /// Registers for readability; Ready when a read may make progress.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Registers for writability; Ready when a write may make progress.
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads without waiting (`WouldBlock` clears the readiness).
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes without waiting (`WouldBlock` clears the readiness).
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl RawSocket for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }
}

/// A TLS connection over socket `S` whose handshake is done (tokio-rustls ran it; its
/// `into_inner()` gives the two halves). Owned like the socket it wraps: by the pool while
/// idle, by one session while lent. Every method is non-blocking or a plain `poll_*`.
pub struct TlsIo<S, C> {
    socket: S,
    tls: C,
    /// The socket reached end of file.
    eof: bool,
}

impl<S, C> std::fmt::Debug for TlsIo<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIo").field("eof", &self.eof).finish()
    }
}

/// `io::Read`/`io::Write` over the socket's `try_*` calls, for rustls' `read_tls` and
/// `write_tls`.
struct NonBlocking<'a, S>(&'a S);

impl<S: RawSocket> Read for NonBlocking<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl<S: RawSocket> Write for NonBlocking<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S, C, D> TlsIo<S, C>
where
    S: RawSocket,
    C: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    /// Wraps a socket and the rustls connection that finished its handshake on it.
    pub fn new(socket: S, tls: C) -> Self {
        TlsIo {
            socket,
            tls,
            eof: false,
        }
    }

    /// The socket underneath.
    pub fn socket(&self) -> &S {
        &self.socket
    }

    /// The rustls connection (protocol version, cipher suite, peer certificates).
    pub fn connection(&self) -> &C {
        &self.tls
    }

    /// How the connection is described in `/clients`, `/servers` and the console's `tls`
    /// column: protocol version and cipher suite, as PgBouncer shows them
    /// (`TLSv1.3/TLS_AES_256_GCM_SHA384`).
    pub fn describe(&self) -> String {
        let version = match self.tls.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLS",
        };
        match self.tls.negotiated_cipher_suite() {
            Some(suite) => {
                let name = format!("{:?}", suite.suite());
                let name = name.strip_prefix("TLS13_").unwrap_or(&name);
                let name = name.strip_prefix("TLS_").unwrap_or(name);
                format!("{version}/TLS_{name}")
            }
            None => version.to_owned(),
        }
    }

    /// Whether ciphertext waits to be written: the owner must then poll
    /// [`TlsIo::poll_flush_tls`] even when it has nothing more to send.
    pub fn wants_write(&self) -> bool {
        self.tls.wants_write()
    }

    /// Writes waiting ciphertext without waiting; true when none is left.
    fn flush_now(&mut self) -> io::Result<bool> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut NonBlocking(&self.socket)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Ready once no ciphertext waits, writing it as the socket takes it; Pending (woken
    /// when the socket is writable) while it cannot. The TLS stream's "write ready": after
    /// it, [`TlsIo::try_write_vectored`] accepts plaintext again.
    pub fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.flush_now()? {
                return Poll::Ready(Ok(()));
            }
            ready!(self.socket.poll_write_ready(cx))?;
        }
    }

    /// Encrypts what rustls' buffer takes (after writing the ciphertext already waiting)
    /// and writes what the socket takes. `WouldBlock` when rustls' buffer is full; what is
    /// left for the socket is written by [`TlsIo::poll_flush_tls`].
    pub fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.flush_now()?;
        let taken = self.tls.writer().write_vectored(bufs)?;
        self.flush_now()?;
        if taken == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    /// Reads plaintext into `buf`: what rustls decrypted already, else more ciphertext
    /// from the socket. Nothing read (with `buf` not full) means end of stream.
    pub fn poll_read_tls(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let state = match self.tls.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    // rustls queued an alert that says why; best effort to send it.
                    let _ = self.flush_now();
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
            };
            let available = state.plaintext_bytes_to_read();
            if available > 0 {
                // Only as much as rustls holds is initialized: the caller's buffer is
                // often far larger (a session reserves 256 KiB) and uninitialized.
                let dst = buf.initialize_unfilled_to(available.min(buf.remaining()));
                let n = self.tls.reader().read(dst)?;
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if state.peer_has_closed() || self.eof {
                // close_notify, or EOF without it: messages are length-framed, so a cut
                // one is caught by whoever frames them.
                return Poll::Ready(Ok(()));
            }
            if self.tls.wants_write() {
                // Something to answer (a key update): sent when the socket takes it, and
                // by the owner's flush otherwise.
                self.flush_now()?;
            }
            match self.tls.read_tls(&mut NonBlocking(&self.socket)) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.socket.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Whether nothing was received that no one read: no plaintext, no close_notify
    /// (for the liveness probe of an idle connection; the socket itself is peeked apart).
    pub fn quiet(&self) -> bool {
        self.tls.wants_read()
    }

    /// Queues close_notify and writes it if the socket takes it now. Never blocks.
    pub fn close_now(&mut self) {
        self.tls.send_close_notify();
        let _ = self.flush_now();
    }
}

impl<S, C, D> AsyncRead for TlsIo<S, C>
where
    S: RawSocket,
    C: DerefMut<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_read_tls(cx, buf)
    }
}

impl<S, C, D> AsyncWrite for TlsIo<S, C>
where
    S: RawSocket,
    C: DerefMut<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.try_write_vectored(&[IoSlice::new(buf)]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(this.poll_flush_tls(cx))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_tls(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.eof {
            // Once per call is harmless: rustls sends close_notify only once.
            this.tls.send_close_notify();
        }
        ready!(this.poll_flush_tls(cx))?;
        Pin::new(&mut this.socket).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

    use super::*;
    use crate::client::OutQueue;
    use crate::server::ServerStream;

    const TOTAL: usize = 8 * 1024 * 1024;

    fn byte_at(i: usize) -> u8 {
        (i % 251) as u8
    }

    /// A connected pair: our `ServerStream::Tls` and the peer's tokio-rustls stream.
    async fn pair() -> (
        ServerStream,
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_der = CertificateDer::from(cert.der().to_vec());
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key_der)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert_der).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            acceptor.accept(tcp).await.unwrap()
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (tcp, conn) = connector.connect(name, tcp).await.unwrap().into_inner();
        let ours = ServerStream::Tls(Box::new(TlsIo::new(tcp, conn)));
        (ours, accept.await.unwrap())
    }

    /// Writes as the session does: `write_now` from the queue, then waits for write
    /// readiness while bytes are queued or ciphertext waits. A peer that reads slowly
    /// fills the socket, so every "accepted but not yet sent" path is taken; all
    /// bytes must arrive, in order.
    #[tokio::test]
    async fn session_style_writes_never_stall() {
        use std::os::fd::AsRawFd;
        let (mut ours, mut peer) = pair().await;
        // Small socket buffers, and a peer that reads only once the writer found the
        // socket full: the paths where rustls holds ciphertext the socket refused run.
        let small = |fd: i32, option: i32| {
            let size: libc::c_int = 32 * 1024;
            let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: an open socket, and a c_int with its length.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    option,
                    std::ptr::from_ref(&size).cast(),
                    len,
                )
            };
            assert_eq!(rc, 0);
        };
        let ServerStream::Tls(io) = &ours else {
            unreachable!("a TLS stream");
        };
        small(io.socket().as_raw_fd(), libc::SO_SNDBUF);
        small(peer.get_ref().0.as_raw_fd(), libc::SO_RCVBUF);
        let (full_tx, full_rx) = tokio::sync::oneshot::channel::<()>();
        let mut full_tx = Some(full_tx);
        let reader = tokio::spawn(async move {
            full_rx.await.unwrap();
            let mut got = Vec::with_capacity(TOTAL);
            let mut buf = vec![0u8; 4096];
            while got.len() < TOTAL {
                let n = peer.read(&mut buf).await.unwrap();
                assert!(n > 0, "EOF after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
                tokio::task::yield_now().await;
            }
            got
        });
        let mut queue = OutQueue::default();
        for start in (0..TOTAL).step_by(100_000) {
            let end = (start + 100_000).min(TOTAL);
            let chunk: BytesMut = (start..end).map(byte_at).collect();
            queue.push(chunk);
        }
        loop {
            queue.write_now(&mut ours).unwrap();
            if queue.is_empty() && !ours.wants_write() {
                break;
            }
            std::future::poll_fn(|cx| {
                let polled = ours.poll_write_ready(cx);
                if polled.is_pending()
                    && let Some(tx) = full_tx.take()
                {
                    tx.send(()).unwrap();
                }
                polled
            })
            .await
            .unwrap();
        }
        assert!(full_tx.is_none(), "the socket never filled up");
        let got = tokio::time::timeout(std::time::Duration::from_secs(60), reader)
            .await
            .expect("the peer got every byte")
            .unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == byte_at(i)));
    }

    /// Reads with a buffer smaller than a TLS record: what rustls decrypted and the
    /// caller had no room for comes out on the next read, without the socket being
    /// readable again.
    #[tokio::test]
    async fn small_reads_drain_what_rustls_holds() {
        let (mut ours, mut peer) = pair().await;
        let data: Vec<u8> = (0..TOTAL).map(byte_at).collect();
        let writer = tokio::spawn(async move {
            peer.write_all(&data).await.unwrap();
            peer.flush().await.unwrap();
            // Stays open: the reader must not depend on EOF to see the last bytes.
            peer
        });
        let mut got = Vec::with_capacity(TOTAL);
        let mut buf = [0u8; 1000];
        while got.len() < TOTAL {
            let n = ours.read(&mut buf).await.unwrap();
            assert!(n > 0, "EOF after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.iter().enumerate().all(|(i, &b)| b == byte_at(i)));
        let mut peer = writer.await.unwrap();
        // An orderly close reads as end of stream.
        peer.shutdown().await.unwrap();
        assert_eq!(ours.read(&mut buf).await.unwrap(), 0);
    }
}
