//! thumbup-test-support: what the test packages of thumbup share (the
//! end-to-end tests of `tests/`, the operator's and the DB proxy's tests).
//!
//! - [`stack`]: the local MariaDB and Redis servers of `scripts/stack.sh`
//!   (their admin URLs, ports and TLS files as `stack.sh env` exports them),
//!   admin connections to them, and the script itself.
//! - [`dirs`]: per-process scratch directories.
//! - [`wait`]: polling a condition until it holds or the time is up.
//! - [`api`]: Kubernetes API servers in memory, scripted or storing, which
//!   hold the operator's requests to its declared RBAC.
//! - [`operator`]: the operator's fixtures (config, LikeTenants) and probes
//!   and clean-up of what provisioning leaves on the real servers.
//!
//! The tests of one package alone keep their own harness (the e2e `World`
//! in `tests/src`, the DB proxy's child process in `db-proxy/tests/common`).

pub mod api;
pub mod dirs;
pub mod operator;
pub mod stack;
pub mod wait;
