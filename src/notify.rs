//! LISTEN/NOTIFY in transaction mode, by fan-out. A client's LISTEN cannot stay on a
//! pooled server (the next client of that server would get its notifications, and it would
//! get none once it gave the server back), so pgmux keeps one dedicated listener
//! connection per database. It LISTENs to the union of the channels its clients subscribed
//! to, and each NotificationResponse it reads is handed, byte for byte (the sending
//! backend's process id, channel and payload as PostgreSQL wrote them), to every client
//! subscribed to that channel.
//!
//! - [`Notify`]: the hubs, one per database, made on a client's first subscription.
//! - [`Hub`]: a database's channels and subscribers, and the task that owns its listener
//!   connection: it LISTENs and UNLISTENs as subscriptions come and go, and when the
//!   connection is lost it opens a new one and LISTENs again (what was sent meanwhile is
//!   lost: logged and counted, as a gap).
//! - [`Subscription`]: one client's channels and its bounded queue. A client that stops
//!   reading until its queue is full is cut off from further notifications: its session
//!   ends with an error saying so, instead of growing memory.
//! - [`Handover`]: how a listening client moves in an upgrade with every notification
//!   delivered exactly once (a marker NOTIFY splits the two processes' streams).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

mod queue;

use crate::logging::Escaped;
use crate::protocol::{ProtocolError, read_cstr, read_i32, tag, write};
use crate::server::{ServerConn, Upstream};

/// Notifications queued per client before it counts as not reading.
pub const CLIENT_QUEUE: usize = 1024;

/// Notifications queued for a client an upgrade is moving in, before it arrives: it cannot
/// read until it has finished its transaction and drained its queue in the old process,
/// so it gets more room than a client that simply does not read. Still bounded: one that
/// fills it is cut off like any other.
pub const HANDOVER_QUEUE: usize = 16 * CLIENT_QUEUE;

/// How long a listening client whose queue is full gets to make room before it is cut off;
/// meanwhile its database's listener connection waits.
const STALL_GRACE: Duration = Duration::from_secs(1);

/// How long a listener connection may take to open.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// Every database's hub, and the counters `/metrics` reads.
#[derive(Default)]
pub struct Notify {
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    next_id: AtomicU64,
    pub stats: Arc<NotifyStats>,
    /// New process, upgrade: subscriptions made for listening clients still on their way,
    /// by cancel key ([`Notify::prepare_handover`], [`Notify::claim`]).
    presubscribed: Mutex<HashMap<(i32, i32), Subscription>>,
}

/// New process, upgrade: the marker to NOTIFY once the channels of the clients to come
/// are listened to ([`Notify::prepare_handover`]).
pub struct MarkerDue {
    hub: Arc<Hub>,
    /// Their channels and the marker.
    channels: BTreeSet<String>,
}

impl MarkerDue {
    /// Waits until the listener connection LISTENs to every channel (within `limit`;
    /// otherwise nothing is NOTIFYed, the old process gives up waiting and closes those
    /// clients), then has it NOTIFY the marker.
    pub async fn notify_when_listening(self, limit: Duration) {
        let channels = self.channels.iter().map(String::as_str);
        if !self.hub.until_listening(channels, limit).await {
            warn!(database = %Escaped(&self.hub.database), "upgrade: the listener connection did not LISTEN to the moving clients' channels in time");
            return;
        }
        if let Some(Handover::Incoming { send, .. }) = &mut self.hub.state.lock().handover {
            *send = true;
        }
        self.hub.wake.notify_one();
    }
}

/// Where a listening client stands in an upgrade ([`Subscription::upgrade_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveStep {
    /// It may move now; its channels go with it.
    Move,
    /// Not yet: the marker has not come through, or notifications wait in its queue.
    Wait,
    /// It cannot move (closed with 57P01): why.
    Close(&'static str),
}

/// Gauges over all hubs.
#[derive(Default, Debug, Clone, Copy)]
pub struct NotifyCounts {
    /// Clients that LISTEN to at least one channel.
    pub listening_clients: usize,
    /// Channels the listener connections LISTEN to.
    pub channels: usize,
    /// Notifications queued for clients, not yet taken by their sessions.
    pub queued: usize,
    /// The longest queue of one client.
    pub deepest: usize,
}

