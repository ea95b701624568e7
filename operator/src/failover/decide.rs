//! When to fail over: a pure function of the probe history, the standby's
//! health, the recent flips and the settings. No IO, so every rule has a
//! unit test.

use std::time::Duration;

use jiff::Timestamp;

use crate::config::Failover;

/// The thresholds, from the operator config.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Consecutive failed probes before a failover.
    pub failure_threshold: u32,
    /// The failed probes must span at least this long.
    pub grace: Duration,
    /// Unplanned failovers allowed per `cap_window`.
    pub cap: u32,
    /// The window of the cap.
    pub cap_window: Duration,
}

impl From<&Failover> for Settings {
    fn from(f: &Failover) -> Self {
        Settings {
            failure_threshold: f.failure_threshold,
            grace: Duration::from_millis(f.grace_period_ms),
            cap: f.cap,
            cap_window: Duration::from_millis(f.cap_window_ms),
        }
    }
}

/// The active DB's current run of failed probes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Failing {
    /// Consecutive failed probes.
    pub failures: u32,
    /// When the first of them failed.
    pub since: Option<Timestamp>,
}

impl Failing {
    /// Counts one failed probe at `now`.
    pub fn fail(&mut self, now: Timestamp) {
        self.failures += 1;
        self.since.get_or_insert(now);
    }
}

/// What the controller does about the active DB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Healthy, or not failing for long enough (yet).
    Wait,
    /// Fail over to the standby now.
    FailOver,
    /// A failover is due but must not happen.
    Blocked(Block),
}

/// Why a due failover does not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// The cap of unplanned failovers per window is used up.
    CapReached {
        /// Failovers inside the window.
        used: usize,
        /// When the oldest of them leaves the window.
        until: Timestamp,
    },
    /// No standby can take over.
    StandbyUnhealthy(String),
}

impl Block {
    /// The CamelCase reason (status, Events, metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Block::CapReached { .. } => "FailoverCapReached",
            Block::StandbyUnhealthy(_) => "StandbyUnhealthy",
        }
    }

    /// Details for a human.
    pub fn message(&self, s: &Settings) -> String {
        match self {
            Block::CapReached { used, until } => format!(
                "the active DB is failing, but {used} failover(s) already happened in the last {}s (cap {}); \
                 no automatic failover before {until}",
                s.cap_window.as_secs(),
                s.cap
            ),
            Block::StandbyUnhealthy(why) => {
                format!("the active DB is failing, but the standby cannot take over: {why}")
            }
        }
    }
}

/// The decision. `standby` is `Ok(())` when the standby can take over, or
/// why not; `flips` are the times of earlier unplanned failovers.
pub fn decide(
    s: &Settings,
    failing: &Failing,
    now: Timestamp,
    standby: &Result<(), String>,
    flips: &[Timestamp],
) -> Verdict {
    let Some(since) = failing.since else { return Verdict::Wait };
    let spanned = now.duration_since(since).try_into().unwrap_or(Duration::ZERO);
    if failing.failures < s.failure_threshold || spanned < s.grace {
        return Verdict::Wait;
    }
    let in_window: Vec<Timestamp> = flips
        .iter()
        .copied()
        .filter(|t| now.duration_since(*t).try_into().unwrap_or(Duration::ZERO) < s.cap_window)
        .collect();
    if in_window.len() >= s.cap as usize {
        let oldest = in_window.iter().min().copied().unwrap_or(now);
        let until = oldest.checked_add(s.cap_window).unwrap_or(Timestamp::MAX);
        return Verdict::Blocked(Block::CapReached { used: in_window.len(), until });
    }
    match standby {
        Ok(()) => Verdict::FailOver,
        Err(why) => Verdict::Blocked(Block::StandbyUnhealthy(why.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings { failure_threshold: 3, grace: Duration::from_secs(4), cap: 1, cap_window: Duration::from_secs(3600) }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    /// Failures at 0, 2, 4, ... seconds: the probe history after `n` probes.
    fn failing(n: u32) -> (Failing, Timestamp) {
        let mut f = Failing::default();
        for i in 0..n {
            f.fail(at(2 * i as i64));
        }
        (f, at(2 * (n as i64 - 1)))
    }

    #[test]
    fn threshold_failures_spanning_the_grace_period_fail_over() {
        let (f, now) = failing(3);
        assert_eq!(decide(&settings(), &f, now, &Ok(()), &[]), Verdict::FailOver);
    }

    #[test]
    fn one_failure_fewer_than_the_threshold_waits() {
        let (f, now) = failing(2);
        // Even long after the first failure: two consecutive failures are not three.
        assert_eq!(decide(&settings(), &f, now, &Ok(()), &[]), Verdict::Wait);
        assert_eq!(decide(&settings(), &f, at(60), &Ok(()), &[]), Verdict::Wait);
    }

    #[test]
    fn threshold_failures_inside_the_grace_period_wait() {
        let mut f = Failing::default();
        for ms in [0, 500, 1000, 1500] {
            f.fail(at(0).checked_add(Duration::from_millis(ms)).unwrap());
        }
        let now = at(0).checked_add(Duration::from_millis(1500)).unwrap();
        assert_eq!(decide(&settings(), &f, now, &Ok(()), &[]), Verdict::Wait);
    }

    #[test]
    fn a_healthy_history_waits() {
        assert_eq!(decide(&settings(), &Failing::default(), at(100), &Ok(()), &[]), Verdict::Wait);
    }

    #[test]
    fn a_second_failover_inside_the_cap_window_is_blocked_with_the_time_it_clears() {
        let (f, now) = failing(3);
        let earlier = at(-600);
        let v = decide(&settings(), &f, now, &Ok(()), &[earlier]);
        let Verdict::Blocked(b) = v else { panic!("{v:?}") };
        assert_eq!(b, Block::CapReached { used: 1, until: at(3000) });
        assert_eq!(b.reason(), "FailoverCapReached");
        assert!(b.message(&settings()).contains("cap 1"), "{}", b.message(&settings()));
        // A flip older than the window no longer counts.
        assert_eq!(decide(&settings(), &f, now, &Ok(()), &[at(-3700)]), Verdict::FailOver);
        // A larger cap allows the second one.
        let two = Settings { cap: 2, ..settings() };
        assert_eq!(decide(&two, &f, now, &Ok(()), &[earlier]), Verdict::FailOver);
    }

    #[test]
    fn an_unhealthy_standby_blocks_the_failover_and_says_why() {
        let (f, now) = failing(3);
        let v = decide(&settings(), &f, now, &Err("connection refused".into()), &[]);
        let Verdict::Blocked(b) = v else { panic!("{v:?}") };
        assert_eq!(b.reason(), "StandbyUnhealthy");
        assert!(b.message(&settings()).contains("connection refused"));
    }
}
