//! The socket to a PostgreSQL server: TCP, or a Unix-domain socket when the upstream's
//! host is a directory (as libpq and PgBouncer read `host=/var/run/postgresql`). A TCP
//! socket gets the pool's keepalive and user-timeout options as soon as it is connected,
//! and may then carry TLS ([`super::tls`]).

use std::fmt;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::os::fd::{AsRawFd, RawFd};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::tls::{Negotiated, ServerTlsIo, TlsConnector};
use crate::config::TcpOptions;

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp(std::net::SocketAddr),
    /// The socket file itself: `<dir>/.s.PGSQL.<port>`.
    Unix(Arc<Path>),
    /// A TCP server that pgmux talks TLS to: a cancel request goes the same way.
    Tls {
        addr: std::net::SocketAddr,
        /// The configured host name, which `verify-full` checks the certificate against.
        host: Arc<str>,
        tls: TlsConnector,
    },
}

impl ServerAddr {
    /// The socket file PostgreSQL listens on when `host` is a directory, as libpq builds it;
    /// `None` for a host name or address.
    pub fn unix_socket(host: &str, port: u16) -> Option<PathBuf> {
        host.starts_with('/')
            .then(|| Path::new(host).join(format!(".s.PGSQL.{port}")))
    }

    /// Opens a new connection (for a CancelRequest), with TLS if the connection to be
    /// cancelled has it (PostgreSQL takes a CancelRequest after a TLS handshake too).
    pub async fn connect(&self) -> io::Result<ServerStream> {
        Ok(match self {
            ServerAddr::Tcp(addr) => ServerStream::Tcp(TcpStream::connect(addr).await?),
            ServerAddr::Unix(path) => ServerStream::Unix(UnixStream::connect(path).await?),
            ServerAddr::Tls { addr, host, tls } => {
                let tcp = TcpStream::connect(addr).await?;
                match tls.negotiate(tcp, host).await.map_err(io::Error::other)? {
                    Negotiated::Tls(io) => ServerStream::Tls(io),
                    Negotiated::Plain(tcp) => ServerStream::Tcp(tcp),
                }
            }
        })
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Tcp(addr) | ServerAddr::Tls { addr, .. } => addr.fmt(f),
            ServerAddr::Unix(path) => path.display().fmt(f),
        }
    }
}

/// A connected server socket. The session polls it directly; everything else uses it
/// through `AsyncRead` / `AsyncWrite`.
///
/// TLS buffers bytes on both sides of the socket, so for it "write ready" means "no
/// ciphertext waits" ([`ServerStream::poll_write_ready`] writes it), and a holder with
/// nothing queued must still poll while [`ServerStream::wants_write`]. The plain variants
/// pay one predictable branch for that.
#[derive(Debug)]
pub enum ServerStream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Boxed: rustls' state is large, and the plain variants stay small.
    Tls(Box<ServerTlsIo>),
}

impl ServerStream {
    /// Connects to `host:port` and sets `tcp` on the socket, or connects to the Unix socket
    /// in directory `host` (where TCP options mean nothing).
    pub async fn connect(
        host: &str,
        port: u16,
        tcp: &TcpOptions,
    ) -> io::Result<(ServerStream, ServerAddr)> {
        match ServerAddr::unix_socket(host, port) {
            Some(path) => {
                let stream = UnixStream::connect(&path).await?;
                Ok((ServerStream::Unix(stream), ServerAddr::Unix(path.into())))
            }
            None => {
                let stream = TcpStream::connect((host, port)).await?;
                stream.set_nodelay(true)?;
                set_tcp_options(stream.as_raw_fd(), tcp)?;
                let addr = stream.peer_addr()?;
                Ok((ServerStream::Tcp(stream), ServerAddr::Tcp(addr)))
            }
        }
    }