/// Counters over all hubs.
#[derive(Default, Debug)]
pub struct NotifyStats {
    /// NotificationResponses the listener connections read.
    pub received: AtomicU64,
    /// Notifications handed to client queues.
    pub delivered: AtomicU64,
    /// Clients cut off because their queue was full.
    pub dropped_clients: AtomicU64,
    /// Listener connections lost and opened again (each one a possible gap).
    pub reconnects: AtomicU64,
}

impl Notify {
    /// Subscribes a new client of `database` (whose listener connects as `upstream` if it
    /// is the first) to nothing yet. `key` is the client's cancel key: an upgrade finds
    /// its subscription again by it.
    pub fn subscribe(
        &self,
        pool: &crate::pool::PoolKey,
        upstream: &Upstream,
        key: (i32, i32),
    ) -> Subscription {
        let sub = self.subscribe_as(&pool.database, upstream, key, false);
        // The pool whose upstream the listener connection uses, for an upgrade's plan.
        *sub.hub.pool_user.lock() = pool.user.clone();
        sub
    }

    fn subscribe_as(
        &self,
        database: &str,
        upstream: &Upstream,
        key: (i32, i32),
        paused: bool,
    ) -> Subscription {
        let hub = self.hub(database, upstream);
        let (tx, rx) = queue::queue(if paused { HANDOVER_QUEUE } else { CLIENT_QUEUE });
        let id = self.next_id.fetch_add(1, Relaxed);
        let overflowed = Arc::new(AtomicBool::new(false));
        hub.state.lock().subscribers.insert(
            id,
            Subscriber {
                tx,
                overflowed: overflowed.clone(),
                key,
                paused,
            },
        );
        Subscription {
            hub,
            id,
            rx,
            overflowed,
            channels: ChannelSet::default(),
        }
    }

    /// The hub of `database`, made now if it is the first subscription.
    fn hub(&self, database: &str, upstream: &Upstream) -> Arc<Hub> {
        let hub = {
            let mut hubs = self.hubs.lock();
            hubs.entry(database.to_owned())
                .or_insert_with(|| {
                    Arc::new(Hub {
                        database: database.to_owned(),
                        upstream: Mutex::new(upstream.clone()),
                        pool_user: Mutex::new(String::new()),
                        state: Mutex::new(HubState::default()),
                        wake: tokio::sync::Notify::new(),
                        stats: self.stats.clone(),
                    })
                })
                .clone()
        };
        {
            // A reload may have moved the database: the next listener connection goes to
            // where its newest subscriber's pool goes.
            let mut current = hub.upstream.lock();
            if *current != *upstream {
                *current = upstream.clone();
            }
        }
        hub
    }

    /// Old process, upgrade: for each database with listening clients, a marker to LISTEN
    /// to and the plan to send the new process. Returns once every such listener
    /// connection LISTENs to its marker (within `limit`; a database whose listener does not
    /// is left out, and its listening clients are closed instead of moved).
    pub async fn plan_handover(&self, marker: &str, limit: Duration) -> Vec<HandoverPlan> {
        let hubs: Vec<Arc<Hub>> = self.hubs.lock().values().cloned().collect();
        let mut plans = Vec::new();
        for hub in hubs {
            let mut st = hub.state.lock();
            if st.channels.is_empty() {
                continue;
            }
            let mut by_id: HashMap<u64, ChannelSet> = HashMap::new();
            for (channel, ids) in &st.channels {
                for id in ids {
                    by_id.entry(*id).or_default().insert(channel);
                }
            }
            let clients = by_id
                .iter()
                .filter_map(|(id, channels)| {
                    let sub = st.subscribers.get(id)?;
                    Some((sub.key, channels.iter().cloned().collect()))
                })
                .collect();
            st.handover = Some(Handover::Outgoing {
                marker: marker.to_owned(),
                seen: false,
            });
            st.planned = by_id;
            drop(st);
            hub.wake.notify_one();
            let user = hub.pool_user.lock().clone();
            plans.push((
                hub,
                HandoverPlan {
                    database: String::new(),
                    user,
                    marker: marker.to_owned(),
                    clients,
                },
            ));
        }
        let deadline = tokio::time::Instant::now() + limit;
        let mut ready = Vec::new();
        for (hub, mut plan) in plans {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if hub.until_listening([marker], left).await {
                plan.database = hub.database.clone();
                ready.push(plan);
            } else {
                warn!(database = %Escaped(&hub.database), "upgrade: the listener connection did not LISTEN to the hand-over marker; its listening clients are closed instead of moved");
                hub.state.lock().handover = None;
                hub.wake.notify_one();
            }
        }
        ready
    }

