//! The `thumbup.v1.Thumbup` gRPC service: the gateway (tenant, token,
//! limits, validation) in front of the read and write paths.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thumbup_core::db::Counts;
use thumbup_core::domain::{Action, State};
use tonic::{Request, Response, Status};

use crate::error::{Error, invalid};
use crate::page::{List, Scope, next_token};
use crate::pb;
use crate::pb::thumbup_server::Thumbup;
use crate::tenants::{Registry, Tenant};
use crate::{metrics, read, write};

/// Most ids in one batch request, and the largest page.
pub const MAX_BATCH: usize = 100;

/// Metadata key naming the tenant.
pub const TENANT_HEADER: &str = "x-thumbup-tenant";

/// The `tenant` label of the request metrics for requests that did not
/// authenticate (no tenant, an unknown one, a wrong token). A tenant name
/// starts with a letter, so no tenant is labelled so, and whatever a caller
/// sends adds no label value: the labels are the configured tenants and
/// this one.
pub const UNAUTHENTICATED_TENANT: &str = "_unauthenticated";

/// The gRPC service.
pub struct Api {
    reg: Arc<Registry>,
    /// How long a write is waited for before its client hears UNAVAILABLE.
    write_timeout: Duration,
}

impl Api {
    /// A service over the tenants of `reg`, answering a write within
    /// `write_timeout`.
    pub fn new(reg: Arc<Registry>, write_timeout: Duration) -> Api {
        Api { reg, write_timeout }
    }

    /// Resolves and authenticates the tenant.
    fn authenticate<T>(&self, req: &Request<T>) -> Result<Arc<Tenant>, Error> {
        let md = req.metadata();
        let name = md.get(TENANT_HEADER).and_then(|v| v.to_str().ok()).ok_or(Error::MissingTenant)?;
        // An unknown tenant answers as a wrong token does.
        let tenant = self.reg.get(name).ok_or_else(|| Error::Unauthenticated(name.to_string()))?;
        let token = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !tenant.accepts(token) {
            return Err(Error::Unauthenticated(name.to_string()));
        }
        Ok(tenant)
    }

    /// The gateway, then `body`: authenticates the tenant, takes its
    /// request token, and runs `body` on the tenant and the message.
    /// Counts the request and its latency under `rpc` and the tenant
    /// ([`UNAUTHENTICATED_TENANT`] when it did not authenticate).
    async fn serve<M, T>(
        &self,
        rpc: &str,
        req: Request<M>,
        body: impl AsyncFnOnce(Arc<Tenant>, M) -> Result<T, Error>,
    ) -> Result<Response<T>, Status> {
        let start = Instant::now();
        let (tenant, result) = match self.authenticate(&req) {
            Err(e) => (None, Err(e)),
            Ok(t) if !t.allow_request() => {
                let limited = Error::RateLimited { tenant: t.name().to_string(), limit: "per_tenant_per_sec" };
                (Some(t), Err(limited))
            }
            Ok(t) => (Some(t.clone()), body(t, req.into_inner()).await),
        };
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        };
        let label = tenant.as_ref().map_or(UNAUTHENTICATED_TENANT, |t| t.name());
        metrics::REQUESTS.with_label_values(&[rpc, label, code_label(code)]).inc();
        metrics::LATENCY.with_label_values(&[rpc, label]).observe(start.elapsed().as_secs_f64());
        result.map(Response::new).map_err(Status::from)
    }
}

/// The `code` label of a request: the code's name, as `Debug` writes it,
/// without formatting one per request.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
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

