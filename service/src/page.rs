//! Page tokens of the list RPCs: the cursor of the next page, signed and
//! bound to the list it came from.
//!
//! A token carries the position of the last entry of a page (its time and
//! id) and an HMAC-SHA256 tag over that position, the tenant, the list kind
//! (a user's likes or an item's likers), the business and the user or item.
//! The tag's key is derived from the tenant's DB and Redis passwords, which
//! every service process holds and no client sees, so replicas accept each
//! other's tokens and a client cannot forge one, nor move one to another
//! user, item, business, list or tenant: each of those is INVALID_ARGUMENT.
//! Rotating either password invalidates the tokens in flight (the client
//! starts again from the first page).

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use thumbup_core::config::TenantConfig;
use thumbup_core::db::ListEntry;

use crate::error::{Error, invalid};

/// Which list a token pages through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    /// ListUserLikes: the subject is the user (`mid`).
    UserLikes = 1,
    /// ListItemLikers: the subject is the item (`message_id`).
    ItemLikers = 2,
}

/// What a token is bound to besides its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// The list.
    pub list: List,
    /// The business of the request.
    pub business: i64,
    /// The user or the item of the request.
    pub subject: i64,
}

/// The format version, the first byte of every token.
const VERSION: u8 = 2;
/// Bytes of the tag kept in the token.
const TAG_LEN: usize = 16;
/// version, list, time, id, tag.
const TOKEN_LEN: usize = 1 + 1 + 8 + 8 + TAG_LEN;

/// A tenant's page-token key.
#[derive(Clone)]
pub struct PageKey {
    tenant: String,
    key: [u8; 32],
}

impl std::fmt::Debug for PageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageKey").field("tenant", &self.tenant).finish_non_exhaustive()
    }
}

impl PageKey {
    /// The key of `cfg`'s tenant, derived from its secrets.
    pub fn for_tenant(cfg: &TenantConfig) -> PageKey {
        let mut h = Sha256::new();
        for part in ["thumbup page-token key v2", &cfg.name, &cfg.db.password, &cfg.redis.password] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        PageKey { tenant: cfg.name.clone(), key: h.finalize().into() }
    }

    fn mac(&self, scope: Scope, body: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(&(self.tenant.len() as u64).to_be_bytes());
        m.update(self.tenant.as_bytes());
        m.update(&scope.business.to_be_bytes());
        m.update(&scope.subject.to_be_bytes());
        m.update(body);
        m
    }

    /// The token of the page after the one that ends with `last`.
    pub fn encode(&self, scope: Scope, last: ListEntry) -> String {
        let mut body = Vec::with_capacity(TOKEN_LEN);
        body.push(VERSION);
        body.push(scope.list as u8);
        body.extend_from_slice(&last.0.to_be_bytes());
        body.extend_from_slice(&last.1.to_be_bytes());
        let tag = self.mac(scope, &body).finalize().into_bytes();
        body.extend_from_slice(&tag[..TAG_LEN]);
        body.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The cursor in `token`, None for the empty token (the first page).
    /// Anything this tenant's service did not issue for exactly `scope` is
    /// INVALID_ARGUMENT.
    pub fn decode(&self, scope: Scope, token: &str) -> Result<Option<ListEntry>, Error> {
        if token.is_empty() {
            return Ok(None);
        }
        let bad =
            || invalid("page_token is not a token this service issued for this list; start from an empty page_token");
        if token.len() != 2 * TOKEN_LEN {
            return Err(bad());
        }
        let bytes: Vec<u8> = (0..TOKEN_LEN)
            .map(|i| token.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let (body, tag) = bytes.split_at(TOKEN_LEN - TAG_LEN);
        if body[0] != VERSION || body[1] != scope.list as u8 {
            return Err(bad());
        }
        // The tag is compared in constant time.
        self.mac(scope, body).verify_truncated_left(tag).map_err(|_| bad())?;
        let int = |at: usize| i64::from_be_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        Ok(Some((int(2), int(10))))
    }
}

/// The token of the page after `page`, empty when there is none.
pub fn next_token(key: &PageKey, scope: Scope, page: &[ListEntry], more: bool) -> String {
    page.last().filter(|_| more).map(|e| key.encode(scope, *e)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, db_password: &str) -> PageKey {
        let text = format!(
            "tenants:\n  - name: {tenant}\n    businesses: [{{ name: video, id: 1 }}]\n    tokens: [token-0001]\n    \
             redis: {{ url: 'redis://127.0.0.1:1', username: u, password: rpw }}\n    \
             db: {{ url: 'mysql://127.0.0.1:1', username: u, password: {db_password} }}\n"
        );
        let cfg = thumbup_core::config::Config::parse(&text, "test").expect("config").tenants.remove(0);
        PageKey::for_tenant(&cfg)
    }

    const USER: Scope = Scope { list: List::UserLikes, business: 1, subject: 42 };

    #[test]
    fn a_token_reads_back_only_in_the_scope_and_tenant_it_was_issued_for() {
        let k = key("alpha", "pw-1");
        let token = k.encode(USER, (1_700_000_000_123, 77));
        assert_eq!(k.decode(USER, &token).unwrap(), Some((1_700_000_000_123, 77)));
        assert_eq!(k.decode(USER, "").unwrap(), None);
        let others =
            [Scope { subject: 43, ..USER }, Scope { business: 2, ..USER }, Scope { list: List::ItemLikers, ..USER }];
        for scope in others {
            assert_eq!(k.decode(scope, &token).unwrap_err().code(), tonic::Code::InvalidArgument, "{scope:?}");
        }
        for other in [key("beta", "pw-1"), key("alpha", "pw-2")] {
            assert_eq!(other.decode(USER, &token).unwrap_err().code(), tonic::Code::InvalidArgument, "{other:?}");
        }
    }

    #[test]
    fn forged_truncated_and_altered_tokens_are_invalid_argument() {
        let k = key("alpha", "pw-1");
        let token = k.encode(USER, (1_700_000_000_123, 77));
        // The old unsigned format, hex of "v1:<ms>:<id>".
        let unsigned: String = "v1:1700000000123:78".bytes().map(|b| format!("{b:02x}")).collect();
        let mut flipped = token.clone().into_bytes();
        flipped[5] = if flipped[5] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        for bad in [
            unsigned.as_str(),
            &token[..token.len() - 2],
            &token[..token.len() - 1],
            &format!("{token}00"),
            &flipped,
            &token.to_uppercase().replace(|c: char| c.is_ascii_digit(), "G"),
            "zz",
            "\u{e9}\u{e9}",
        ] {
            assert_eq!(k.decode(USER, bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
