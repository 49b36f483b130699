//! A budget of server connections shared by several pools: `max_db_connections` (every
//! pool of one database) and `max_user_connections` (every pool of one user), as in
//! PgBouncer.
//!
//! A pool with budgets takes one unit of each for every connection it counts in `open`
//! and gives it back when the count goes down (`State::reserve` / `State::unreserve`).
//! A checkout that could open a connection but finds a budget spent waits in that
//! budget's FIFO queue, shared by all its pools; a unit given back wakes the oldest
//! waiter, which tries again. Pools without budgets never touch this module.
//!
//! Lock order: a pool's state lock, then budgets in slice order (database, then user).
//! A budget never takes a pool's lock while it holds its own.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::Pool;

/// What a budget caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetKind {
    /// Every pool of one database (`max_db_connections`).
    Database,
    /// Every pool of one user (`max_user_connections`).
    User,
}

impl BudgetKind {
    /// The setting that sets the limit.
    pub fn setting(self) -> &'static str {
        match self {
            Self::Database => "max_db_connections",
            Self::User => "max_user_connections",
        }
    }

    /// `database` or `user`: the label and JSON field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Database => "database",
            Self::User => "user",
        }
    }
}

/// One shared budget. Owned by the pooler's registry and by the pools it covers.
pub struct Budget {
    /// What it caps.
    pub kind: BudgetKind,
    /// The database or user name.
    pub name: String,
    state: Mutex<BudgetState>,
    /// Checkouts that ended in 53300 because of this budget.
    pub refused: AtomicU64,
}

struct BudgetState {
    /// Most units out at once; 0 = unlimited.
    limit: u32,
    /// Units out now (server connections counted by its pools).
    used: u32,
    /// Checkouts waiting for a unit, oldest first.
    waiters: VecDeque<(u64, oneshot::Sender<()>)>,
    next_waiter: u64,
    /// The pools it covers, for closing an idle connection of one to serve another.
    members: Vec<Weak<Pool>>,
}

impl BudgetState {
    fn has_room(&self) -> bool {
        self.limit == 0 || self.used < self.limit
    }

    /// Wakes the oldest live waiters while there is room for them.
    fn wake(&mut self) {
        let mut room = if self.limit == 0 {
            u32::MAX
        } else {
            self.limit.saturating_sub(self.used)
        };
        while room > 0
            && let Some((_, tx)) = self.waiters.pop_front()
        {
            if tx.send(()).is_ok() {
                room -= 1;
            }
        }
    }
}

/// What the views and metrics show of a budget.
#[derive(Clone, Debug)]
pub struct BudgetView {
    /// What it caps.
    pub kind: BudgetKind,
    /// The database or user name.
    pub name: String,
    /// The limit; 0 = unlimited.
    pub limit: u32,
    /// Server connections counted now.
    pub used: u32,
    /// Checkouts waiting for it now.
    pub waiting: usize,
    /// Checkouts refused with 53300 because of it, since start.
    pub refused: u64,
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.name)
    }
}

impl Budget {
    /// A budget of `limit` units for `kind` `name`, none used.
    pub fn new(kind: BudgetKind, name: &str, limit: u32) -> Arc<Budget> {
        Arc::new(Budget {
            kind,
            name: name.to_owned(),
            state: Mutex::new(BudgetState {
                limit,
                used: 0,
                waiters: VecDeque::new(),
                next_waiter: 0,
                members: Vec::new(),
            }),
            refused: AtomicU64::new(0),
        })
    }

    /// The limit in force; 0 = unlimited.
    pub fn limit(&self) -> u32 {
        self.state.lock().limit
    }

    /// Sets the limit (reload). A higher one wakes waiters at once; with a lower one,
    /// connections above it close as they come back idle (see [`Budget::wanted`]).
    pub fn set_limit(&self, limit: u32) {
        let mut st = self.state.lock();
        st.limit = limit;
        st.wake();
    }

    /// Counts and limit, for the views.
    pub fn view(&self) -> BudgetView {
        let st = self.state.lock();
        BudgetView {
            kind: self.kind,
            name: self.name.clone(),
            limit: st.limit,
            used: st.used,
            waiting: st.waiters.len(),
            refused: self.refused.load(Relaxed),
        }
    }

    /// Whether a connection coming back idle should close instead, to serve a waiter of
    /// another pool or to get under a lowered limit.
    pub(super) fn wanted(&self) -> bool {
        let st = self.state.lock();
        !st.waiters.is_empty() || (st.limit > 0 && st.used > st.limit)
    }

    /// Takes one unit of every budget in `budgets`, or none: `Err` names the first
    /// spent one. A checkout that was not woken (`woken` false) does not pass others
    /// already queued. Called under the pool's lock.
    pub(super) fn take_all(budgets: &[Arc<Budget>], woken: bool) -> Result<(), Arc<Budget>> {
        let mut guards: Vec<_> = budgets.iter().map(|b| b.state.lock()).collect();
        for (budget, st) in budgets.iter().zip(&guards) {
            if !st.has_room() || (!woken && !st.waiters.is_empty()) {
                return Err(budget.clone());
            }
        }
        for st in &mut guards {
            st.used += 1;
        }
        Ok(())
    }

    /// Gives back one unit of each of `budgets` and wakes their oldest waiters.
    pub(super) fn give_back_all(budgets: &[Arc<Budget>], n: u32) {
        for budget in budgets {
            let mut st = budget.state.lock();
            st.used = st.used.saturating_sub(n);
            st.wake();
        }
    }

    /// Gives a turn that a woken waiter did not use to the next one, if there is room.
    pub(super) fn pass_turn(&self) {
        self.state.lock().wake();
    }

    /// Counts `n` more units, without a check (connections a pool already had when the
    /// budget was attached on reload).
    pub(super) fn add_used(&self, n: u32) {
        self.state.lock().used += n;
    }

    /// Puts a checkout in the queue: at the back, or at the front for one woken that
    /// found the budget spent again (it keeps its turn).
    pub(super) fn enqueue(&self, front: bool) -> (u64, oneshot::Receiver<()>) {
        let mut st = self.state.lock();
        let id = st.next_waiter;
        st.next_waiter += 1;
        let (tx, rx) = oneshot::channel();
        if front {
            st.waiters.push_front((id, tx));
        } else {
            st.waiters.push_back((id, tx));
        }
        (id, rx)
    }

    /// Takes a checkout out of the queue. If it was woken and does not use its turn,
    /// the next waiter gets it.
    pub(super) fn leave(&self, id: u64, rx: &mut oneshot::Receiver<()>) {
        let mut st = self.state.lock();
        if let Some(at) = st.waiters.iter().position(|(w, _)| *w == id) {
            st.waiters.remove(at);
        } else if rx.try_recv().is_ok() {
            st.wake();
        }
    }

    /// Adds a pool to the ones it covers.
    pub(super) fn join(&self, pool: Weak<Pool>) {
        let mut st = self.state.lock();
        st.members.retain(|p| p.strong_count() > 0);
        st.members.push(pool);
    }

    /// Removes a pool from the ones it covers.
    pub(super) fn part(&self, pool: &Weak<Pool>) {
        self.state
            .lock()
            .members
            .retain(|p| p.strong_count() > 0 && !p.ptr_eq(pool));
    }

    /// The pools it covers, but `except` (cloned out, so that no pool lock is taken
    /// under this one).
    pub(super) fn others(&self, except: &Pool) -> Vec<Arc<Pool>> {
        let members = self.state.lock().members.clone();
        members
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|p| !std::ptr::eq(Arc::as_ptr(p), except))
            .collect()
    }
}
