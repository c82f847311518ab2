//! A deadline on one long-lived timer that is moved only when the deadline comes nearer.
//!
//! A connection sets a new deadline for nearly every request (a client connection: the
//! request-head limit, then the idle one; an upstream connection: the response-head limit).
//! Moving a tokio timer each time, or making a new one, is an entry removed from and put back
//! into tokio's timer wheel: about 400–500 instructions per request (benches/instructions.py).
//! Here a later deadline leaves the timer armed where it is; when it fires before the
//! deadline, it is set again for it. A busy connection's timer is then touched about once
//! per the shortest deadline it is given, not once or twice per request.

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};

pub struct Deadline {
    /// When the time runs out.
    due: Instant,
    /// Armed for `due` or earlier, never later.
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    pub fn new(due: Instant) -> Deadline {
        Deadline {
            due,
            timer: Box::pin(tokio::time::sleep_until(due)),
        }
    }

    /// Sets when the time runs out. The timer moves only when it would fire too late, or
    /// has fired (it must fire again).
    pub fn set(&mut self, due: Instant) {
        self.due = due;
        if self.timer.deadline() > due || self.timer.is_elapsed() {
            self.timer.as_mut().reset(due);
        }
    }

    /// Whether the deadline has passed; if not, the task is woken when it does (or when the
    /// timer fires early, to set it again).
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx) == Poll::Pending {
                return false;
            }
            if self.timer.deadline() >= self.due {
                return true;
            }
            // Armed for an earlier deadline that has since moved on.
            self.timer.as_mut().reset(self.due);
        }
    }

    /// Whether the deadline has passed, as far as the timer has seen (no registration).
    pub fn is_elapsed(&self) -> bool {
        self.timer.is_elapsed() && self.timer.deadline() >= self.due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn expired(d: &mut Deadline) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        d.poll_expired(&mut cx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_keeps_the_timer_and_an_earlier_one_moves_it() {
        let start = Instant::now();
        let mut d = Deadline::new(start + Duration::from_millis(50));
        // Later: the timer stays armed for 50 ms, and its early fire is not an expiry.
        d.set(start + Duration::from_millis(200));
        assert_eq!(d.timer.deadline(), start + Duration::from_millis(50));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!expired(&mut d), "fired early, set again");
        assert_eq!(d.timer.deadline(), start + Duration::from_millis(200));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(expired(&mut d));
        assert!(d.is_elapsed());
        // Earlier than the armed timer: moved at once.
        d.set(Instant::now() + Duration::from_millis(500));
        assert!(!d.is_elapsed(), "a fired timer is set again");
        d.set(Instant::now() + Duration::from_millis(10));
        assert_eq!(
            d.timer.deadline(),
            Instant::now() + Duration::from_millis(10)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(expired(&mut d));
    }
}
