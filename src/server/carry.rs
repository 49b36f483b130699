//! A server connection that moves to a new pgmux process with the client that holds it (an
//! upgrade, `crate::upgrade`): its state as the record carries it, and the connection
//! rebuilt from that state and its socket on the other side. PostgreSQL sees nothing: the
//! socket is the same one, only the process reading it changed.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UnixStream};

use super::{BackendKey, ServerAddr, ServerConn, ServerStream};
use crate::prepared::Registry;
use crate::upgrade::state::{CarriedAddr, Hold, PreparedState, ServerState};

impl ServerConn {
    /// What the new process needs to go on using this connection for the client that
    /// keeps it (`hold` says why), or why it cannot move: a TLS connection's session keys
    /// stay in this process.
    pub fn carried(&self, hold: Hold) -> Result<ServerState, &'static str> {
        let addr = match &*self.addr {
            ServerAddr::Tcp(addr) => CarriedAddr::Tcp(*addr),
            ServerAddr::Unix(path) => match path.to_str() {
                Some(path) => CarriedAddr::Unix(path.to_owned()),
                None => return Err("its server's socket path is not UTF-8"),
            },
            ServerAddr::Tls { .. } => return Err("its server connection is encrypted (TLS)"),
        };
        if matches!(self.stream, ServerStream::Tls(_)) {
            return Err("its server connection is encrypted (TLS)");
        }
        let now = Instant::now();
        let prepared = self
            .prepared
            .iter()
            .filter_map(|statement| {
                let (query, param_types) = statement.text_and_types()?;
                Some(PreparedState {
                    name: statement.server_name.clone(),
                    query: query.to_owned(),
                    param_types,
                })
            })
            .collect();
        Ok(ServerState {
            addr,
            backend_key: (self.key.process_id, self.key.secret),
            hold,
            age_ms: millis(now.saturating_duration_since(self.created)),
            retire_in_ms: self
                .retire_at
                .map(|at| millis(at.saturating_duration_since(now))),
            params: self.params.clone(),
            initial_params: self.initial_params.clone(),
            applied: self.applied.clone(),
            prepared,
            prepared_unsure: self.prepared.is_unsure(),
        })
    }

    /// A second descriptor of its socket, to send to the new process (the connection
    /// keeps its own until it is handed off). TLS connections have none to give.
    pub fn socket_copy(&self) -> io::Result<OwnedFd> {
        match &self.stream {
            ServerStream::Tcp(s) => s.as_fd().try_clone_to_owned(),
            ServerStream::Unix(s) => s.as_fd().try_clone_to_owned(),
            ServerStream::Tls(_) => Err(io::Error::other("a TLS connection cannot be carried")),
        }
    }

    /// The connection an old process handed over: `socket` must be connected where
    /// `state` says (it is checked). Must run inside the runtime that will poll it.
    ///
    /// The statements it holds are recorded only under names this process would give
    /// them (`registry`); when it holds others, which a statement of this process could
    /// be named like (or its record was unsure already), its record is unsure, so that each is closed before it is prepared
    /// and all are deallocated at its next checkout ([`crate::prepared::ServerStatements`]).
    pub fn adopted(
        socket: OwnedFd,
        state: &ServerState,
        registry: &Registry,
    ) -> io::Result<Box<ServerConn>> {
        let mismatch = || io::Error::other("the socket is not connected where the record says");
        let (stream, addr) = match &state.addr {
            CarriedAddr::Tcp(carried) => {
                let std = std::net::TcpStream::from(socket);
                if std.peer_addr()? != *carried {
                    return Err(mismatch());
                }
                std.set_nonblocking(true)?;
                (
                    ServerStream::Tcp(TcpStream::from_std(std)?),
                    ServerAddr::Tcp(*carried),
                )
            }
            CarriedAddr::Unix(path) => {
                let std = std::os::unix::net::UnixStream::from(socket);
                let peer = std.peer_addr()?;
                if peer.as_pathname() != Some(std::path::Path::new(path)) {
                    return Err(mismatch());
                }
                std.set_nonblocking(true)?;
                let path: std::sync::Arc<std::path::Path> = std::path::Path::new(path).into();
                (
                    ServerStream::Unix(UnixStream::from_std(std)?),
                    ServerAddr::Unix(path),
                )
            }
        };
        let mut conn = Box::new(ServerConn::new(stream, addr));
        let now = Instant::now();
        conn.key = BackendKey {
            process_id: state.backend_key.0,
            secret: state.backend_key.1,
        };
        conn.created = now
            .checked_sub(Duration::from_millis(state.age_ms))
            .unwrap_or(now);
        conn.retire_at = state
            .retire_in_ms
            .and_then(|ms| now.checked_add(Duration::from_millis(ms)));
        conn.initial_params = state.initial_params.clone();
        for (name, value) in &state.params {
            conn.set_param(name, value);
        }
        conn.applied = state.applied.clone();
        let mut unsure = state.prepared_unsure;
        for carried in &state.prepared {
            let statement = registry.statement(&carried.query, &carried.param_types);
            if statement.server_name == carried.name {
                conn.prepared.insert(statement, usize::MAX);
            } else {
                unsure = true;
            }
        }
        if unsure {
            conn.prepared.distrust();
        }
        Ok(conn)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX - 1)
}
