//! The failover controller's Kubernetes side (being written).
