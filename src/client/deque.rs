//! A first-in first-out queue that holds its front element inline: a session's queues
//! (replies expected, bytes to write) hold one element most of the time and none while the
//! client is idle, so they allocate only for a second element, and an idle session keeps
//! no heap block for them (memory per idle client, docs/performance.md).

use std::collections::VecDeque;

/// The queue. The room behind the front is kept once grown (no allocation per
/// transaction for a client that pipelines), until [`InlineDeque::shrink_above`].
#[derive(Debug)]
pub struct InlineDeque<T> {
    /// The front element; `None` only when the queue is empty.
    first: Option<T>,
    /// The elements behind the front.
    rest: VecDeque<T>,
}

impl<T> Default for InlineDeque<T> {
    fn default() -> Self {
        InlineDeque {
            first: None,
            rest: VecDeque::new(),
        }
    }
}

impl<T> InlineDeque<T> {
    /// How many elements are queued.
    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// Queues `value` after everything already queued.
    pub fn push_back(&mut self, value: T) {
        if self.first.is_none() {
            self.first = Some(value);
        } else {
            self.rest.push_back(value);
        }
    }

    /// Takes the front element off.
    pub fn pop_front(&mut self) -> Option<T> {
        let front = self.first.take();
        self.first = self.rest.pop_front();
        front
    }

    /// The front element.
    pub fn front(&self) -> Option<&T> {
        self.first.as_ref()
    }

    /// The front element, to change it in place.
    pub fn front_mut(&mut self) -> Option<&mut T> {
        self.first.as_mut()
    }

    /// The last element, to change it in place.
    pub fn back_mut(&mut self) -> Option<&mut T> {
        if self.rest.is_empty() {
            self.first.as_mut()
        } else {
            self.rest.back_mut()
        }
    }

    /// Every element, front first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.first.iter().chain(self.rest.iter())
    }

    /// Keeps the elements for which `keep` holds, in order; `keep` sees each once, front
    /// first.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        if let Some(first) = self.first.take()
            && keep(&first)
        {
            self.first = Some(first);
        }
        self.rest.retain(|e| keep(e));
        if self.first.is_none() {
            self.first = self.rest.pop_front();
        }
    }

    /// Drops everything queued (the room behind the front is kept).
    pub fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
    }

    /// Gives the room behind the front back when it is empty and has grown beyond room
    /// for `max` elements (a burst is over).
    pub fn shrink_above(&mut self, max: usize) {
        if self.rest.is_empty() && self.rest.capacity() > max {
            self.rest = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(q: &InlineDeque<u32>) -> Vec<u32> {
        q.iter().copied().collect()
    }

    #[test]
    fn first_in_first_out_across_the_inline_front() {
        let mut q = InlineDeque::default();
        assert!(q.is_empty());
        assert_eq!(q.pop_front(), None);
        q.push_back(1);
        q.push_back(2);
        q.push_back(3);
        assert_eq!((q.len(), q.front().copied()), (3, Some(1)));
        if let Some(last) = q.back_mut() {
            *last = 30;
        }
        assert_eq!(items(&q), [1, 2, 30]);
        assert_eq!(q.pop_front(), Some(1));
        q.push_back(4);
        assert_eq!(items(&q), [2, 30, 4]);
        q.retain(|&x| x != 2);
        assert_eq!((items(&q), q.front().copied()), (vec![30, 4], Some(30)));
        q.retain(|&x| x == 30);
        assert_eq!(items(&q), [30]);
        if let Some(front) = q.front_mut() {
            *front = 31;
        }
        assert_eq!(q.pop_front(), Some(31));
        assert!(q.is_empty() && q.back_mut().is_none());
        q.push_back(5);
        q.clear();
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn one_element_needs_no_heap_and_a_burst_is_given_back() {
        let mut q = InlineDeque::default();
        q.push_back(1u32);
        assert_eq!(q.rest.capacity(), 0);
        for i in 0..100 {
            q.push_back(i);
        }
        while q.pop_front().is_some() {}
        q.shrink_above(32);
        assert_eq!(q.rest.capacity(), 0);
    }
}
