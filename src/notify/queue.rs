//! A listening client's queue of notifications: bounded, filled by its database's hub,
//! emptied by the client's session.
//!
//! tokio's bounded `mpsc` would do, but it allocates its channel (cache-padded, about
//! 0.5 KB) and a first block of 32 slots (1 KB) for every subscriber, even one that never
//! gets a notification; a listening client that is idle should cost little more than an
//! idle client. This queue is one small shared block; its `VecDeque` allocates only when
//! something is queued.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// The queue holds its capacity: the client is not reading.
    Full,
    /// The client is gone, or was cut off.
    Closed,
}

/// Both ends share this.
struct Shared {
    state: Mutex<State>,
    /// The session, woken when a message is queued or the queue closes.
    reader: AtomicWaker,
    /// A delivery waiting for room, woken when the session takes a message from a full
    /// queue or the queue closes.
    room: tokio::sync::Notify,
}

struct State {
    items: VecDeque<Bytes>,
    capacity: usize,
    closed: bool,
}

/// The hub's end ([`queue`]).
#[derive(Clone)]
pub(super) struct Sender(Arc<Shared>);

/// The session's end ([`queue`]). Dropping it closes the queue.
pub(super) struct Receiver(Arc<Shared>);

/// A queue of at most `capacity` messages.
pub(super) fn queue(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            capacity,
            closed: false,
        }),
        reader: AtomicWaker::new(),
        room: tokio::sync::Notify::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl Shared {
    fn close(&self) {
        self.state.lock().closed = true;
        self.reader.wake();
        self.room.notify_waiters();
    }
}

impl Sender {
    /// Queues `message` if there is room.
    pub(super) fn try_send(&self, message: Bytes) -> Result<(), Refused> {
        {
            let mut st = self.0.state.lock();
            if st.closed {
                return Err(Refused::Closed);
            }
            if st.items.len() >= st.capacity {
                return Err(Refused::Full);
            }
            st.items.push_back(message);
        }
        self.0.reader.wake();
        Ok(())
    }

    /// Queues `message`, waiting for room as long as it takes (the caller bounds the wait).
    pub(super) async fn send(&self, message: Bytes) -> Result<(), Refused> {
        loop {
            // Registered before the look, so that room made in between is not missed.
            let room = self.0.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send(message.clone()) {
                Err(Refused::Full) => room.await,
                done => return done,
            }
        }
    }

    /// Closes the queue: the session gets what is queued, then `None` (cut off).
    pub(super) fn close(&self) {
        self.0.close();
    }

    /// How many messages wait.
    pub(super) fn len(&self) -> usize {
        self.0.state.lock().items.len()
    }

    /// How many messages fit.
    pub(super) fn capacity(&self) -> usize {
        self.0.state.lock().capacity
    }
}

impl Receiver {
    /// The next message, `Ready(None)` once the queue is closed and empty; registers the
    /// task to be woken otherwise.
    pub(super) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if let Some(taken) = self.take() {
            return taken;
        }
        self.0.reader.register(cx.waker());
        self.take().unwrap_or(Poll::Pending)
    }

    /// The next message already queued.
    pub(super) fn try_recv(&mut self) -> Option<Bytes> {
        match self.take() {
            Some(Poll::Ready(message)) => message,
            _ => None,
        }
    }

    /// Whether nothing waits.
    pub(super) fn is_empty(&self) -> bool {
        self.0.state.lock().items.is_empty()
    }

    /// `Some(Ready(Some))`: a message; `Some(Ready(None))`: closed and empty; `None`:
    /// nothing yet.
    fn take(&mut self) -> Option<Poll<Option<Bytes>>> {
        let mut st = self.0.state.lock();
        let was_full = st.items.len() >= st.capacity;
        match st.items.pop_front() {
            Some(message) => {
                if st.items.is_empty() {
                    // A backlog's room goes back (memory per listening client).
                    st.items = VecDeque::new();
                }
                drop(st);
                if was_full {
                    self.0.room.notify_waiters();
                }
                Some(Poll::Ready(Some(message)))
            }
            None if st.closed => Some(Poll::Ready(None)),
            None => None,
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn msg(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    #[tokio::test]
    async fn in_order_bounded_and_closed_after_the_rest() {
        let (tx, mut rx) = queue(2);
        tx.try_send(msg(1)).unwrap();
        tx.try_send(msg(2)).unwrap();
        assert_eq!(tx.try_send(msg(3)), Err(Refused::Full));
        assert_eq!((tx.len(), tx.capacity()), (2, 2));
        // A full queue: the delivery waits until the session takes one.
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(msg(3)).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(rx.try_recv(), Some(msg(1)));
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("room made")
            .unwrap()
            .unwrap();
        tx.close();
        assert_eq!(tx.try_send(msg(4)), Err(Refused::Closed));
        let next = std::future::poll_fn(|cx| rx.poll_recv(cx));
        assert_eq!(next.await, Some(msg(2)));
        assert_eq!(
            std::future::poll_fn(|cx| rx.poll_recv(cx)).await,
            Some(msg(3))
        );
        assert_eq!(std::future::poll_fn(|cx| rx.poll_recv(cx)).await, None);
        assert!(rx.is_empty());
    }

    #[tokio::test]
    async fn the_session_is_woken_by_a_message_and_a_sender_by_its_going() {
        let (tx, mut rx) = queue(1);
        let reader = tokio::spawn(async move {
            let first = std::future::poll_fn(|cx| rx.poll_recv(cx)).await;
            (first, rx)
        });
        tokio::task::yield_now().await;
        tx.try_send(msg(7)).unwrap();
        let (first, rx) = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(first, Some(msg(7)));
        tx.try_send(msg(8)).unwrap();
        let stuck = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(msg(9)).await }
        });
        tokio::task::yield_now().await;
        drop(rx);
        let sent = tokio::time::timeout(Duration::from_secs(5), stuck)
            .await
            .expect("a sender waiting for room ends when the session goes")
            .unwrap();
        assert_eq!(sent, Err(Refused::Closed));
    }
}
