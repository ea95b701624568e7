//! Redis key layout of a tenant. Every key starts with `thumbup:<tenant>:`,
//! which the tenant's ACL user is limited to.
//!
//! A user's cache and the stream shard their events go to carry the hash
//! tag `{<tenant>.<shard>}` after the prefix, so the transition script
//! touches one hash slot (Redis Cluster), while the tenant as a whole spreads
//! over `shards` slots.

/// Key builder for one tenant.
#[derive(Debug, Clone)]
pub struct Keys {
    tenant: String,
    shards: u32,
}

impl Keys {
    /// Keys of `tenant`, whose stream has `shards` shards.
    pub fn new(tenant: &str, shards: u32) -> Keys {
        Keys { tenant: tenant.to_string(), shards: shards.max(1) }
    }

    /// The prefix every key of the tenant starts with.
    pub fn prefix(&self) -> String {
        crate::names::key_prefix(&self.tenant)
    }

    /// The failover controller's word that the active datacenter's Redis
    /// stands alone (see [`crate::cache::Solo`]).
    pub fn solo(&self) -> String {
        format!("{}solo", self.prefix())
    }

    /// The tenant the keys belong to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The number of stream shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard of a user.
    pub fn shard_of(&self, mid: i64) -> u32 {
        mid.rem_euclid(self.shards as i64) as u32
    }

    fn tagged(&self, shard: u32) -> String {
        format!("{}{{{}.{shard}}}", self.prefix(), self.tenant)
    }

    /// The user's cache of a business: one sorted set holding the user's
    /// states and liked list (member a message id, score the like time in
    /// Unix ms, or minus the dislike time; a record in NONE has no member)
    /// and, at score 0, the user's version floor (see `functions.lua`).
    pub fn user(&self, mid: i64, business: i64) -> String {
        format!("{}:u:{business}:{mid}", self.tagged(self.shard_of(mid)))
    }

    /// The newest-user bound of stream shard `shard` and a business: no
    /// user of that shard and business above it has a record (see
    /// `functions.lua`). In the shard's hash slot, beside its users' caches.
    pub fn newest(&self, shard: u32, business: i64) -> String {
        format!("{}:n:{business}", self.tagged(shard))
    }

    /// Event stream shard `shard`.
    pub fn stream(&self, shard: u32) -> String {
        format!("{}:ev", self.tagged(shard))
    }

    /// The stream shard that `mid`'s events go to.
    pub fn stream_of(&self, mid: i64) -> String {
        self.stream(self.shard_of(mid))
    }

    /// Cached counts of an item: `"<likes>:<dislikes>:<version>"`.
    pub fn counts(&self, business: i64, message: i64) -> String {
        format!("{}cnt:{business}:{message}", self.prefix())
    }

    /// Cached received likes of an owner: `"<likes>:0:<version>"`.
    pub fn received(&self, business: i64, up_mid: i64) -> String {
        format!("{}rcv:{business}:{up_mid}", self.prefix())
    }

    /// Downstream events for other systems: one per applied transition.
    pub fn downstream(&self) -> String {
        format!("{}downstream", self.prefix())
    }
}

/// The consumer group of the job on every stream shard.
pub const JOB_GROUP: &str = "thumbup-job";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_under_the_tenant_prefix_and_user_keys_share_a_tag() {
        let k = Keys::new("alpha", 4);
        let user = [k.user(7, 1), k.stream_of(7), k.newest(k.shard_of(7), 1)];
        for key in user.iter().chain([k.counts(1, 9), k.received(1, 3), k.downstream()].iter()) {
            assert!(key.starts_with("thumbup:alpha:"), "{key}");
            assert!(!k.prefix().contains('{'));
        }
        for key in &user {
            assert!(key.contains("{alpha.3}"), "{key}");
        }
        assert_ne!(k.stream_of(8), k.stream_of(7));
    }
}
