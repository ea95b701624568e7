//! thumbup-core: what the service and the job share.
//!
//! - [`domain`]: the state machine (pure).
//! - [`version`]: snowflake-style record versions.
//! - [`config`]: the tenant YAML config.
//! - [`keys`]: the Redis key layout under `thumbup:<tenant>:`.
//! - [`names`]: the schema and account names derived from a tenant name, and the reserved schemas.
//! - [`stream`]: the tenant event stream: its wire formats (the event codec is [`event`]), the job's group reads, claims and acks, ranges, downstream and dead-letter entries, and the failover replay.
//! - [`cache`]: Redis connection, calls of the project's Redis functions (the atomic transition, versioned cache writes).
//! - [`functions`]: the Redis Functions library (the only Redis code tenants run), its versioned names and loading.
//! - [`db`]: migrations, reads, the job's batched apply, the DB fallback transition.
//! - [`fence`]: the write fence: whether Redis or the DB path decides a tenant's writes, and the proof that the DB path decides on the newest acknowledged state.
//! - [`provision`]: creating a tenant's DB schema and user and its Redis ACL user.
//! - [`route`]: the DB route (active datacenter + epoch) that the operator publishes and db-proxy follows.
//! - [`admin`]: the admin HTTP endpoint (metrics, health) both binaries serve.
//!
//! No gRPC server and no Kubernetes here: the dependencies point one way.

pub mod admin;
pub mod cache;
pub mod config;
pub mod conn;
pub mod db;
pub mod domain;
pub mod fence;
pub mod functions;
pub mod keys;
pub mod names;
pub mod provision;
pub mod retry;
pub mod route;
pub mod stream;
pub mod version;

/// The event codec, at its old path (the service and the DB code name it so).
pub use stream::event;
