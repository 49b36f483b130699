//! The console's commands that change something: RELOAD, SET, PAUSE, RESUME, RECONNECT,
//! KILL, KILL_CLIENT, DISABLE, ENABLE, WAIT_CLOSE and SHUTDOWN, with PgBouncer's meaning
//! (its doc/usage.md) where pgmux can give it. Each is logged.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::BytesMut;
use tracing::{info, warn};

use super::rows::{complete, notice};
use super::settings;
use crate::client::ClientError;
use crate::clients::Alert;
use crate::logging::Escaped;
use crate::pool::Pool;
use crate::pooler::Pooler;
use crate::protocol::PgError;

/// How often SHUTDOWN WAIT_FOR_CLIENTS looks whether the last client left.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// The pools of `database`, or every pool. A configured database with no pool yet
/// matches nothing; an unknown one is an error.
pub fn matching(pooler: &Pooler, database: Option<&str>) -> Result<Vec<Arc<Pool>>, PgError> {
    let pools = pooler.pools();
    let Some(db) = database else {
        return Ok(pools);
    };
    known(pooler, db)?;
    Ok(pools.into_iter().filter(|p| p.key.database == db).collect())
}

/// Refuses (3D000) a database the config does not list.
fn known(pooler: &Pooler, database: &str) -> Result<(), PgError> {
    if pooler.snapshot().config.databases.contains_key(database) {
        Ok(())
    } else {
        Err(ClientError::UnknownDatabase(database.to_owned()).error())
    }
}

/// RELOAD: read the config file again; nothing changes if it has problems.
pub async fn reload(pooler: &Arc<Pooler>, out: &mut BytesMut) -> Result<(), PgError> {
    let p = pooler.clone();
    let result = tokio::task::spawn_blocking(move || p.reload())
        .await
        .map_err(|e| ClientError::ReloadFailed(e.to_string()).error())?;
    match result {
        Ok(changes) => {
            notice(out, &describe("config reloaded", &changes));
            complete(out, "RELOAD");
            Ok(())
        }
        Err(e) => Err(ClientError::ReloadRefused(e.problems().join("\n")).error()),
    }
}

fn describe(what: &str, changes: &[String]) -> String {
    if changes.is_empty() {
        format!("{what}: nothing changed")
    } else {
        format!("{what}:\n{}", changes.join("\n"))
    }
}

/// `SET key = value`: one setting changed live, as safely as a reload (`settings.rs`).
pub async fn set(
    pooler: &Arc<Pooler>,
    assignment: &str,
    out: &mut BytesMut,
) -> Result<(), PgError> {
    let change = settings::parse(assignment)?;
    let (key, written) = (change.key, change.written.clone());
    let p = pooler.clone();
    // Deriving SCRAM keys for the new snapshot is blocking work, as in a reload.
    let result = tokio::task::spawn_blocking(move || {
        p.apply_config(|config| settings::changed(config, change))
    })
    .await
    .map_err(|e| ClientError::ReloadFailed(e.to_string()).error())?;
    match result {
        Ok(changes) => {
            info!(setting = key, value = %Escaped(&written), "SET on the admin console");
            notice(out, &describe(&format!("{key} = {written}"), &changes));
            complete(out, "SET");
            Ok(())
        }
        Err(e) => {
            let problems = e.problems().join("; ");
            warn!(setting = key, value = %Escaped(&written), %problems, "SET refused: nothing changed");
            Err(ClientError::ConsoleSetRefused(problems).error())
        }
    }
}

/// PAUSE [db]: finish running transactions, hold new ones, close the servers.
pub async fn pause(pooler: &Pooler, db: Option<&str>, out: &mut BytesMut) -> Result<(), PgError> {
    let pools = matching(pooler, db)?;
    let waits = pools.iter().map(|p| crate::admin::pause(p));
    let drained = futures_util::future::join_all(waits).await;
    let busy: usize = pools
        .iter()
        .zip(drained)
        .filter(|(_, done)| !done)
        .map(|(p, _)| p.view().active)
        .sum();
    if busy > 0 {
        notice(
            out,
            &format!("paused; {busy} transactions still running: new ones wait until RESUME"),
        );
    }
    logged("PAUSE", db, pools.len());
    complete(out, "PAUSE");
    Ok(())
}

/// RESUME [db]: after PAUSE or KILL.
pub fn resume(pooler: &Pooler, db: Option<&str>, out: &mut BytesMut) -> Result<(), PgError> {
    let pools = matching(pooler, db)?;
    pools.iter().for_each(|p| p.resume());
    logged("RESUME", db, pools.len());
    complete(out, "RESUME");
    Ok(())
}

