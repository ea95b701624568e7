//! The `thumbup.v1.Thumbup` gRPC service: the gateway (tenant, token,
//! limits, validation) in front of the read and write paths.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use thumbup_core::db::{Counts, ListEntry};
use thumbup_core::domain::{Action, State};
use tonic::{Request, Response, Status};

use crate::error::{Error, invalid};
use crate::pb;
use crate::pb::thumbup_server::Thumbup;
use crate::tenants::{Registry, Tenant};
use crate::{metrics, read, write};

/// Most ids in one batch request, and the largest page.
pub const MAX_BATCH: usize = 100;

/// Metadata key naming the tenant.
pub const TENANT_HEADER: &str = "x-thumbup-tenant";

/// The gRPC service.
pub struct Api {
    reg: Arc<Registry>,
}

impl Api {
    /// A service over the tenants of `reg`.
    pub fn new(reg: Arc<Registry>) -> Api {
        Api { reg }
    }

    /// Resolves and authenticates the tenant and takes its request token.
    fn gateway<T>(&self, req: &Request<T>) -> Result<Arc<Tenant>, Error> {
        let md = req.metadata();
        let name = md.get(TENANT_HEADER).and_then(|v| v.to_str().ok()).ok_or(Error::MissingTenant)?;
        let tenant = self.reg.get(name).ok_or_else(|| Error::UnknownTenant(name.to_string()))?;
        let token = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !tenant.accepts(token) {
            return Err(Error::Unauthenticated(name.to_string()));
        }
        if !tenant.allow_request() {
            return Err(Error::RateLimited { tenant: name.to_string(), limit: "per_tenant_per_sec" });
        }
        Ok(tenant)
    }
}

fn positive(what: &str, v: i64) -> Result<i64, Error> {
    if v > 0 { Ok(v) } else { Err(invalid(format!("{what} must be > 0, got {v}"))) }
}

fn business(t: &Tenant, id: i64) -> Result<i64, Error> {
    positive("business_id", id)?;
    if t.cfg.has_business(id) {
        Ok(id)
    } else {
        Err(Error::UnknownBusiness { tenant: t.name().to_string(), business: id })
    }
}

fn batch(ids: &[i64]) -> Result<Vec<i64>, Error> {
    if ids.is_empty() || ids.len() > MAX_BATCH {
        return Err(invalid(format!("message_ids must hold 1 to {MAX_BATCH} ids, got {}", ids.len())));
    }
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        positive("message_ids", *id)?;
        if !out.contains(id) {
            out.push(*id);
        }
    }
    Ok(out)
}

fn page_size(size: u32) -> Result<u32, Error> {
    if size == 0 || size as usize > MAX_BATCH {
        return Err(invalid(format!("page_size must be 1 to {MAX_BATCH}, got {size}")));
    }
    Ok(size)
}

/// Encodes a list cursor as an opaque token.
pub fn encode_token(e: ListEntry) -> String {
    format!("v1:{}:{}", e.0, e.1).bytes().map(|b| format!("{b:02x}")).collect()
}

/// The token of the page after `page`, empty when there is none.
fn next_token(page: &[ListEntry], more: bool) -> String {
    page.last().filter(|_| more).map(|e| encode_token(*e)).unwrap_or_default()
}

/// Decodes a token from [`encode_token`]; empty means the first page.
pub fn decode_token(token: &str) -> Result<Option<ListEntry>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || invalid("page_token is not a token this service issued");
    if !token.len().is_multiple_of(2) || token.len() > 128 {
        return Err(bad());
    }
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok()).collect();
    let text = String::from_utf8(bytes.ok_or_else(bad)?).map_err(|_| bad())?;
    let mut parts = text.split(':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("v1"), Some(ms), Some(id), None) => {
            Ok(Some((ms.parse().map_err(|_| bad())?, id.parse().map_err(|_| bad())?)))
        }
        _ => Err(bad()),
    }
}

fn pb_state(s: State) -> i32 {
    match s {
        State::None => pb::State::None as i32,
        State::Like => pb::State::Like as i32,
        State::Dislike => pb::State::Dislike as i32,
    }
}

fn pb_counts(c: Counts) -> pb::Counts {
    pb::Counts { likes: c.likes, dislikes: c.dislikes }
}