    /// Old process: whether every database's marker came through.
    pub fn markers_seen(&self) -> bool {
        self.hubs.lock().values().all(|hub| {
            !matches!(
                hub.state.lock().handover,
                Some(Handover::Outgoing { seen: false, .. })
            )
        })
    }

    /// Old process: the hand-over is given up (the marker did not come in time): the
    /// listening clients are closed instead of moved, and get notifications until then.
    pub fn abandon_handover(&self) {
        for hub in self.hubs.lock().values() {
            let mut st = hub.state.lock();
            if matches!(st.handover, Some(Handover::Outgoing { seen: false, .. })) {
                st.handover = None;
                st.planned.clear();
                st.wake_subscribers();
            }
        }
    }

    /// New process, upgrade: subscribes each listening client of `plan` before it
    /// arrives, paused. The returned [`MarkerDue`] NOTIFYs the marker once the listener
    /// connection LISTENs to all their channels.
    pub fn prepare_handover(&self, plan: HandoverPlan, upstream: &Upstream) -> MarkerDue {
        let hub = self.hub(&plan.database, upstream);
        *hub.pool_user.lock() = plan.user.clone();
        hub.state.lock().handover = Some(Handover::Incoming {
            marker: plan.marker.clone(),
            send: false,
        });
        let mut channels: BTreeSet<String> = BTreeSet::new();
        {
            let mut presubscribed = self.presubscribed.lock();
            for (key, wanted) in plan.clients {
                let mut sub = self.subscribe_as(&plan.database, upstream, key, true);
                for channel in &wanted {
                    sub.listen(channel);
                    channels.insert(channel.clone());
                }
                presubscribed.insert(key, sub);
            }
        }
        hub.start_listener();
        channels.insert(plan.marker);
        MarkerDue { hub, channels }
    }

    /// New process: the subscription made for the client with this cancel key, if its
    /// channels are still `channels`.
    pub fn claim(&self, key: (i32, i32), channels: &[String]) -> Option<Subscription> {
        let sub = self.presubscribed.lock().remove(&key)?;
        sub.channels.iter().eq(channels.iter()).then_some(sub)
    }

    /// New process: every client has arrived; subscriptions nobody claimed go.
    pub fn end_handover(&self) {
        let unclaimed = std::mem::take(&mut *self.presubscribed.lock());
        drop(unclaimed);
    }

    /// What `/metrics` shows of all hubs now.
    pub fn counts(&self) -> NotifyCounts {
        let hubs = self.hubs.lock();
        let mut counts = NotifyCounts::default();
        for hub in hubs.values() {
            let st = hub.state.lock();
            let mut ids: Vec<u64> = st.channels.values().flatten().copied().collect();
            ids.sort_unstable();
            ids.dedup();
            counts.listening_clients += ids.len();
            counts.channels += st.channels.len();
            for sub in st.subscribers.values() {
                let queued = sub.tx.len();
                counts.queued += queued;
                counts.deepest = counts.deepest.max(queued);
            }
        }
        counts
    }

    /// Each database's listener connection while it is connected.
    pub fn listeners(&self) -> Vec<ListenerView> {
        let hubs = self.hubs.lock();
        hubs.values()
            .filter_map(|hub| {
                let st = hub.state.lock();
                (st.listener_pid != 0).then(|| {
                    let upstream = hub.upstream.lock();
                    ListenerView {
                        database: hub.database.clone(),
                        user: upstream.user.clone(),
                        upstream: upstream.to_string(),
                        pid: st.listener_pid,
                        channels: st.listening.len(),
                    }
                })
            })
            .collect()
    }
}

/// A listener connection, for `/servers` and `SHOW SERVERS`.
#[derive(Clone, Debug)]
pub struct ListenerView {
    pub database: String,
    /// The role it logged in as.
    pub user: String,
    /// `host:port`.
    pub upstream: String,
    pub pid: i32,
    /// Channels it LISTENs to.
    pub channels: usize,
}

/// One database's channels and subscribers.
pub struct Hub {
    database: String,
    /// Where the listener connection goes: the upstream of the first subscriber's pool.
    upstream: Mutex<Upstream>,
    /// The user (as clients log in) of the newest subscriber's pool.
    pool_user: Mutex<String>,
    state: Mutex<HubState>,
    /// Tells the listener task that the channel set changed.
    wake: tokio::sync::Notify,
    stats: Arc<NotifyStats>,
}

