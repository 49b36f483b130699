//! Client read buffers shared by the sessions of a thread.
//!
//! A session reads its client into a buffer only while there is something to read: once
//! the messages read are framed (each frame keeps its part of the buffer until it is
//! written), the emptied buffer goes back to its thread's short free list, and the next
//! read, by this session or another, takes one from there. A transaction allocates no read
//! buffer, and an idle client holds none (memory per idle client), where keeping one per
//! session would leave every idle client with its kilobyte, and dropping it each time
//! cost an allocation per transaction.

use std::cell::RefCell;

use bytes::BytesMut;

/// Buffers kept per thread: more than the sessions of a thread read at once in practice.
const KEPT: usize = 64;
/// Larger buffers (a client that sent much) are freed, not kept.
const MAX_KEPT: usize = 8 * 1024;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer for the next read: a kept one, or a new empty one.
pub(super) fn take() -> BytesMut {
    FREE.with(|free| free.borrow_mut().pop())
        .unwrap_or_default()
}

/// Gives back an emptied buffer (one that still holds bytes, or none, is dropped).
pub(super) fn give(buf: BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 || buf.capacity() > MAX_KEPT {
        return;
    }
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < KEPT {
            free.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emptied_buffers_come_back_and_others_do_not() {
        let mut buf = take();
        buf.reserve(1024);
        buf.extend_from_slice(b"Q\0\0\0\x05x");
        let frame = buf.split_to(6);
        let room = buf.capacity();
        give(buf);
        let again = take();
        assert_eq!(again.capacity(), room, "the same buffer back");
        drop(frame);
        let mut full = BytesMut::with_capacity(16);
        full.extend_from_slice(b"x");
        give(full);
        give(BytesMut::with_capacity(MAX_KEPT + 1));
        assert_eq!(take().capacity(), 0, "neither kept");
        give(again);
    }
}
