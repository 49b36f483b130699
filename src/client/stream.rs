//! A client's socket: plain TCP, or TLS over it ([`super::tls`]). The session polls it
//! directly (`poll_read_ready`, `try_write`); the login and the admin console use it
//! through `AsyncRead` / `AsyncWrite`.
//!
//! TLS holds bytes on both sides of the socket, so "readable" also means "rustls holds
//! plaintext not yet read", and "write ready" means "no ciphertext waits" (writing it);
//! a client with nothing more queued must still be polled while [`ClientStream::wants_write`].

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::ServerConnection;

use super::tls::{ClientTls, ClientTlsIo};
use crate::server::TryWrite;

/// A connected client.
#[derive(Debug)]
pub enum ClientStream {
    Tcp(TcpStream),
    /// Boxed: rustls' state is large, and a plain client stays small.
    Tls(Box<ClientTlsIo>),
    /// The socket went into a TLS handshake that failed: there is no one left to talk
    /// to. Reads see end of file and writes fail.
    Gone,
}

impl ClientStream {
    /// Runs the server side of a TLS handshake on a plain socket and becomes its TLS
    /// stream. On failure the socket is gone ([`ClientStream::Gone`]).
    pub async fn start_tls(&mut self, tls: &ClientTls) -> io::Result<()> {
        let ClientStream::Tcp(tcp) = std::mem::replace(self, ClientStream::Gone) else {
            return Err(io::Error::other("TLS was started twice"));
        };
        *self = ClientStream::Tls(Box::new(tls.accept(tcp).await?));
        Ok(())
    }

    /// The TCP socket underneath, unless it is gone.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            ClientStream::Tcp(s) => Some(s),
            ClientStream::Tls(s) => Some(s.socket()),
            ClientStream::Gone => None,
        }
    }

    /// The TLS connection, if the client uses TLS.
    pub fn tls(&self) -> Option<&ServerConnection> {
        match self {
            ClientStream::Tcp(_) => None,
            ClientStream::Tls(s) => Some(s.connection()),
            ClientStream::Gone => None,
        }
    }

    /// How the connection is encrypted (for the views); `None`: plain.
    pub fn tls_description(&self) -> Option<Arc<str>> {
        match self {
            ClientStream::Tls(s) => Some(Arc::from(s.describe())),
            _ => None,
        }
    }

    /// Ready when a read may make progress: the socket is readable, or (TLS) rustls holds
    /// what was not read yet. Registers for readability otherwise.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ClientStream::Tcp(s) => s.poll_read_ready(cx),
            ClientStream::Tls(s) if !s.quiet() => Poll::Ready(Ok(())),
            ClientStream::Tls(s) => s.socket().poll_read_ready(cx),
            ClientStream::Gone => Poll::Ready(Ok(())),
        }
    }

    /// Ready when a write may make progress. For TLS: once the ciphertext that waits is
    /// written (it writes it), registering for writability while the socket is full.
    pub fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ClientStream::Tcp(s) => s.poll_write_ready(cx),
            ClientStream::Tls(s) => s.poll_flush_tls(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }

    /// Whether bytes accepted earlier still wait to be written (only TLS buffers them).
    pub fn wants_write(&self) -> bool {
        match self {
            ClientStream::Tcp(_) | ClientStream::Gone => false,
            ClientStream::Tls(s) => s.wants_write(),
        }
    }
}

/// What a write to a [`ClientStream::Gone`] fails with.
fn gone() -> io::Error {
    io::ErrorKind::NotConnected.into()
}

impl TryWrite for ClientStream {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Tcp(s) => s.try_write(buf),
            ClientStream::Tls(s) => s.try_write_vectored(&[IoSlice::new(buf)]),
            ClientStream::Gone => Err(gone()),
        }
    }

    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            ClientStream::Tcp(s) => s.try_write_vectored(bufs),
            ClientStream::Tls(s) => s.try_write_vectored(bufs),
            ClientStream::Gone => Err(gone()),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            ClientStream::Gone => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
}