#[tonic::async_trait]
impl Thumbup for Api {
    async fn like(&self, req: Request<pb::LikeRequest>) -> Result<Response<pb::LikeReply>, Status> {
        self.serve("Like", req, async |t, r| {
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
            // On a task of its own: neither the deadline nor a client that
            // goes away may stop a write between its Redis call and the
            // bookkeeping after it.
            let (reg, tenant) = (self.reg.clone(), t.clone());
            let task = tokio::spawn(async move { write::like(&reg, &tenant, w).await });
            let unknown = |why: String| Error::Unavailable { tenant: t.name().to_string(), why };
            let out = match tokio::time::timeout(self.write_timeout, task).await {
                Ok(Ok(done)) => done?,
                Ok(Err(e)) => return Err(unknown(format!("the write failed midway ({e}); its outcome is unknown"))),
                Err(_) => {
                    metrics::SERVER_REFUSED.with_label_values(&["write_timeout"]).inc();
                    return Err(unknown(format!(
                        "not finished within the server's request timeout of {:?}; it goes on, and its outcome is unknown",
                        self.write_timeout
                    )));
                }
            };
            Ok(pb::LikeReply { state: pb_state(out.state), counts: Some(pb_counts(out.counts)), version: out.version })
        })
        .await
    }

    async fn get_states(&self, req: Request<pb::GetStatesRequest>) -> Result<Response<pb::GetStatesReply>, Status> {
        self.serve("GetStates", req, async |t, r| {
            let biz = business(&t, r.business_id)?;
            let mid = positive("mid", r.mid)?;
            let ids = batch(&r.message_ids)?;
            let states = read::states(&t, mid, biz, &ids).await?;
            Ok(pb::GetStatesReply { states: states.into_iter().map(|(m, s)| (m, pb_state(s))).collect() })
        })
        .await
    }

    async fn get_counts(&self, req: Request<pb::GetCountsRequest>) -> Result<Response<pb::GetCountsReply>, Status> {
        self.serve("GetCounts", req, async |t, r| {
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
        self.serve("ListUserLikes", req, async |t, r| {
            let biz = business(&t, r.business_id)?;
            let mid = positive("mid", r.mid)?;
            let size = page_size(r.page_size)?;
            let scope = Scope { list: List::UserLikes, business: biz, subject: mid };
            let after = t.page_key.decode(scope, &r.page_token)?;
            let (items, more) = read::user_likes(&t, mid, biz, after, size).await?;
            let next_page_token = next_token(&t.page_key, scope, &items, more);
            let items = items.into_iter().map(|(ms, m)| pb::LikedItem { message_id: m, liked_at_ms: ms }).collect();
            Ok(pb::ListUserLikesReply { items, next_page_token })
        })
        .await
    }

    async fn list_item_likers(
        &self,
        req: Request<pb::ListItemLikersRequest>,
    ) -> Result<Response<pb::ListItemLikersReply>, Status> {
        self.serve("ListItemLikers", req, async |t, r| {
            let biz = business(&t, r.business_id)?;
            let msg = positive("message_id", r.message_id)?;
            let size = page_size(r.page_size)?;
            let scope = Scope { list: List::ItemLikers, business: biz, subject: msg };
            let after = t.page_key.decode(scope, &r.page_token)?;
            let (rows, more) = read::item_likers(&t, biz, msg, after, size).await?;
            let next_page_token = next_token(&t.page_key, scope, &rows, more);
            let likers = rows.into_iter().map(|(ms, mid)| pb::Liker { mid, liked_at_ms: ms }).collect();
            Ok(pb::ListItemLikersReply { likers, next_page_token })
        })
        .await
    }

    async fn get_received_likes(
        &self,
        req: Request<pb::GetReceivedLikesRequest>,
    ) -> Result<Response<pb::GetReceivedLikesReply>, Status> {
        self.serve("GetReceivedLikes", req, async |t, r| {
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
    fn batches_are_bounded_and_deduplicated() {
        assert_eq!(batch(&[3, 3, 4]).unwrap(), vec![3, 4]);
        assert!(batch(&[]).is_err());
        assert!(batch(&[0]).is_err());
        assert!(batch(&vec![1; MAX_BATCH + 1]).is_err());
    }
    #[test]
    fn the_code_label_is_the_name_of_every_grpc_code() {
        for i in 0..=16 {
            let code = tonic::Code::from_i32(i);
            assert_eq!(code_label(code), format!("{code:?}"), "code {i}");
        }
    }
}
