//! Cancelling the generations of a pipeline from any thread: each generation takes a ticket
//! when it starts, and a cancel stops every ticket given out before it (and no later one), so
//! a cancel never leaks into the next request and never misses one that already began.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

#[derive(Default)]
pub(crate) struct Cancel {
    /// Tickets given out so far (the next ticket).
    issued: AtomicU64,
    /// Tickets below this are cancelled.
    cancelled_below: AtomicU64,
}

impl Cancel {
    /// The ticket of a generation that starts now.
    pub fn ticket(&self) -> u64 {
        self.issued.fetch_add(1, SeqCst)
    }

    /// Cancels every generation that has a ticket.
    pub fn cancel(&self) {
        self.cancelled_below
            .fetch_max(self.issued.load(SeqCst), SeqCst);
    }

    pub fn is_cancelled(&self, ticket: u64) -> bool {
        ticket < self.cancelled_below.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_stops_the_started_generations_only() {
        let c = Cancel::default();
        c.cancel(); // nothing running: no effect on what comes
        let (a, b) = (c.ticket(), c.ticket());
        assert!(!c.is_cancelled(a) && !c.is_cancelled(b));
        c.cancel();
        let later = c.ticket();
        assert!(c.is_cancelled(a) && c.is_cancelled(b) && !c.is_cancelled(later));
        c.cancel();
        assert!(c.is_cancelled(later));
    }

    #[test]
    fn cancels_from_many_threads_reach_every_earlier_ticket() {
        let c = Cancel::default();
        let tickets: Vec<u64> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..100).map(|_| c.ticket()).collect::<Vec<_>>()))
                .collect();
            for _ in 0..50 {
                s.spawn(|| c.cancel());
            }
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        c.cancel();
        assert_eq!(tickets.len(), 400);
        assert!(tickets.iter().all(|&t| c.is_cancelled(t)));
        assert!(!c.is_cancelled(c.ticket()));
    }
}