#[derive(Default)]
struct HubState {
    /// Channel -> subscribers, for channels with at least one.
    channels: HashMap<String, Vec<u64>>,
    subscribers: HashMap<u64, Subscriber>,
    /// Whether the listener task runs.
    running: bool,
    /// The listener connection's backend process id while it is connected; 0 otherwise.
    listener_pid: i32,
    /// The channels the listener connection LISTENs to, as PostgreSQL confirmed them.
    listening: BTreeSet<String>,
    /// Sessions waiting for a confirmation ([`Subscription::poll_confirmed`]).
    waiters: Vec<std::task::Waker>,
    /// During an upgrade: this hub's marker and whether it came through.
    handover: Option<Handover>,
    /// Old process: the channels each client had when the plan was sent; a client whose
    /// set changed since cannot move (its new channels were not handed over).
    planned: HashMap<u64, ChannelSet>,
}

impl HubState {
    /// Wakes every session listening here to look at its upgrade step again: an empty
    /// message in its queue, which it skips (a full queue wakes it anyway, as it drains).
    fn wake_subscribers(&self) {
        for sub in self.subscribers.values() {
            let _ = sub.tx.try_send(Bytes::new());
        }
    }
}

struct Subscriber {
    tx: queue::Sender,
    overflowed: Arc<AtomicBool>,
    /// The client's cancel key (an upgrade carries a subscription by it).
    key: (i32, i32),
    /// Made by an upgrade for a client still on its way: gets nothing until the marker
    /// (`Handover`) comes through this hub's listener connection.
    paused: bool,
}

/// A hub's part in an upgrade (`crate::upgrade`), so that a listening client moves with
/// every notification delivered exactly once. Both processes LISTEN to a marker channel;
/// the new one, once it LISTENs to every channel of the clients to come, NOTIFYs the
/// marker. PostgreSQL delivers notifications to each listener in commit order, so in both
/// connections' streams the marker splits them the same way: the old process delivers
/// what came before it and nothing after (its clients then move once their queues are
/// empty), the new one what came after it, queued for each client until it arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Handover {
    /// Old process: the marker is listened to (or about to be); delivering as usual.
    Outgoing { marker: String, seen: bool },
    /// New process: the paused subscriptions wait for the marker, which is NOTIFYed
    /// once `send` is set and every channel is confirmed.
    Incoming { marker: String, send: bool },
}

impl Handover {
    fn marker(&self) -> &str {
        match self {
            Handover::Outgoing { marker, .. } | Handover::Incoming { marker, .. } => marker,
        }
    }
}

/// What an old process sends of one database's listening clients (`crate::upgrade`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandoverPlan {
    pub database: String,
    /// The user (as clients log in) whose pool's upstream the new listener connection
    /// uses.
    pub user: String,
    pub marker: String,
    /// Each listening client: its cancel key and channels.
    pub clients: Vec<((i32, i32), Vec<String>)>,
}

/// One client's subscriptions. Dropping it unsubscribes everything.
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    rx: queue::Receiver,
    overflowed: Arc<AtomicBool>,
    channels: ChannelSet,
}

/// A client's channels, sorted: usually one or two, so a `Vec` kept without spare room
/// rather than a `BTreeSet`, whose first node alone is about 280 bytes (memory per idle
/// listening client). LISTEN and UNLISTEN change it; a delivery looks a channel up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ChannelSet(Vec<String>);

