//! Why a checkout waits, kept up to date while it does, and said in words.
//!
//! A checkout that gets an idle server at once records nothing: no allocation, no clock
//! read. One that waits gets a [`WaitNote`] the first time it must wait; the note's cells
//! go with it into the pool's queue, so that whatever changes the reason (an operator's
//! pause, a budget's turn, the upstream failing, a shutdown) rewrites it under the pool's
//! lock where the views read it: the client's registry entry. When the wait ends, the
//! weightiest of its causes labels `pgmux_wait_seconds` and, after a timeout, the 53300
//! error.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::{BudgetKind, Pool, State};
use crate::clients::{ClientHandle, ClientRegistry, WaitCause, WaitCell};

/// How many holders an explanation names.
const HOLDERS_NAMED: usize = 3;

/// Where one waiting checkout's cause is written: its client's registry entry (the cause
/// now, read by the views), if it has one, and its own cell (the weightiest cause of the
/// wait so far, read when it ends).
#[derive(Clone)]
pub(super) struct Cells {
    /// `weight << 8 | cause`, raised with `fetch_max`.
    own: Arc<AtomicU16>,
    client: Option<WaitCell>,
}

impl Cells {
    /// Records the cause in both places.
    pub(super) fn set(&self, cause: WaitCause) {
        self.own
            .fetch_max(u16::from(weight(cause)) << 8 | cause as u16, Relaxed);
        if let Some(c) = &self.client {
            c.set(Some(cause));
        }
    }
}

/// Which cause a wait that had several is counted under: the one that explains most of
/// it. A pause or a drain holds every waiter whatever else; an upstream that fails makes
/// any wait long; a cap across pools is narrower than the pool being full; opening a
/// connection is the normal end of a wait for a free slot.
fn weight(cause: WaitCause) -> u8 {
    match cause {
        WaitCause::UpstreamConnecting => 1,
        WaitCause::PoolFull => 2,
        WaitCause::DatabaseCap | WaitCause::UserCap => 3,
        WaitCause::UpstreamBackoff => 4,
        WaitCause::Paused => 5,
        WaitCause::Draining => 6,
    }
}

/// One checkout's watch over its own wait. Made for every checkout, it holds only a
/// reference until the checkout must wait.
pub(super) struct Watch<'a> {
    client: Option<&'a ClientHandle>,
    cells: Option<Cells>,
}

impl<'a> Watch<'a> {
    pub(super) fn new(client: Option<&'a ClientHandle>) -> Self {
        Watch {
            client,
            cells: None,
        }
    }

    /// The cells of this wait, made on first use (the checkout waits from now).
    pub(super) fn cells(&mut self) -> Cells {
        let client = self.client;
        self.cells
            .get_or_insert_with(|| Cells {
                own: Arc::new(AtomicU16::new(0)),
                client: client.map(ClientHandle::wait_cell),
            })
            .clone()
    }

    /// Records `cause` for a wait outside the queue (a connection being opened).
    pub(super) fn set(&mut self, cause: WaitCause) {
        self.cells().set(cause);
    }

    /// What the checkout waited for: of the causes it had, the weightiest ([`weight`]).
    /// `None` if it never waited.
    pub(super) fn cause(&self) -> Option<WaitCause> {
        let cells = self.cells.as_ref()?;
        WaitCause::from_u8((cells.own.load(Relaxed) & 0xff) as u8)
    }
}

impl Drop for Watch<'_> {
    /// The client no longer waits (served, refused, or gone).
    fn drop(&mut self) {
        if let Some(Cells {
            client: Some(c), ..
        }) = &self.cells
        {
            c.set(None);
        }
    }
}

impl State {
    /// The cause a waiter shows: draining and a pause override what it waits for.
    pub(super) fn effective(&self, base: WaitCause, draining: bool) -> WaitCause {
        if draining {
            WaitCause::Draining
        } else if self.paused {
            WaitCause::Paused
        } else {
            base
        }
    }

    /// Rewrites every waiter's cause after the pool's state changed.
    pub(super) fn refresh_waiters(&self, draining: bool) {
        for w in &self.waiters {
            w.cells.set(self.effective(w.base, draining));
        }
    }

