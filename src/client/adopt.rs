//! A client moved in by an upgrade (`crate::upgrade`): its session rebuilt from the state
//! the old process sent, with no login and no greeting, so that the client sees nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;

use super::error::ClientError;
use super::params::ClientParams;
use super::session::{Session, SessionParts};
use crate::config::PoolMode;
use crate::pooler::Pooler;
use crate::prepared::ClientStatements;
use crate::upgrade::state::SessionState;

/// The session of a client the old process handed over. Its cancel key, settings, greeting
/// and named statements are the ones it had; its limits are this process's config. The
/// statements are prepared on this process's servers when first used, as on any server
/// that lacks them.
pub(super) fn session(
    pooler: &Arc<Pooler>,
    peer: SocketAddr,
    state: SessionState,
) -> Result<Session, Box<ClientError>> {
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
    } = state;
    let Some(pool) = pooler.pool(&database, &user) else {
        return Err(Box::new(ClientError::UnknownDatabase(database)));
    };
    let settings = pool.settings();
    if settings.mode == PoolMode::Session {
        // Its client would need to be told the process id of a server of its own.
        return Err(Box::new(ClientError::Upgrading(
            "session mode keeps one server",
        )));
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
    Ok(Session::assemble(
        pooler,
        &pooler.snapshot(),
        pool,
        SessionParts {
            server: None,
            view,
            params: ClientParams::from_parts(wants, greeted, seen),
            cancel,
            statements: names,
            cbuf: BytesMut::new(),
            client_slot,
            subscription,
        },
    ))
}