impl ChannelSet {
    fn at(&self, channel: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|c| c.as_str().cmp(channel))
    }

    /// Adds `channel`; false if it was there.
    fn insert(&mut self, channel: &str) -> bool {
        let Err(at) = self.at(channel) else {
            return false;
        };
        self.0.reserve_exact(1);
        self.0.insert(at, channel.to_owned());
        true
    }

    /// Removes `channel`; false if it was not there.
    fn remove(&mut self, channel: &str) -> bool {
        let Ok(at) = self.at(channel) else {
            return false;
        };
        self.0.remove(at);
        true
    }

    fn contains(&self, channel: &str) -> bool {
        self.at(channel).is_ok()
    }

    fn iter(&self) -> std::slice::Iter<'_, String> {
        self.0.iter()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl IntoIterator for ChannelSet {
    type Item = String;
    type IntoIter = std::vec::IntoIter<String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl Subscription {
    /// The channels the client listens to, in order.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(String::as_str)
    }

    /// Whether the client still listens to the channel of this NotificationResponse.
    pub fn wants(&self, message: &[u8]) -> bool {
        notification_channel(message).is_some_and(|c| self.channels.contains(c))
    }

    /// Whether the client listens to anything.
    pub fn is_listening(&self) -> bool {
        !self.channels.is_empty()
    }

    /// Adds `channel` (LISTEN): a channel new to the database is LISTENed to by its
    /// listener connection, opened now if it is the first.
    pub fn listen(&mut self, channel: &str) {
        if !self.channels.insert(channel) {
            return;
        }
        self.hub
            .state
            .lock()
            .channels
            .entry(channel.to_owned())
            .or_default()
            .push(self.id);
        self.hub.start_listener();
    }

    /// Where this listening client stands in an upgrade of the old process.
    pub fn upgrade_step(&self) -> MoveStep {
        if self.channels.is_empty() {
            return MoveStep::Move;
        }
        let st = self.hub.state.lock();
        match &st.handover {
            Some(Handover::Outgoing { seen: false, .. }) => MoveStep::Wait,
            Some(Handover::Outgoing { seen: true, .. }) => {
                if st.planned.get(&self.id) != Some(&self.channels) {
                    MoveStep::Close("its LISTEN channels changed during the upgrade")
                } else if !self.rx.is_empty() {
                    MoveStep::Wait
                } else {
                    MoveStep::Move
                }
            }
            _ => MoveStep::Close("its LISTEN channels could not be handed over"),
        }
    }

    /// [`Subscription::listen`], then waits until the listener connection LISTENs to
    /// `channel`, so that every notification sent after this returns is delivered, as
    /// after a LISTEN in PostgreSQL. False when that did not happen within `limit` (the
    /// database cannot be reached): the channel is not listened to then.
    pub async fn listen_confirmed(&mut self, channel: &str, limit: Duration) -> bool {
        self.listen(channel);
        let confirmed = std::future::poll_fn(|cx| self.poll_confirmed(cx));
        if tokio::time::timeout(limit, confirmed).await.is_ok() {
            return true;
        }
        self.drop_unconfirmed();
        false
    }

    /// Ready once the listener connection LISTENs to every one of this client's channels
    /// (registers the task to be woken at the next confirmation otherwise).
    pub fn poll_confirmed(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.hub
            .poll_listening(self.channels.iter().map(String::as_str), cx)
    }

    /// Removes `channel` (UNLISTEN); nothing if it was not listened to.
    pub fn unlisten(&mut self, channel: &str) {
        if self.channels.remove(channel) {
            self.hub.remove(self.id, channel);
        }
    }

    /// Removes the channels the listener connection does not LISTEN to yet (after waiting
    /// for it in vain).
    pub fn drop_unconfirmed(&mut self) {
        let listening = self.hub.state.lock().listening.clone();
        let unconfirmed: Vec<String> = self
            .channels
            .iter()
            .filter(|c| !listening.contains(*c))
            .cloned()
            .collect();
        for channel in unconfirmed {
            self.unlisten(&channel);
        }
    }

    /// Removes every channel (UNLISTEN *).
    pub fn unlisten_all(&mut self) {
        for channel in std::mem::take(&mut self.channels) {
            self.hub.remove(self.id, &channel);
        }
    }

    /// The next notification for this client (a whole NotificationResponse), if one
    /// waits. `Ready(None)` when the client was cut off for not reading
    /// ([`Subscription::overflowed`]).
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.rx.poll_recv(cx)
    }

    /// The next notification already queued, without waiting.
    pub fn try_next(&mut self) -> Option<Bytes> {
        self.rx.try_recv()
    }

    /// Whether this client's queue filled up (it stopped reading) and it was cut off.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.unlisten_all();
        self.hub.state.lock().subscribers.remove(&self.id);
    }
}

impl Hub {
    /// Starts the listener task if it is not running, and wakes it to LISTEN to what is
    /// wanted now.
    fn start_listener(self: &Arc<Self>) {
        let start = !std::mem::replace(&mut self.state.lock().running, true);
        if start {
            tokio::spawn(run_listener(self.clone()));
        }
        self.wake.notify_one();
    }

