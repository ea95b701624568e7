//! The data-layer side of a tenant, done with the admin credentials of the
//! operator config: the functions of `thumbup_core::provision` applied to a
//! LikeTenant on the right datacenters. Each converges when run again.
//!
//! Every account and schema is claimed for the LikeTenant ([`owner`]) before
//! anything is created ([`admit`]), and teardown removes only what the
//! LikeTenant holds, so no LikeTenant can take over, reset or drop an
//! account or schema that thumbup did not create for it.

use thumbup_core::config::TenantConfig;
use thumbup_core::provision::{self, Adopt, Owner};
use tracing::{info, warn};

use crate::config::{Datacenter, OperatorConfig};
use crate::crd::{DeletionPolicy, LikeTenant};
use crate::error::{Error, Result};
use crate::resources::{self, Credentials};

/// The owner recorded for what this LikeTenant's provisioning creates: the
/// installation, the LikeTenant's namespace/name and its uid.
pub fn owner(lt: &LikeTenant, installation: &str) -> Owner {
    let ns = lt.metadata.namespace.clone().unwrap_or_default();
    Owner {
        installation: installation.to_string(),
        object: format!("LikeTenant {ns}/{}", lt.tenant()),
        uid: lt.metadata.uid.clone().unwrap_or_default(),
    }
}

fn adopt(lt: &LikeTenant) -> Adopt {
    if lt.spec.adopt_existing { Adopt::Unowned } else { Adopt::Never }
}

/// The core tenant config the provisioning functions take: the
/// LikeTenant's config ([`resources::tenant_config`]) with its credentials
/// and the addresses the operator itself reaches (`admin_url` when set).
/// Only the name, schema, endpoints and credentials matter to
/// provisioning; the provisioning functions check every value they put
/// into a statement.
pub fn tenant_config(lt: &LikeTenant, creds: &Credentials, dc: &Datacenter) -> TenantConfig {
    let mut t = resources::tenant_config(lt, dc, dc.db.admin_url.clone().unwrap_or_else(|| dc.db.url.clone()));
    t.tokens = vec![creds.token.clone()];
    t.redis.url = dc.redis.admin_url.clone().unwrap_or_else(|| dc.redis.url.clone());
    t.redis.password = creds.redis_password.clone();
    t.db.password = creds.db_password.clone();
    // Migrations run one statement at a time.
    t.db.max_connections = 2;
    t
}

/// The admission of a LikeTenant to the data layer: claims its schema and
/// DB user on `dc` (the active datacenter) and its ACL user on every
/// datacenter's Redis for `owner`, before anything is created. A reserved
/// schema, or an account or schema that `owner` may not take, is refused
/// here with nothing changed but the records of what was free.
pub async fn admit(lt: &LikeTenant, owner: &Owner, cfg: &OperatorConfig, dc: &Datacenter) -> Result<()> {
    let tenant = lt.tenant();
    provision::claim_db(&dc.db.admin_url()?, &tenant, &lt.schema(), owner, adopt(lt)).await.map_err(Error::Database)?;
    for dc in &cfg.datacenters {
        provision::claim_redis(&dc.redis.admin_url()?, &tenant, owner, adopt(lt))
            .await
            .map_err(|source| Error::Redis { dc: dc.name.clone(), source })?;
    }
    Ok(())
}

/// The schema, the DB user (capped at `spec.limits.maxDbConnections`
/// sessions) and the migrations on `dc` (the active datacenter; the standby
/// gets them by replication).
pub async fn database(lt: &LikeTenant, owner: &Owner, creds: &Credentials, dc: &Datacenter) -> Result<()> {
    let t = tenant_config(lt, creds, dc);
    let admin = dc.db.admin_url()?;
    let cap = lt.spec.limits.max_db_connections.max(1) as u32;
    provision::provision_db_as(&admin, &t, owner, adopt(lt), Some(cap)).await.map_err(Error::Database)?;
    provision::migrate(&t).await.map_err(Error::Database)
}

/// The project's function library and the tenant's ACL user on every
/// datacenter's Redis (`provision_redis_as` does both).
pub async fn redis(lt: &LikeTenant, owner: &Owner, creds: &Credentials, cfg: &OperatorConfig) -> Result<()> {
    for dc in &cfg.datacenters {
        let t = tenant_config(lt, creds, dc);
        let admin = dc.redis.admin_url()?;
        let saved = provision::provision_redis_as(&admin, &t, owner, adopt(lt))
            .await
            .map_err(|source| Error::Redis { dc: dc.name.clone(), source })?;
        if !saved {
            warn!(dc = %dc.name, "Redis has no ACL file: the tenant user lives until the next restart of that Redis");
        }
    }
    Ok(())
}

/// Removes the tenant's access everywhere, as far as `owner` holds it: its
/// ACL user on every Redis; with `deletionPolicy: Delete` also its schema
/// and DB user on `active` and every key under its prefix on every Redis
/// whose ACL user it held. Retain keeps the schema, the DB user and the
/// keys, released so that a LikeTenant of the same name created again finds
/// its data. What another owner holds is left alone.
pub async fn teardown(lt: &LikeTenant, owner: &Owner, cfg: &OperatorConfig, active: &Datacenter) -> Result<()> {
    let tenant = lt.tenant();
    let delete = lt.spec.deletion_policy == DeletionPolicy::Delete;
    for dc in &cfg.datacenters {
        let admin = dc.redis.admin_url()?;
        let redis_err = |source| Error::Redis { dc: dc.name.clone(), source };
        let held = provision::drop_redis_user(&admin, &tenant, owner).await.map_err(redis_err)?;
        if !held {
            warn!(dc = %dc.name, "the tenant's Redis user is not this LikeTenant's: left alone");
        } else if delete {
            let removed = provision::delete_keys(&admin, &tenant).await.map_err(redis_err)?;
            info!(dc = %dc.name, removed, "tenant keys deleted");
        }
    }
    let admin = active.db.admin_url()?;
    if delete {
        let (schema, user) = provision::drop_db(&admin, &tenant, &lt.schema(), owner).await.map_err(Error::Database)?;
        if !(schema && user) {
            warn!(schema, user, "the schema or DB user is not this LikeTenant's: left alone");
        }
    } else {
        provision::release_db(&admin, &tenant, &lt.schema(), owner).await.map_err(Error::Database)?;
    }
    Ok(())
}
