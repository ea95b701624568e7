//! Waiting for a condition: poll it, and fail the test with what the last
//! poll saw once the time is up.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every `every` until it returns `Ok`, and returns that
/// value; fails the test with the last `Err` message once `within` has
/// passed.
pub async fn wait_until<T, F, Fut>(within: Duration, every: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(why) => assert!(Instant::now() < deadline, "{why}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// [`wait_until`] for a blocking `check`, sleeping the thread in between.
pub fn wait_until_blocking<T>(within: Duration, every: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) => assert!(Instant::now() < deadline, "{why}"),
        }
        std::thread::sleep(every);
    }
}
