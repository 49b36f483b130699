//! The socket to a PostgreSQL server: TCP, or a Unix-domain socket when the upstream's
//! host is a directory (as libpq and PgBouncer read `host=/var/run/postgresql`).

use std::fmt;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp(std::net::SocketAddr),
    /// The socket file itself: `<dir>/.s.PGSQL.<port>`.
    Unix(Arc<Path>),
}

impl ServerAddr {
    /// The socket file PostgreSQL listens on when `host` is a directory, as libpq builds it;
    /// `None` for a host name or address.
    pub fn unix_socket(host: &str, port: u16) -> Option<PathBuf> {
        host.starts_with('/')
            .then(|| Path::new(host).join(format!(".s.PGSQL.{port}")))
    }

    /// Opens a new connection (for a CancelRequest).
    pub async fn connect(&self) -> io::Result<ServerStream> {
        Ok(match self {
            ServerAddr::Tcp(addr) => ServerStream::Tcp(TcpStream::connect(addr).await?),
            ServerAddr::Unix(path) => ServerStream::Unix(UnixStream::connect(path).await?),
        })
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Tcp(addr) => addr.fmt(f),
            ServerAddr::Unix(path) => path.display().fmt(f),
        }
    }
}

/// A connected server socket. The session polls it directly; everything else uses it
/// through `AsyncRead` / `AsyncWrite`.
#[derive(Debug)]
pub enum ServerStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl ServerStream {
    /// Connects to `host:port`, or to the Unix socket in directory `host`.
    pub async fn connect(host: &str, port: u16) -> io::Result<(ServerStream, ServerAddr)> {
        match ServerAddr::unix_socket(host, port) {
            Some(path) => {
                let stream = UnixStream::connect(&path).await?;
                Ok((ServerStream::Unix(stream), ServerAddr::Unix(path.into())))
            }
            None => {
                let stream = TcpStream::connect((host, port)).await?;
                stream.set_nodelay(true)?;
                let addr = stream.peer_addr()?;
                Ok((ServerStream::Tcp(stream), ServerAddr::Tcp(addr)))
            }
        }
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ServerStream::Tcp(s) => s.poll_write_ready(cx),
            ServerStream::Unix(s) => s.poll_write_ready(cx),
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerStream::Tcp(s) => s.try_read(buf),
            ServerStream::Unix(s) => s.try_read(buf),
        }
    }
}

/// A socket written to without waiting (see [`crate::client::OutQueue`]).
pub trait TryWrite {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl TryWrite for TcpStream {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }
}

impl TryWrite for ServerStream {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ServerStream::Tcp(s) => s.try_write(buf),
            ServerStream::Unix(s) => s.try_write(buf),
        }
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            ServerStream::Tcp(s) => s.try_write_vectored(bufs),
            ServerStream::Unix(s) => s.try_write_vectored(bufs),
        }
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_host_is_a_unix_socket() {
        assert_eq!(
            ServerAddr::unix_socket("/var/run/postgresql", 5433),
            Some(PathBuf::from("/var/run/postgresql/.s.PGSQL.5433"))
        );
        assert_eq!(ServerAddr::unix_socket("127.0.0.1", 5432), None);
        assert_eq!(ServerAddr::unix_socket("db.internal", 5432), None);
    }
}