    /// Gives every waiter a new base cause where `change` says so, and rewrites them all.
    pub(super) fn rebase_waiters(
        &mut self,
        draining: bool,
        change: impl Fn(WaitCause) -> Option<WaitCause>,
    ) {
        for w in &mut self.waiters {
            if let Some(base) = change(w.base) {
                w.base = base;
            }
        }
        self.refresh_waiters(draining);
    }
}

/// The cause of waiting for a budget of `kind`.
pub(super) fn budget_cause(kind: BudgetKind) -> WaitCause {
    match kind {
        BudgetKind::Database => WaitCause::DatabaseCap,
        BudgetKind::User => WaitCause::UserCap,
    }
}

impl Pool {
    /// The registry of this pool's clients, to name the holders a full pool waits for.
    /// Set once by the pooler; pools without one (auth_query lookups) name nobody.
    pub fn set_clients(&self, clients: Arc<ClientRegistry>) {
        let _ = self.clients.set(clients);
    }

    /// Whether the pool drains: pgmux stops, or a reload removed it.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Marks the pool as draining (pgmux is shutting down): its waiters say so. It keeps
    /// serving; servers still come back to waiters as transactions end.
    pub fn drain(&self) {
        self.draining.store(true, Relaxed);
        self.state.lock().refresh_waiters(true);
    }

    /// Why a client waits, in words for the client and the operator: the numbers behind
    /// `cause` as of now (the pool's size and use and the longest holders' application_name,
    /// the limit reached, the upstream's last error, ...).
    pub fn explain(&self, cause: WaitCause) -> String {
        let settings = self.settings();
        let (in_use, waiting, error, retry) = {
            let st = self.state.lock();
            let now = Instant::now();
            (
                (st.open as usize).saturating_sub(st.idle.len()),
                st.waiters.len(),
                st.health.last_error().map(ToString::to_string),
                st.health.retry_wait(now),
            )
        };
        let mut out = String::new();
        match cause {
            WaitCause::PoolFull => {
                let _ = write!(
                    out,
                    "pool full (size {}, {in_use} in use, {waiting} waiting)",
                    settings.size
                );
                if let Some(clients) = self.clients.get() {
                    let holders =
                        clients.longest_holders(&self.key.database, &self.key.user, HOLDERS_NAMED);
                    for (i, h) in holders.iter().enumerate() {
                        out.push_str(if i == 0 { "; longest holders: " } else { ", " });
                        let _ = write!(
                            out,
                            "application_name \"{}\" (client {}) for {}",
                            h.application_name.escape_debug(),
                            h.client,
                            seconds(h.held)
                        );
                    }
                }
            }
            WaitCause::DatabaseCap | WaitCause::UserCap => {
                let kind = match cause {
                    WaitCause::DatabaseCap => BudgetKind::Database,
                    _ => BudgetKind::User,
                };
                match self.budgets().into_iter().find(|b| b.kind == kind) {
                    Some(b) => {
                        let v = b.view();
                        let _ = write!(
                            out,
                            "{} ({}) reached for {} \"{}\" across its pools ({} open, {} waiting)",
                            kind.setting(),
                            v.limit,
                            kind.as_str(),
                            v.name.escape_debug(),
                            v.used,
                            v.waiting
                        );
                    }
                    None => out.push_str(kind.setting()),
                }
            }
            WaitCause::UpstreamConnecting => {
                let _ = write!(out, "opening a server connection to {}", self.upstream());
                if let Some(e) = &error {
                    let _ = write!(out, " (the last attempt failed: {e})");
                }
            }
            WaitCause::UpstreamBackoff => {
                let _ = write!(
                    out,
                    "upstream {} unreachable: {}",
                    self.upstream(),
                    error.as_deref().unwrap_or("unknown error")
                );
                if let Some(wait) = retry {
                    let _ = write!(out, "; next attempt in {} ms", wait.as_millis());
                }
            }
            WaitCause::Paused => {
                out.push_str("pool paused by an operator: it waits until the pool is resumed");
            }
            WaitCause::Draining => out.push_str(
                "pool draining (pgmux is shutting down, or a reload removed the pool): only running transactions finish",
            ),
        }
        out
    }
}

/// `1.234s`: durations in explanations.
fn seconds(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}
