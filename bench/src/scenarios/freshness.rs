//! Scenario g: freshness. How long after a like is acknowledged GetCounts
//! and ListItemLikers show it to a reader.

use std::time::{Duration, Instant};

use thumbup_service::pb;
use tokio::task::JoinSet;

use super::Context;
use crate::Args;
use crate::report::{Metric, Section, Target};
use crate::stats::{Samples, median};

/// How often a sample reads until it sees its like.
const POLL: Duration = Duration::from_millis(25);

/// What one sample saw: ms from the acknowledgement until GetCounts and
/// ListItemLikers showed the like (`None`: not within the timeout).
type Seen = (Option<f64>, Option<f64>);

/// One sample: a new user likes a new item (nothing cached for either),
/// then reads both until the like shows.
async fn sample(svc: super::Service, mid: i64, message: i64, timeout: Duration) -> Result<Seen, String> {
    svc.act(mid, message, pb::Action::Like).await?;
    let acked = Instant::now();
    let (mut counts, mut likers) = (None, None);
    while (counts.is_none() || likers.is_none()) && acked.elapsed() < timeout {
        if counts.is_none() && svc.likes_of(message).await? >= 1 {
            counts = Some(acked.elapsed().as_secs_f64() * 1e3);
        }
        if likers.is_none() && svc.likers_of(message).await?.contains(&mid) {
            likers = Some(acked.elapsed().as_secs_f64() * 1e3);
        }
        tokio::time::sleep(POLL).await;
    }
    Ok((counts, likers))
}

/// Scenario g: `--fresh-samples` likes per run, started evenly over a job
/// window and a second, each read back every 25 ms until it shows.
pub async fn freshness(ctx: &Context, args: &Args) -> anyhow::Result<Section> {
    let stamp = jiff::Timestamp::now().as_second();
    let spread = Duration::from_millis(args.job_window_ms + 1000);
    let timeout = Duration::from_millis(args.job_window_ms * 3).max(Duration::from_secs(30));
    let n = args.fresh_samples.max(1);
    let (mut c50, mut c99, mut l50, mut l99, mut missed) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut all_c, mut all_l) = (Samples::default(), Samples::default());
    for run in 0..args.runs.max(1) {
        let mut set = JoinSet::new();
        for i in 0..n {
            let svc = ctx.service.clone();
            let id = 8_000_000_000_000 + (stamp % 100_000) * 10_000_000 + run as i64 * 100_000 + i as i64;
            let start = spread.mul_f64(i as f64 / n as f64);
            set.spawn(async move {
                tokio::time::sleep(start).await;
                sample(svc, id, id, timeout).await
            });
        }
        let (mut cs, mut lsm, mut miss) = (Samples::default(), Samples::default(), 0u64);
        while let Some(done) = set.join_next().await {
            let (c, l) = done.expect("freshness sample panicked").map_err(anyhow::Error::msg)?;
            for (seen, into, all) in [(c, &mut cs, &mut all_c), (l, &mut lsm, &mut all_l)] {
                match seen {
                    Some(ms) => {
                        into.record(Duration::from_secs_f64(ms / 1e3));
                        all.record(Duration::from_secs_f64(ms / 1e3));
                    }
                    None => miss += 1,
                }
            }
        }
        eprintln!(
            "thumbup-bench: g run {}: {n} likes; GetCounts shows them after p50 {:.0} ms / p99 {:.0} ms, \
             ListItemLikers after p50 {:.0} ms / p99 {:.0} ms; {miss} reads never showed them within {timeout:?}",
            run + 1,
            cs.quantile_ms(0.5),
            cs.quantile_ms(0.99),
            lsm.quantile_ms(0.5),
            lsm.quantile_ms(0.99),
        );
        c50.push(cs.quantile_ms(0.5));
        c99.push(cs.quantile_ms(0.99));
        l50.push(lsm.quantile_ms(0.5));
        l99.push(lsm.quantile_ms(0.99));
        missed.push(miss as f64);
    }
    let (pc, pl) = (median(&c99), median(&l99));
    let never = missed.iter().sum::<f64>() == 0.0;
    Ok(Section {
        title: "g. Freshness: from an acknowledged like to readers seeing it".into(),
        about: format!(
            "Per run, {n} likes, each by a new user on a new item, started evenly over {s} ms (a job window \
             and a second); after each Like's reply the sample calls GetCounts and ListItemLikers (tenant {t}) \
             every {p} ms until the like shows: the time from the acknowledgement to the first reply that \
             shows it. Pooled over the runs: GetCounts p99 {ac:.0} ms, ListItemLikers p99 {al:.0} ms. The \
             counts-row UPDATE bound that goes with it is b's.",
            s = spread.as_millis(),
            t = args.tenant,
            p = POLL.as_millis(),
            ac = all_c.quantile_ms(0.99),
            al = all_l.quantile_ms(0.99),
        ),
        metrics: vec![
            Metric::new("GetCounts shows it, p50 (ms)", c50),
            Metric::new("GetCounts shows it, p99 (ms)", c99),
            Metric::new("ListItemLikers shows it, p50 (ms)", l50),
            Metric::new("ListItemLikers shows it, p99 (ms)", l99),
            Metric::new(format!("reads that never showed it within {} s", timeout.as_secs()), missed),
        ],
        targets: vec![
            Target {
                name: "GetCounts freshness p99 (ms)".into(),
                measured: pc,
                target: "<= 1000 ms".into(),
                pass: pc <= 1000.0 && never,
            },
            Target {
                name: "ListItemLikers freshness p99 (ms)".into(),
                measured: pl,
                target: "<= 1000 ms".into(),
                pass: pl <= 1000.0 && never,
            },
        ],
    })
}
