//! The data-layer side of a tenant, done with the admin credentials of the
//! operator config: the functions of `thumbup_core::provision` applied to a
//! LikeTenant on the right datacenters. Each converges when run again.

use thumbup_core::config::{Business, DbConfig, RedisConfig, TenantConfig};
use thumbup_core::provision;
use tracing::{info, warn};

use crate::config::{Datacenter, OperatorConfig};
use crate::crd::{DeletionPolicy, LikeTenant};
use crate::error::{Error, Result};
use crate::resources::{self, Credentials};

/// The core tenant config the provisioning functions take, with the
/// addresses the operator itself reaches (`admin_url` when set). Only the
/// name, schema, endpoints and credentials matter to provisioning; the
/// provisioning functions check every value they put into a statement.
pub fn tenant_config(lt: &LikeTenant, creds: &Credentials, dc: &Datacenter) -> TenantConfig {
    TenantConfig {
        name: lt.tenant(),
        businesses: lt.spec.businesses.iter().map(|b| Business { name: b.name.clone(), id: b.id }).collect(),
        tokens: vec![creds.token.clone()],
        tokens_file: None,
        redis: RedisConfig {
            url: dc.redis.admin_url.clone().unwrap_or_else(|| dc.redis.url.clone()),
            username: creds.redis_username.clone(),
            password: creds.redis_password.clone(),
            password_file: None,
            tls: dc.redis.tls.clone(),
        },
        db: DbConfig {
            url: dc.db.admin_url.clone().unwrap_or_else(|| dc.db.url.clone()),
            username: creds.db_username.clone(),
            password: creds.db_password.clone(),
            password_file: None,
            schema: Some(lt.schema()),
            // Migrations run one statement at a time.
            max_connections: 2,
            tls: dc.db.tls.clone(),
        },
        limits: Default::default(),
        cache: Default::default(),
        stream: Default::default(),
    }
}

/// The schema, the DB user and the migrations on `dc` (the active
/// datacenter; the standby gets them by replication).
pub async fn database(lt: &LikeTenant, creds: &Credentials, dc: &Datacenter) -> Result<()> {
    let t = tenant_config(lt, creds, dc);
    let admin = dc.db.admin_url()?;
    provision::provision_db(&admin, &t).await.map_err(Error::Database)?;
    provision::migrate(&t).await.map_err(Error::Database)
}

/// The project's function library and the tenant's ACL user on every
/// datacenter's Redis (`provision_redis` does both).
pub async fn redis(lt: &LikeTenant, creds: &Credentials, cfg: &OperatorConfig) -> Result<()> {
    for dc in &cfg.datacenters {
        let t = tenant_config(lt, creds, dc);
        let admin = dc.redis.admin_url()?;
        let saved = provision::provision_redis(&admin, &t)
            .await
            .map_err(|source| Error::Redis { dc: dc.name.clone(), source })?;
        if !saved {
            warn!(dc = %dc.name, "Redis has no ACL file: the tenant user lives until the next restart of that Redis");
        }
    }
    Ok(())
}

/// Removes the tenant's access everywhere: its ACL user on every Redis;
/// with `deletionPolicy: Delete` also its schema and DB user on `active` and
/// every key under its prefix on every Redis. Retain keeps the schema, the DB
/// user and the keys, so a LikeTenant created again finds its data.
pub async fn teardown(lt: &LikeTenant, cfg: &OperatorConfig, active: &Datacenter) -> Result<()> {
    let tenant = lt.tenant();
    for dc in &cfg.datacenters {
        let admin = dc.redis.admin_url()?;
        provision::drop_redis_user(&admin, &tenant, &resources::redis_username(&tenant))
            .await
            .map_err(|source| Error::Redis { dc: dc.name.clone(), source })?;
    }
    if lt.spec.deletion_policy == DeletionPolicy::Delete {
        provision::drop_db(&active.db.admin_url()?, &tenant, &lt.schema(), &resources::db_username(&tenant))
            .await
            .map_err(Error::Database)?;
        for dc in &cfg.datacenters {
            let removed = provision::delete_keys(&dc.redis.admin_url()?, &tenant)
                .await
                .map_err(|source| Error::Redis { dc: dc.name.clone(), source })?;
            info!(dc = %dc.name, removed, "tenant keys deleted");
        }
    }
    Ok(())
}
