//! The scenarios (a, b, c of issue 5; d to g of issue 16) and their baselines. Each function runs its
//! measurements `--runs` times and returns the report section and the latency
//! series (medians over the runs).
//!
//! This module holds what every scenario shares: the service client, the
//! connections and the cache prefill; `reads` (scenario a), `writes`
//! (scenario b), `mixed` (scenario c), `fresh` (d, fresh users, and e, the
//! Redis-only like), `memory` (f), `freshness` (g), `naive` (the DB-only
//! baseline of b and d), `recovery` (h, the replay after a flip) and
//! `measure` (figures across runs) hold the rest.

mod fresh;
mod freshness;
mod measure;
mod memory;
mod mixed;
mod naive;
mod reads;
pub mod recovery;
mod writes;

pub use fresh::{fresh_writes, redis_only};
pub use freshness::freshness;
pub use memory::{memory, memory_item};
pub use mixed::{mixed, mixed_write};
pub use naive::NAIVE_SCHEMA;
pub use reads::reads;
pub use recovery::recovery;
pub use writes::{hot_action, hot_writes, quiesce};

use std::sync::Arc;

use anyhow::Context as _;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use thumbup_core::cache::Conn;
use thumbup_core::keys::Keys;
use thumbup_service::pb;
use thumbup_service::pb::thumbup_client::ThumbupClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use crate::Args;

/// A gRPC client of the service that adds the tenant's metadata.
#[derive(Clone)]
pub struct Service {
    client: ThumbupClient<Channel>,
    tenant: MetadataValue<Ascii>,
    auth: MetadataValue<Ascii>,
    business: i64,
}

impl Service {
    fn new(client: ThumbupClient<Channel>, tenant: &str, token: &str, business: i64) -> anyhow::Result<Service> {
        Ok(Service {
            client,
            tenant: MetadataValue::try_from(tenant).with_context(|| format!("tenant {tenant:?} as metadata"))?,
            auth: MetadataValue::try_from(format!("Bearer {token}")).context("token metadata")?,
            business,
        })
    }

    fn tenant_name(&self) -> &str {
        self.tenant.to_str().unwrap_or("?")
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("x-thumbup-tenant", self.tenant.clone());
        r.metadata_mut().insert("authorization", self.auth.clone());
        r
    }

    /// GetCounts of `ids`; the number of items asked for.
    pub async fn counts(&self, ids: Vec<i64>) -> Result<usize, String> {
        let n = ids.len();
        let req = self.request(pb::GetCountsRequest { business_id: self.business, message_ids: ids });
        self.client.clone().get_counts(req).await.map(|_| n).map_err(|s| format!("GetCounts: {s}"))
    }

    /// The likes of `message` as GetCounts answers now.
    pub async fn likes_of(&self, message: i64) -> Result<i64, String> {
        let req = self.request(pb::GetCountsRequest { business_id: self.business, message_ids: vec![message] });
        let reply = self.client.clone().get_counts(req).await.map_err(|s| format!("GetCounts: {s}"))?;
        Ok(reply.into_inner().counts.get(&message).map_or(0, |c| c.likes))
    }

    /// The newest likers of `message` (one page of 100), as ListItemLikers
    /// answers now.
    pub async fn likers_of(&self, message: i64) -> Result<Vec<i64>, String> {
        let req = self.request(pb::ListItemLikersRequest {
            business_id: self.business,
            message_id: message,
            page_size: 100,
            page_token: String::new(),
        });
        let reply = self.client.clone().list_item_likers(req).await.map_err(|s| format!("ListItemLikers: {s}"))?;
        Ok(reply.into_inner().likers.into_iter().map(|l| l.mid).collect())
    }

    /// One action of `mid` on `message`.
    pub async fn act(&self, mid: i64, message: i64, action: pb::Action) -> Result<usize, String> {
        let req = self.request(pb::LikeRequest {
            business_id: self.business,
            message_id: message,
            mid,
            up_mid: 42,
            action: action as i32,
        });
        self.client.clone().like(req).await.map(|_| 1).map_err(|s| format!("Like: {s}"))
    }
}

/// Connections shared by the scenarios.
pub struct Context {
    /// The service, as `--tenant`.
    pub service: Service,
    /// The service, as `--cold-tenant` (hot-key cache off).
    pub cold: Option<Service>,
    /// gRPC health checks on the same connection as `service`: an empty
    /// unary RPC, the floor that any RPC of the service costs.
    pub health: HealthClient<Channel>,
    /// Admin Redis connection (baseline).
    pub redis: Conn,
    /// Admin MariaDB pool (tenant schema reads; naive schema setup).
    pub admin_db: MySqlPool,
    /// The counts key of item k (index k - 1).
    pub count_keys: Arc<Vec<String>>,
}

impl Context {
    /// Connects to the service, Redis and MariaDB.
    pub async fn connect(args: &Args) -> anyhow::Result<Context> {
        let channel = thumbup_service::client_endpoint(&args.addr, args.ca_file.as_deref())
            .context("service address")?
            .connect()
            .await
            .with_context(|| format!("connect to thumbup-service at {}", args.addr))?;
        let health = HealthClient::new(channel.clone());
        let client = ThumbupClient::new(channel);
        let service = Service::new(client.clone(), &args.tenant, &args.token, args.business)?;
        let cold = match &args.cold_tenant {
            Some(t) => Some(Service::new(client, t, &args.cold_token, args.business)?),
            None => None,
        };
        let redis = thumbup_core::cache::admin_connect(&args.redis_url, std::time::Duration::from_secs(30))
            .await
            .context("connect to Redis with the admin URL")?;
        let admin_db = MySqlPoolOptions::new()
            .max_connections(4)
            .connect(&args.db_url)
            .await
            .context("connect to MariaDB with the admin URL")?;
        let keys = Keys::new(&args.tenant, 1);
        let count_keys =
            Arc::new((1..=args.items.max(1)).map(|k| keys.counts(args.business, args.item_base + k as i64)).collect());
        Ok(Context { service, cold, health, redis, admin_db, count_keys })
    }
}

/// Reads every item once through the service on both tenants, so their
/// counts keys are in Redis (cache-aside fills them): a scenario measures a
/// warm cache whichever scenarios ran before it.
async fn prefill_counts(ctx: &Context, args: &Args) -> anyhow::Result<()> {
    let ids: Vec<i64> = (1..=args.items as i64).map(|k| args.item_base + k).collect();
    for svc in std::iter::once(&ctx.service).chain(&ctx.cold) {
        for chunk in ids.chunks(100) {
            svc.counts(chunk.to_vec()).await.map_err(anyhow::Error::msg).context("prefill GetCounts")?;
        }
    }
    Ok(())
}