    fn remove(&self, id: u64, channel: &str) {
        let mut st = self.state.lock();
        if let Some(ids) = st.channels.get_mut(channel) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                st.channels.remove(channel);
            }
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Hands a NotificationResponse to every subscriber of its channel. A subscriber whose
    /// queue is full gets [`STALL_GRACE`] to make room, while this connection reads no
    /// further (the notifications wait in PostgreSQL's own queue meanwhile: a burst larger
    /// than a queue is no reason to cut a client off); one that still has none is cut off.
    async fn deliver(&self, message: Bytes) {
        self.stats.received.fetch_add(1, Relaxed);
        let Some(channel) = notification_channel(&message) else {
            return;
        };
        let mut full = Vec::new();
        {
            let st = self.state.lock();
            match &st.handover {
                Some(h) if h.marker() == channel => {
                    drop(st);
                    self.marker_seen();
                    return;
                }
                // After the marker the new process delivers, and only it.
                Some(Handover::Outgoing { seen: true, .. }) => return,
                _ => {}
            }
            let Some(ids) = st.channels.get(channel) else {
                return; // UNLISTENed while it was on its way
            };
            for id in ids {
                let Some(sub) = st.subscribers.get(id).filter(|s| !s.paused) else {
                    continue;
                };
                match sub.tx.try_send(message.clone()) {
                    Ok(()) => {
                        self.stats.delivered.fetch_add(1, Relaxed);
                    }
                    Err(queue::Refused::Full) => full.push((*id, sub.tx.clone())),
                    Err(queue::Refused::Closed) => {}
                }
            }
        }
        for (id, tx) in full {
            match tokio::time::timeout(STALL_GRACE, tx.send(message.clone())).await {
                Ok(Ok(())) => {
                    self.stats.delivered.fetch_add(1, Relaxed);
                }
                Ok(Err(_)) => {} // the client left meanwhile
                Err(_) => {
                    // The session sees its queue closed and ends with an error.
                    if let Some(sub) = self.state.lock().subscribers.remove(&id) {
                        sub.overflowed.store(true, Relaxed);
                        sub.tx.close();
                        self.stats.dropped_clients.fetch_add(1, Relaxed);
                        warn!(database = %Escaped(&self.database), queued = tx.capacity(), "a listening client did not read its notifications; it is disconnected");
                    }
                }
            }
        }
    }

    /// The channels the listener connection should LISTEN to now (with an upgrade's
    /// marker).
    fn wanted(&self) -> BTreeSet<String> {
        let st = self.state.lock();
        let mut wanted: BTreeSet<String> = st.channels.keys().cloned().collect();
        if let Some(h) = &st.handover {
            wanted.insert(h.marker().to_owned());
        }
        wanted
    }

    /// The marker came through this hub's listener connection: the old process delivers
    /// nothing more (its clients move with empty queues), the new one starts delivering.
    fn marker_seen(&self) {
        let mut st = self.state.lock();
        match &mut st.handover {
            Some(Handover::Outgoing { seen, .. }) => {
                *seen = true;
                st.wake_subscribers();
            }
            Some(Handover::Incoming { .. }) => {
                // Done: the marker is UNLISTENed at the listener's next turn.
                st.handover = None;
                for sub in st.subscribers.values_mut() {
                    sub.paused = false;
                }
            }
            None => {}
        }
        drop(st);
        self.wake.notify_one();
        info!(database = %Escaped(&self.database), "upgrade: the LISTEN/NOTIFY hand-over marker came through");
    }

    /// Ready once the listener connection LISTENs to all of `channels` (the task is woken
    /// at each confirmation until then).
    fn poll_listening<'a>(
        &self,
        mut channels: impl Iterator<Item = &'a str>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let mut st = self.state.lock();
        if channels.all(|c| st.listening.contains(c)) {
            return Poll::Ready(());
        }
        if !st.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            st.waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Waits until the listener connection LISTENs to all of `channels`; false when that
    /// did not happen within `limit`.
    async fn until_listening<'a>(
        &self,
        channels: impl IntoIterator<Item = &'a str, IntoIter: Clone>,
        limit: Duration,
    ) -> bool {
        let channels = channels.into_iter();
        let ready = std::future::poll_fn(|cx| self.poll_listening(channels.clone(), cx));
        tokio::time::timeout(limit, ready).await.is_ok()
    }
}

/// The channel name of a NotificationResponse (whole message, tag included).
fn notification_channel(message: &[u8]) -> Option<&str> {
    let body = message.get(5..)?;
    let (_pid, rest) = read_i32(body)?;
    let (channel, _) = read_cstr(rest)?;
    Some(channel)
}