/// RECONNECT [db]: replace every server connection once it is idle.
pub fn reconnect(pooler: &Pooler, db: Option<&str>, out: &mut BytesMut) -> Result<(), PgError> {
    let pools = matching(pooler, db)?;
    pools.iter().for_each(|p| p.reconnect());
    logged("RECONNECT", db, pools.len());
    complete(out, "RECONNECT");
    Ok(())
}

/// KILL [db]: end every client of the database (or of every database) now, close its
/// servers, and pause its pools: new clients wait until RESUME, as in PgBouncer.
pub fn kill(pooler: &Pooler, db: Option<&str>, out: &mut BytesMut) -> Result<(), PgError> {
    let pools = matching(pooler, db)?;
    for pool in &pools {
        pool.pause(); // idle servers close now; new checkouts wait for RESUME
        pool.reconnect(); // lent ones close when their (killed) client gives them back
    }
    let clients: Vec<u64> = pooler
        .clients_registry
        .snapshot()
        .into_iter()
        .filter(|c| db.is_none_or(|db| c.database == db))
        .map(|c| c.id)
        .collect();
    let killed = pooler.clients_registry.raise_on(clients, Alert::KILL);
    info!(database = %Escaped(db.unwrap_or("(all)")), clients = killed, pools = pools.len(), "KILL on the admin console");
    notice(
        out,
        &format!("killed {killed} clients; the pools are paused until RESUME"),
    );
    complete(out, "KILL");
    Ok(())
}

/// KILL_CLIENT id: end that client now (the id of SHOW CLIENTS).
pub fn kill_client(pooler: &Pooler, id: &str, out: &mut BytesMut) -> Result<(), PgError> {
    let no_such = || ClientError::ConsoleNoSuchClient(id.to_owned()).error();
    let id: u64 = id.parse().map_err(|_| no_such())?;
    if pooler.clients_registry.raise_on([id], Alert::KILL) == 0 {
        return Err(no_such());
    }
    info!(client = id, "KILL_CLIENT on the admin console");
    complete(out, "KILL_CLIENT");
    Ok(())
}

/// DISABLE db (`disable`) or ENABLE db: new logins to it are refused, or let in again.
pub fn disable(
    pooler: &Pooler,
    db: &str,
    disable: bool,
    out: &mut BytesMut,
) -> Result<(), PgError> {
    known(pooler, db)?;
    pooler.admission.set_disabled(db, disable);
    let verb = if disable { "DISABLE" } else { "ENABLE" };
    info!(database = %Escaped(db), "{verb} on the admin console");
    complete(out, verb);
    Ok(())
}

/// WAIT_CLOSE [db]: returns once no server of the database (or of any) is marked to
/// close (after RECONNECT, KILL or a reload that changed its upstream).
pub async fn wait_close(
    pooler: &Pooler,
    db: Option<&str>,
    out: &mut BytesMut,
) -> Result<(), PgError> {
    let pools = matching(pooler, db)?;
    let all = futures_util::future::join_all(pools.iter().map(|p| p.wait_close()));
    tokio::select! {
        _ = all => {}
        _ = pooler.stop.cancelled() => return Err(ClientError::ShuttingDown.error()),
    }
    logged("WAIT_CLOSE", db, pools.len());
    complete(out, "WAIT_CLOSE");
    Ok(())
}

/// How SHUTDOWN stops pgmux.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// SHUTDOWN: every session ends now.
    Now,
    /// SHUTDOWN WAIT_FOR_SERVERS: stop accepting; each session ends when its transaction
    /// does (its server released), the rest after `server.shutdown_timeout` (SIGTERM).
    WaitForServers,
    /// SHUTDOWN WAIT_FOR_CLIENTS: refuse new logins, stop once every client has left.
    WaitForClients,
}

/// SHUTDOWN [WAIT_FOR_SERVERS | WAIT_FOR_CLIENTS].
pub fn shutdown(pooler: &Arc<Pooler>, how: Shutdown, out: &mut BytesMut) {
    info!(?how, "SHUTDOWN on the admin console");
    match how {
        Shutdown::Now => {
            pooler.stop.cancel();
            pooler.kill.cancel();
        }
        Shutdown::WaitForServers => pooler.stop.cancel(),
        Shutdown::WaitForClients => {
            pooler.admission.drain();
            // Readiness says no from now on.
            pooler.listening.store(false, Relaxed);
            let pooler = pooler.clone();
            tokio::spawn(async move {
                while !pooler.clients_registry.is_empty() {
                    tokio::select! {
                        _ = pooler.stop.cancelled() => return,
                        _ = tokio::time::sleep(DRAIN_POLL) => {}
                    }
                }
                info!("SHUTDOWN WAIT_FOR_CLIENTS: the last client left");
                pooler.stop.cancel();
            });
        }
    }
    complete(out, "SHUTDOWN");
}

fn logged(command: &str, db: Option<&str>, pools: usize) {
    info!(database = %Escaped(db.unwrap_or("(all)")), pools, "{command} on the admin console");
}