    /// Ready when a write may make progress. For TLS: once the ciphertext that waits is
    /// written (it writes it), registering for writability while the socket is full.
    pub fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ServerStream::Tcp(s) => s.poll_write_ready(cx),
            ServerStream::Unix(s) => s.poll_write_ready(cx),
            ServerStream::Tls(s) => s.poll_flush_tls(cx),
        }
    }

    /// Whether bytes accepted earlier still wait to be written (only TLS buffers them):
    /// the holder must keep polling [`ServerStream::poll_write_ready`] until they are.
    pub fn wants_write(&self) -> bool {
        match self {
            ServerStream::Tcp(_) | ServerStream::Unix(_) => false,
            ServerStream::Tls(s) => s.wants_write(),
        }
    }

    /// Whether an idle connection received nothing and was not closed. Never blocks, and
    /// costs no syscall while tokio knows the socket is not readable (it is called at
    /// every checkout).
    pub fn is_quiet(&self) -> bool {
        let mut probe = [0u8; 1];
        let probed = match self {
            ServerStream::Tcp(s) => s.try_read(&mut probe),
            ServerStream::Unix(s) => s.try_read(&mut probe),
            // Peeked, not read: TLS bytes must reach rustls in order. Unread plaintext or a
            // close_notify already in rustls count as "not quiet" too.
            ServerStream::Tls(s) if !s.quiet() => return false,
            ServerStream::Tls(s) => s.socket().try_io(Interest::READABLE, || {
                let fd = s.socket().as_raw_fd();
                // SAFETY: `fd` is the open socket `self` owns; the buffer is one live byte.
                let rc = unsafe {
                    libc::recv(
                        fd,
                        probe.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                usize::try_from(rc).map_err(|_| io::Error::last_os_error())
            }),
        };
        matches!(probed, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Whether it is encrypted, and how (`TLSv1_3/TLS13_AES_256_GCM_SHA384`).
    pub fn tls_description(&self) -> Option<String> {
        let ServerStream::Tls(s) = self else {
            return None;
        };
        let c = s.connection();
        let version = c.protocol_version().map(|v| format!("{v:?}"));
        let suite = c
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()));
        Some(format!(
            "{}/{}",
            version.unwrap_or_default(),
            suite.unwrap_or_default()
        ))
    }
}

/// Sets keepalive (and its timings) and the user timeout on a TCP socket. Zero values
/// leave the system's defaults. Outside Linux only `SO_KEEPALIVE` itself is set.
fn set_tcp_options(fd: RawFd, tcp: &TcpOptions) -> io::Result<()> {
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        i32::from(tcp.keepalive),
    )?;
    #[cfg(target_os = "linux")]
    {
        // Validated as whole seconds up to 32767 and milliseconds up to i32::MAX; clamped
        // again here so that no value can wrap.
        let secs = |d: std::time::Duration| i32::try_from(d.as_secs()).unwrap_or(i32::MAX);
        let tcp_option = |name, value| setsockopt(fd, libc::IPPROTO_TCP, name, value);
        if tcp.keepalive {
            if !tcp.keepidle.is_zero() {
                tcp_option(libc::TCP_KEEPIDLE, secs(tcp.keepidle))?;
            }
            if !tcp.keepintvl.is_zero() {
                tcp_option(libc::TCP_KEEPINTVL, secs(tcp.keepintvl))?;
            }
            if tcp.keepcnt > 0 {
                tcp_option(
                    libc::TCP_KEEPCNT,
                    tcp.keepcnt.try_into().unwrap_or(i32::MAX),
                )?;
            }
        }
        if !tcp.user_timeout.is_zero() {
            let millis = i32::try_from(tcp.user_timeout.as_millis()).unwrap_or(i32::MAX);
            tcp_option(libc::TCP_USER_TIMEOUT, millis)?;
        }
    }
    Ok(())
}

/// `setsockopt(2)` with an `int` value.
fn setsockopt(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket owned by the caller for the duration of the call, and
    // the option value points at a live c_int of the length given.
    let rc = unsafe { libc::setsockopt(fd, level, name, std::ptr::from_ref(&value).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A socket written to without waiting (see [`crate::client::OutQueue`]).
/// `&mut`: a TLS stream encrypts into its own buffer. `WouldBlock` means "poll write
/// readiness, then try again".
pub trait TryWrite {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize>;
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl TryWrite for TcpStream {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }

    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }
}

impl TryWrite for ServerStream {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ServerStream::Tcp(s) => s.try_write(buf),
            ServerStream::Unix(s) => s.try_write(buf),
            ServerStream::Tls(s) => s.try_write_vectored(&[IoSlice::new(buf)]),
        }
    }

    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            ServerStream::Tcp(s) => s.try_write_vectored(bufs),
            ServerStream::Unix(s) => s.try_write_vectored(bufs),
            ServerStream::Tls(s) => s.try_write_vectored(bufs),
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
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
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
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
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

    #[cfg(target_os = "linux")]
    fn getsockopt(stream: &ServerStream, level: i32, name: i32) -> i32 {
        let ServerStream::Tcp(s) = stream else {
            panic!("a TCP stream");
        };
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a live socket, and a c_int with its length.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                level,
                name,
                std::ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        value
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn tcp_options_reach_the_socket() {
        use std::time::Duration;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tcp = TcpOptions {
            keepalive: true,
            keepidle: Duration::from_secs(7),
            keepintvl: Duration::from_secs(3),
            keepcnt: 4,
            user_timeout: Duration::from_millis(2500),
        };
        let (stream, _) = ServerStream::connect("127.0.0.1", port, &tcp)
            .await
            .unwrap();
        assert_eq!(getsockopt(&stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(
            getsockopt(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            7
        );
        assert_eq!(
            getsockopt(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            3
        );
        assert_eq!(getsockopt(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 4);
        assert_eq!(
            getsockopt(&stream, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            2500
        );

        // Off: no keepalive, and the user timeout stays the system's (0).
        let off = TcpOptions {
            keepalive: false,
            user_timeout: Duration::ZERO,
            ..tcp
        };
        let (stream, _) = ServerStream::connect("127.0.0.1", port, &off)
            .await
            .unwrap();
        assert_eq!(getsockopt(&stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
        assert_eq!(
            getsockopt(&stream, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            0
        );
    }
}