/// `"name"`, a channel as an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The listener task of one hub: connects, keeps its LISTENs equal to the channels
/// wanted, fans notifications out, and reconnects after a loss. Ends when no channel is
/// wanted.
async fn run_listener(hub: Arc<Hub>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if hub.wanted().is_empty() {
            let mut st = hub.state.lock();
            // Checked again under the lock: a LISTEN that came meanwhile sees `running`.
            if st.channels.is_empty() {
                st.running = false;
                st.listener_pid = 0;
                return;
            }
        }
        let upstream = hub.upstream.lock().clone();
        match crate::server::connect(&upstream, CONNECT_LIMIT).await {
            Ok(conn) => {
                backoff = Duration::from_millis(100);
                hub.state.lock().listener_pid = conn.key().process_id;
                info!(database = %Escaped(&hub.database), pid = conn.key().process_id, "LISTEN/NOTIFY listener connection opened");
                let ended = serve_listener(&hub, conn).await;
                {
                    let mut st = hub.state.lock();
                    st.listener_pid = 0;
                    st.listening.clear();
                }
                match ended {
                    Ok(()) => continue, // nothing wanted any more: checked at the top
                    Err(e) => {
                        hub.stats.reconnects.fetch_add(1, Relaxed);
                        warn!(database = %Escaped(&hub.database), error = %e, "LISTEN/NOTIFY listener connection lost; opening a new one (notifications sent meanwhile are lost)");
                    }
                }
            }
            Err(e) => {
                warn!(database = %Escaped(&hub.database), error = %e, "cannot open the LISTEN/NOTIFY listener connection; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Serves one listener connection until it fails (`Err`, why) or nothing is wanted (`Ok`).
async fn serve_listener(hub: &Hub, conn: Box<ServerConn>) -> Result<(), String> {
    listen_on(hub, conn).await.map_err(|e| match e {
        Failure::Protocol(e) => e.to_string(),
        Failure::Server(e) => e,
    })
}

enum Failure {
    Protocol(ProtocolError),
    /// The server's ErrorResponse: code and message.
    Server(String),
}

impl From<ProtocolError> for Failure {
    fn from(e: ProtocolError) -> Self {
        Failure::Protocol(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Protocol(e.into())
    }
}

async fn listen_on(hub: &Hub, mut conn: Box<ServerConn>) -> Result<(), Failure> {
    let mut listened: BTreeSet<String> = BTreeSet::new();
    let mut replies_due = 0usize;
    loop {
        let wanted = hub.wanted();
        if wanted.is_empty() && replies_due == 0 {
            conn.close();
            return Ok(());
        }
        let mut sql = String::new();
        for channel in wanted.difference(&listened) {
            sql.push_str(&format!("LISTEN {};", quote_ident(channel)));
        }
        for channel in listened.difference(&wanted) {
            sql.push_str(&format!("UNLISTEN {};", quote_ident(channel)));
        }
        if sql.is_empty() && replies_due == 0 {
            // New process, upgrade: every channel confirmed, the marker goes out now.
            let mut st = hub.state.lock();
            if let Some(Handover::Incoming { marker, send, .. }) = &mut st.handover
                && std::mem::take(send)
            {
                sql = format!("NOTIFY {}", quote_ident(marker));
            }
        }
        if !sql.is_empty() {
            debug!(database = %Escaped(&hub.database), sql = %Escaped(&sql), "listener connection");
            let mut out = BytesMut::new();
            write::query(&mut out, &sql);
            conn.stream_mut().write_all(&out).await?;
            conn.stream_mut().flush().await?;
            replies_due += 1;
            listened = wanted;
        }
        // Read what the server sends until the channel set changes.
        tokio::select! {
            _ = hub.wake.notified() => {}
            read = std::future::poll_fn(|cx| conn.poll_read(cx, 8 * 1024)) => {
                if read? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                while let Some(frame) = conn.next_frame()? {
                    if !frame.is_whole() {
                        return Err(ProtocolError::Malformed("oversized message on the listener connection").into());
                    }
                    match frame.tag {
                        tag::NOTIFICATION_RESPONSE => hub.deliver(frame.bytes.freeze()).await,
                        tag::READY_FOR_QUERY => {
                            replies_due = replies_due.saturating_sub(1);
                            if replies_due == 0 {
                                let waiters = {
                                    let mut st = hub.state.lock();
                                    st.listening = listened.clone();
                                    std::mem::take(&mut st.waiters)
                                };
                                waiters.into_iter().for_each(std::task::Waker::wake);
                            }
                        }
                        tag::ERROR_RESPONSE => {
                            let (code, message) = crate::protocol::read::error_fields(frame.body());
                            return Err(Failure::Server(format!("{code}: {message}")));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// A LISTEN or UNLISTEN that is the whole of a statement's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenCommand {
    Listen(String),
    Unlisten(String),
    UnlistenAll,
}

/// Whether `text` may be a LISTEN or UNLISTEN: its first non-blank byte is `L` or `U`.
/// A few instructions, so that the Queries of every transaction pay nothing more.
pub fn may_be_listen(text: &[u8]) -> bool {
    matches!(
        text.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'L' | b'l' | b'U' | b'u')
    )
}

/// Reads `LISTEN name`, `UNLISTEN name` or `UNLISTEN *` (any case, surrounding blanks, one
/// optional `;`), with the channel as PostgreSQL names it: an unquoted name folded to lower
/// case, a `"quoted"` one as written. `None` for anything else (several statements,
/// comments): the server runs those, and pgmux reads the result from its catalog.
pub fn parse_listen(text: &[u8]) -> Option<ListenCommand> {
    if !may_be_listen(text) {
        return None;
    }
    let text = std::str::from_utf8(text.strip_suffix(&[0]).unwrap_or(text)).ok()?;
    let text = text.trim();
    let text = text.strip_suffix(';').unwrap_or(text).trim_end();
    let (word, rest) = text.split_once(|c: char| c.is_ascii_whitespace())?;
    let rest = rest.trim_start();
    let listen = if word.eq_ignore_ascii_case("listen") {
        true
    } else if word.eq_ignore_ascii_case("unlisten") {
        false
    } else {
        return None;
    };
    if !listen && rest == "*" {
        return Some(ListenCommand::UnlistenAll);
    }
    let name = identifier(rest)?;
    Some(if listen {
        ListenCommand::Listen(name)
    } else {
        ListenCommand::Unlisten(name)
    })
}

/// One SQL identifier that is the whole of `text`.
fn identifier(text: &str) -> Option<String> {
    if let Some(inner) = text.strip_prefix('"') {
        let inner = inner.strip_suffix('"')?;
        // Inside, a quote only as "" (an escaped quote).
        if inner.is_empty() || inner.replace("\"\"", "").contains('"') {
            return None;
        }
        return Some(inner.replace("\"\"", "\""));
    }
    let mut chars = text.chars();
    let first = chars.next()?;
    let starts = first.is_alphabetic() || first == '_';
    let rest_ok = chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$');
    (starts && rest_ok).then(|| text.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_set_stays_sorted_without_spare_room() {
        let mut set = ChannelSet::default();
        assert!(set.insert("b"));
        assert_eq!(set.0.capacity(), 1);
        assert!(set.insert("a") && set.insert("c") && !set.insert("b"));
        assert_eq!(
            set.iter().map(String::as_str).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert!(set.contains("c") && !set.contains("d"));
        assert!(set.remove("b") && !set.remove("b"));
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["a", "c"]);
    }

    #[test]
    fn listen_statements_parse_as_postgresql_names_channels() {
        let cases: &[(&str, Option<ListenCommand>)] = &[
            ("LISTEN jobs", Some(ListenCommand::Listen("jobs".into()))),
            ("listen Jobs;", Some(ListenCommand::Listen("jobs".into()))),
            (
                "  LISTEN \"Mixed Case\" ; ",
                Some(ListenCommand::Listen("Mixed Case".into())),
            ),
            (
                "LISTEN \"a\"\"b\"",
                Some(ListenCommand::Listen("a\"b".into())),
            ),
            (
                "UNLISTEN jobs",
                Some(ListenCommand::Unlisten("jobs".into())),
            ),
            ("unlisten *", Some(ListenCommand::UnlistenAll)),
            ("LISTEN jobs; SELECT 1", None),
            ("LISTEN", None),
            ("LISTEN a b", None),
            ("LISTEN \"a\"b\"", None),
            ("LISTEN *", None),
            ("SELECT 1", None),
            ("LISTEN/**/x", None),
        ];
        for (text, expected) in cases {
            assert_eq!(&parse_listen(text.as_bytes()), expected, "{text}");
        }
        assert_eq!(
            parse_listen(b"LISTEN x\0"),
            Some(ListenCommand::Listen("x".into()))
        );
    }
}
