//! A client moved in by an upgrade (`crate::upgrade`): its session rebuilt from the state
//! the old process sent, with no login and no greeting, so that the client sees nothing.
//! A client that keeps a server between transactions (session mode, or pinned by session
//! state) arrives with that server's socket, and keeps it here.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;

use super::error::ClientError;
use super::params::ClientParams;
use super::session::{MovedPin, Session, SessionParts};
use crate::cancel::CancelTarget;
use crate::clients::StateEvent;
use crate::config::PoolMode;
use crate::pool::Lease;
use crate::pooler::Pooler;
use crate::prepared::ClientStatements;
use crate::server::ServerConn;
use crate::stats::StateAction;
use crate::upgrade::state::{Hold, SessionState};

/// The session of a client the old process handed over. Its cancel key, settings, greeting
/// and named statements are the ones it had; its limits are this process's config. The
/// statements are prepared on this process's servers when first used, as on any server
/// that lacks them. `server_socket` is the socket of the server it keeps (described by
/// `state.server`): adopted into its pool, held by it, and pinned again if it was pinned
/// (the [`MovedPin`] returned, for the session to start with).
pub(super) fn session(
    pooler: &Arc<Pooler>,
    peer: SocketAddr,
    state: SessionState,
    server_socket: Option<OwnedFd>,
) -> Result<(Session, Option<Box<MovedPin>>), Box<ClientError>> {
    let SessionState {
        database,
        user,
        application_name,
        cancel_key,
        wants,
        greeted,
        seen,
        statements,
        channels,
        server,
    } = state;
    // First the server, so that whatever refuses the client below closes it properly
    // (a Terminate, not a bare close) through its lease.
    let carried = match (server, server_socket) {
        (Some(state), Some(socket)) => {
            match ServerConn::adopted(socket, &state, &pooler.statements) {
                Ok(conn) => Some((conn, state.hold)),
                Err(e) => {
                    tracing::info!(%peer, error = %e, "the server connection of a moved client cannot be taken over");
                    return Err(Box::new(ClientError::Upgrading(
                        "its server connection could not be taken over",
                    )));
                }
            }
        }
        (None, None) => None,
        _ => {
            return Err(Box::new(ClientError::Upgrading(
                "its record and its sockets do not match",
            )));
        }
    };
    let Some(pool) = pooler.pool(&database, &user) else {
        if let Some((conn, _)) = carried {
            conn.close();
        }
        return Err(Box::new(ClientError::UnknownDatabase(database)));
    };
    let settings = pool.settings();
    let held: Option<(Lease, Hold)> = carried.map(|(conn, hold)| (pool.adopt(conn), hold));
    match (&held, settings.mode) {
        (None, PoolMode::Session) => {
            // Its client would need to be told the process id of a server of its own.
            return Err(Box::new(ClientError::Upgrading(
                "session mode keeps one server",
            )));
        }
        (Some((_, Hold::Session)), mode) if mode != PoolMode::Session => {
            return Err(Box::new(ClientError::Upgrading(
                "its pool is no longer in session mode",
            )));
        }
        (Some((_, Hold::Pinned(_))), PoolMode::Session) => {
            return Err(Box::new(ClientError::Upgrading(
                "its pool is in session mode now",
            )));
        }
        _ => {}
    }
    let client_slot = pooler
        .admit_client(&database, &user, &settings)
        .map_err(|e| Box::new(ClientError::from(e)))?;
    let Some(cancel) = pooler.cancels.adopt(cancel_key) else {
        return Err(Box::new(ClientError::Upgrading("its cancel key is taken")));
    };
    let max_prepared = settings.max_prepared_statements as usize;
    if statements.len() > max_prepared.max(pooler.statements.capacity()) {
        return Err(Box::new(ClientError::TooManyStatements(max_prepared)));
    }
    let mut names = ClientStatements::default();
    for s in statements {
        let statement = pooler.statements.statement(&s.query, &s.param_types);
        names.insert(&s.name, statement);
    }
    // Its LISTENs: the subscription this process made for it before it came (notify.rs).
    let subscription = if channels.is_empty() {
        None
    } else {
        match pooler.notify.claim(cancel_key, &channels) {
            Some(sub) => Some(Box::new(sub)),
            None => {
                return Err(Box::new(ClientError::Upgrading(
                    "its LISTEN channels were not handed over",
                )));
            }
        }
    };
    let view = pooler
        .clients_registry
        .register(peer, &database, &user, &application_name, None);
    if !channels.is_empty() {
        view.set_channels(channels);
    }
    let mut pin = None;
    let server = match held {
        Some((lease, hold)) => {
            cancel.set_target(Some(CancelTarget {
                addr: lease.addr().clone(),
                key: lease.key(),
            }));
            view.set_server(Some((lease.id(), lease.key().process_id)));
            if let Hold::Pinned(kinds) = hold {
                pin = Some(Box::new(MovedPin {
                    kinds,
                    place: pool.pin_moved(),
                }));
                let at = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                view.set_session_state(Some(StateEvent {
                    action: StateAction::Pin.as_str(),
                    pinned: true,
                    kinds: kinds.labels(),
                    statement: "(pinned before an upgrade moved it)".to_owned(),
                    at,
                }));
            }
            Some(lease)
        }
        None => None,
    };
    let session = Session::assemble(
        pooler,
        &pooler.snapshot(),
        pool,
        SessionParts {
            server,
            view,
            params: ClientParams::from_parts(wants, greeted, seen),
            cancel,
            statements: names,
            cbuf: BytesMut::new(),
            client_slot,
            subscription,
        },
    );
    Ok((session, pin))
}
