//! Replaying the recent stream window onto a promoted DB: the data-plane
//! part (reading every shard's range, the job's idempotent apply, dropping
//! the stale cached counts) lives in [`thumbup_core::stream::replay`]; the
//! controller decides which tenants, when, and reports the outcome.

pub use thumbup_core::stream::replay::{ReplayError, ReplayTenant, Replayed, invalidate, replay};
