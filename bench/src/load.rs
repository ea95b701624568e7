//! Load drivers. A closed loop keeps `concurrency` tasks each sending its next
//! request when the previous one returns (the maximum throughput); an open
//! loop sends at a fixed rate whatever the replies do and measures latency
//! from the scheduled send time, so a stall shows up as latency instead of
//! silently lowering the offered load (coordinated omission).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::task::JoinSet;

use crate::stats::Samples;
use crate::zipf::Zipf;

/// The outcome of one measurement.
#[derive(Debug, Default)]
pub struct Measurement {
    /// Requests that succeeded inside the measured interval.
    pub requests: u64,
    /// Items those requests covered (the batch sizes summed).
    pub items: u64,
    /// Requests that succeeded, warmup included.
    pub total_ok: u64,
    /// Failed requests (warmup included).
    pub errors: u64,
    /// The first error, for the log.
    pub first_error: Option<String>,
    /// The measured interval.
    pub elapsed: Duration,
    /// Latencies of the measured requests.
    pub samples: Samples,
}

impl Measurement {
    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Items per second.
    pub fn item_rate(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn absorb(&mut self, other: Measurement) {
        self.requests += other.requests;
        self.items += other.items;
        self.total_ok += other.total_ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.samples.merge(other.samples);
    }
}

/// The shape of a load: how many tasks, for how long, which items.
#[derive(Debug, Clone)]
pub struct Load {
    /// Concurrent tasks (closed loop).
    pub concurrency: usize,
    /// Time before measuring starts.
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Items per request.
    pub batch: usize,
    /// Item popularity.
    pub zipf: Arc<Zipf>,
    /// Message id of item 1 minus one.
    pub item_base: i64,
}

impl Load {
    fn draw(&self, rng: &mut StdRng) -> Vec<i64> {
        (0..self.batch).map(|_| self.item_base + self.zipf.sample(rng) as i64).collect()
    }
}

/// Runs `op(task, seq, items)` in a closed loop on `load.concurrency` tasks;
/// `op` returns the number of items it served.
pub async fn closed_loop<F, Fut>(load: &Load, op: F) -> Measurement
where
    F: Fn(usize, u64, Vec<i64>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<usize, String>> + Send + 'static,
{
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    let mut set = JoinSet::new();
    for task in 0..load.concurrency {
        let op = op.clone();
        let load = load.clone();
        set.spawn(async move {
            let mut rng = StdRng::seed_from_u64(task as u64 + 1);
            let mut m = Measurement::default();
            let mut seq = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let items = load.draw(&mut rng);
                let result = op(task, seq, items).await;
                seq += 1;
                match result {
                    Ok(n) => {
                        m.total_ok += 1;
                        if sent >= measure_from {
                            m.samples.record(sent.elapsed());
                            m.requests += 1;
                            m.items += n as u64;
                        }
                    }
                    Err(e) => {
                        m.errors += 1;
                        m.first_error.get_or_insert(e);
                    }
                }
            }
            m
        });
    }
    let mut total = Measurement::default();
    while let Some(done) = set.join_next().await {
        total.absorb(done.expect("load task panicked"));
    }
    total.elapsed = end.saturating_duration_since(measure_from);
    total
}

/// Sends requests at `rate` per second for `warmup + duration`; `classify`
/// picks the class of each request (0 or 1, e.g. read or write) and `op`
/// runs it. Latency is measured from the scheduled time; one measurement per
/// class comes back.
pub async fn open_loop<C, F, Fut>(load: &Load, rate: f64, mut classify: C, op: F) -> [Measurement; 2]
where
    C: FnMut(&mut StdRng) -> usize,
    F: Fn(usize, u64, Vec<i64>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<usize, String>> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut set: JoinSet<(usize, Instant, Result<usize, String>, Duration)> = JoinSet::new();
    let mut out = [Measurement::default(), Measurement::default()];
    let collect = |out: &mut [Measurement; 2], (class, sched, result, latency): (usize, Instant, _, Duration)| {
        let m = &mut out[class];
        match result {
            Ok(n) => {
                m.total_ok += 1;
                if sched >= measure_from {
                    m.samples.record(latency);
                    m.requests += 1;
                    m.items += n as u64;
                }
            }
            Err(e) => {
                m.errors += 1;
                m.first_error.get_or_insert(e);
            }
        }
    };
    let mut seq = 0u64;
    loop {
        let sched = start + interval.mul_f64(seq as f64);
        if sched >= end {
            break;
        }
        tokio::time::sleep_until(sched.into()).await;
        let class = classify(&mut rng).min(1);
        let items = load.draw(&mut rng);
        let op = op.clone();
        set.spawn(async move {
            let result = op(class, seq, items).await;
            (class, sched, result, sched.elapsed())
        });
        seq += 1;
        while let Some(done) = set.try_join_next() {
            collect(&mut out, done.expect("request task panicked"));
        }
    }
    while let Some(done) = set.join_next().await {
        collect(&mut out, done.expect("request task panicked"));
    }
    for m in &mut out {
        m.elapsed = end.saturating_duration_since(measure_from);
    }
    out
}
