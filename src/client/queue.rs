//! Bytes waiting to be written to one peer, written with vectored, non-blocking writes.

use std::io::{self, IoSlice};

use bytes::{Buf, BytesMut};

use super::deque::InlineDeque;
use crate::server::TryWrite;

/// How many buffers one `writev` takes.
const MAX_SLICES: usize = 32;

/// An ordered queue of message bytes for one socket. Buffers split from the same read
/// buffer and adjacent in memory are merged back for free, so a batch of forwarded
/// messages is usually one buffer, held without a heap block of its own.
#[derive(Default, Debug)]
pub struct OutQueue {
    chunks: InlineDeque<BytesMut>,
    len: usize,
}

impl OutQueue {
    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues bytes after everything already queued.
    pub fn push(&mut self, bytes: BytesMut) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        if let Some(last) = self.chunks.back_mut() {
            // Same allocation, right after the last buffer: `unsplit` is O(1) there.
            if last.as_ptr().wrapping_add(last.len()) == bytes.as_ptr() {
                last.unsplit(bytes);
                return;
            }
        }
        self.chunks.push_back(bytes);
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }

    /// Writes as much as the socket takes without waiting. Returns Ok when the queue is
    /// empty or the socket would block.
    pub fn write_now(&mut self, socket: &mut impl TryWrite) -> io::Result<()> {
        while !self.is_empty() {
            let written = if self.chunks.len() == 1
                && let Some(only) = self.chunks.front()
            {
                // The usual case (adjacent messages merge): send(2) is cheaper than writev(2).
                socket.try_write(only)
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let n = self.chunks.len().min(MAX_SLICES);
                for (slice, chunk) in slices.iter_mut().zip(self.chunks.iter()) {
                    *slice = IoSlice::new(chunk);
                }
                socket.try_write_vectored(slices.get(..n).unwrap_or_default())
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.advance(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // A burst grew the queue; an idle client keeps no large buffer.
        self.chunks.shrink_above(MAX_SLICES);
        Ok(())
    }

    /// Writes everything (TLS: ciphertext included), waiting as needed.
    pub async fn write_all(&mut self, socket: &mut super::ClientStream) -> io::Result<()> {
        loop {
            self.write_now(socket)?;
            if self.is_empty() && !socket.wants_write() {
                return Ok(());
            }
            std::future::poll_fn(|cx| socket.poll_write_ready(cx)).await?;
        }
    }

    fn advance(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return; // the socket cannot have taken more than was queued
            };
            if n >= front.len() {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}
