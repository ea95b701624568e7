//! The failover controller (leader only): probes the active DB, flips the
//! route to the standby when the probes fail, fences and promotes, replays
//! the recent stream window, and runs planned switchovers.

pub mod db;
pub mod decide;
pub mod kube;
pub mod replay;