/// Counts the request and its latency under `rpc`.
async fn observed<T>(rpc: &str, f: impl Future<Output = Result<T, Error>>) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let result = f.await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    };
    metrics::REQUESTS.with_label_values(&[rpc, &format!("{code:?}")]).inc();
    metrics::LATENCY.with_label_values(&[rpc]).observe(start.elapsed().as_secs_f64());
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl Thumbup for Api {
    async fn like(&self, req: Request<pb::LikeRequest>) -> Result<Response<pb::LikeReply>, Status> {
        observed("Like", async {
            let t = self.gateway(&req)?;
            let r = req.get_ref();
            let action = match pb::Action::try_from(r.action) {
                Ok(pb::Action::Like) => Action::Like,
                Ok(pb::Action::Unlike) => Action::Unlike,
                Ok(pb::Action::Dislike) => Action::Dislike,
                Ok(pb::Action::Undislike) => Action::Undislike,
                _ => {
                    return Err(invalid(format!(
                        "action must be LIKE, UNLIKE, DISLIKE or UNDISLIKE, got {}",
                        r.action
                    )));
                }
            };
            let w = write::Write {
                business_id: business(&t, r.business_id)?,
                message_id: positive("message_id", r.message_id)?,
                mid: positive("mid", r.mid)?,
                up_mid: positive("up_mid", r.up_mid)?,
                action,
            };
            if !t.allow_write(w.mid) {
                return Err(Error::RateLimited { tenant: t.name().to_string(), limit: "per_mid_per_sec" });
            }
            let out = write::like(&self.reg, &t, w).await?;
            Ok(pb::LikeReply { state: pb_state(out.state), counts: Some(pb_counts(out.counts)), version: out.version })
        })
        .await
    }

    async fn get_states(&self, req: Request<pb::GetStatesRequest>) -> Result<Response<pb::GetStatesReply>, Status> {
        observed("GetStates", async {
            let t = self.gateway(&req)?;
            let r = req.get_ref();
            let biz = business(&t, r.business_id)?;
            let mid = positive("mid", r.mid)?;
            let ids = batch(&r.message_ids)?;
            let states = read::states(&t, mid, biz, &ids).await?;
            Ok(pb::GetStatesReply { states: states.into_iter().map(|(m, s)| (m, pb_state(s))).collect() })
        })
        .await
    }

    async fn get_counts(&self, req: Request<pb::GetCountsRequest>) -> Result<Response<pb::GetCountsReply>, Status> {
        observed("GetCounts", async {
            let t = self.gateway(&req)?;
            let r = req.get_ref();
            let biz = business(&t, r.business_id)?;
            let ids = batch(&r.message_ids)?;
            let counts = read::counts(&self.reg, &t, biz, &ids).await?;
            let counts: HashMap<i64, pb::Counts> = counts.into_iter().map(|(m, c)| (m, pb_counts(c))).collect();
            Ok(pb::GetCountsReply { counts })
        })
        .await
    }

    async fn list_user_likes(
        &self,
        req: Request<pb::ListUserLikesRequest>,
    ) -> Result<Response<pb::ListUserLikesReply>, Status> {
        observed("ListUserLikes", async {
            let t = self.gateway(&req)?;
            let r = req.get_ref();
            let biz = business(&t, r.business_id)?;
            let mid = positive("mid", r.mid)?;
            let size = page_size(r.page_size)?;
            let after = decode_token(&r.page_token)?;
            let (items, more) = read::user_likes(&t, mid, biz, after, size).await?;
            let next_page_token = next_token(&items, more);
            let items = items.into_iter().map(|(ms, m)| pb::LikedItem { message_id: m, liked_at_ms: ms }).collect();
            Ok(pb::ListUserLikesReply { items, next_page_token })
        })
        .await
    }

    async fn list_item_likers(
        &self,
        req: Request<pb::ListItemLikersRequest>,
    ) -> Result<Response<pb::ListItemLikersReply>, Status> {
        observed("ListItemLikers", async {
            let t = self.gateway(&req)?;
            let r = req.get_ref();
            let biz = business(&t, r.business_id)?;
            let msg = positive("message_id", r.message_id)?;
            let size = page_size(r.page_size)?;
            let after = decode_token(&r.page_token)?;
            let (rows, more) = read::item_likers(&t, biz, msg, after, size).await?;
            let next_page_token = next_token(&rows, more);
            let likers = rows.into_iter().map(|(ms, mid)| pb::Liker { mid, liked_at_ms: ms }).collect();
            Ok(pb::ListItemLikersReply { likers, next_page_token })
        })
        .await
    }

    async fn get_received_likes(
        &self,
        req: Request<pb::GetReceivedLikesRequest>,
    ) -> Result<Response<pb::GetReceivedLikesReply>, Status> {
        observed("GetReceivedLikes", async {
            let t = self.gateway(&req)?;
            let r = req.get_ref();
            let biz = business(&t, r.business_id)?;
            let up = positive("up_mid", r.up_mid)?;
            Ok(pb::GetReceivedLikesReply { likes: read::received(&self.reg, &t, biz, up).await? })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_invalid_argument() {
        let e = (1_700_000_000_123, 42);
        assert_eq!(decode_token(&encode_token(e)).unwrap(), Some(e));
        assert_eq!(decode_token("").unwrap(), None);
        for bad in ["zz", "abc", "76313a783a79", "76323a313a32", "%%%%"] {
            assert_eq!(decode_token(bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn batches_are_bounded_and_deduplicated() {
        assert_eq!(batch(&[3, 3, 4]).unwrap(), vec![3, 4]);
        assert!(batch(&[]).is_err());
        assert!(batch(&[0]).is_err());
        assert!(batch(&vec![1; MAX_BATCH + 1]).is_err());
    }
}
