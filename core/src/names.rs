//! The one home of every name derived from a tenant name: its DB schema, its
//! DB user, its Redis ACL user and key prefix, the Kubernetes objects the
//! operator makes for it, and the schema names no tenant may use.
//!
//! Account names come from here only, never from anything a tenant can
//! write (its spec or its Secret): the service, the job, the provisioning
//! and the operator all call these functions.

use sha2::{Digest, Sha256};

/// The longest user name MySQL 8 and TiDB accept (MariaDB takes 80).
pub const MAX_DB_USER_LEN: usize = 32;

/// The schema holding the ownership records (who created which account and
/// schema). No tenant schema can be called so: derived schemas are
/// `thumbup_<letter>...` and [`reserved_schema`] refuses it as `schemaName`.
pub const CONTROL_SCHEMA: &str = "thumbup__control";

/// The Redis hash holding the ownership records of ACL users. It lies
/// outside every tenant's key pattern (`thumbup:<tenant>:*`), so no tenant
/// account can read or write it.
pub const CONTROL_KEY: &str = "thumbup-control:owners";

/// Schemas of the DB servers themselves (MySQL, MariaDB, TiDB) and the
/// control schema, in lower case: a tenant never gets a grant on them.
pub const RESERVED_SCHEMAS: &[&str] = &[
    "mysql",
    "information_schema",
    "performance_schema",
    "sys",
    "metrics_schema",
    "lightning_task_info",
    CONTROL_SCHEMA,
];

/// The default schema of a tenant: `thumbup_<name>`, `-` written `_` (at
/// most 39 characters for a 31-character name; schemas may have 64).
pub fn schema_for(tenant: &str) -> String {
    format!("thumbup_{}", tenant.replace('-', "_"))
}

/// The prefix of every Redis key of the tenant: `thumbup:<name>:`.
pub fn key_prefix(tenant: &str) -> String {
    format!("thumbup:{tenant}:")
}

/// The pattern of every Redis key of the tenant (`thumbup:<name>:*`): the
/// key pattern of its ACL user, and what deletion scans for.
pub fn key_pattern(tenant: &str) -> String {
    format!("{}*", key_prefix(tenant))
}

/// The tenant's own Secret (credentials, API token, the job's config file).
pub fn tenant_secret(tenant: &str) -> String {
    format!("thumbup-tenant-{tenant}")
}

/// The tenant's job Deployment.
pub fn job_deployment(tenant: &str) -> String {
    format!("thumbup-job-{tenant}")
}

/// The tenant's job Deployment of the datacenter `datacenter`, when the
/// operator runs one per datacenter (`topology.per_datacenter`).
pub fn job_deployment_in(tenant: &str, datacenter: &str) -> String {
    format!("{}-{datacenter}", job_deployment(tenant))
}

/// The keys of the shared registry Secret for a tenant: DB password, Redis
/// password, tokens. The same names are what the job pod's Secret volume
/// projects, so one config file resolves in both pods.
pub fn registry_secret_keys(tenant: &str) -> [String; 3] {
    [format!("{tenant}.db-password"), format!("{tenant}.redis-password"), format!("{tenant}.tokens")]
}

/// True when `schema` names a system schema or the control schema, compared
/// case-insensitively (TiDB, and MySQL on some platforms, fold case).
pub fn reserved_schema(schema: &str) -> bool {
    let s = schema.to_ascii_lowercase();
    RESERVED_SCHEMAS.contains(&s.as_str())
}

/// The tenant's DB user: `thumbup_<name>` (`-` written `_`) when that fits
/// in [`MAX_DB_USER_LEN`] characters (names of up to 24 characters), else
/// `thumbup-<first 15 characters>-<8 hex digits of SHA-256 of the name>`.
/// The long form holds `-`, which the short form never does, so the two
/// forms cannot name the same user.
pub fn db_user(tenant: &str) -> String {
    let short = schema_for(tenant);
    if short.len() <= MAX_DB_USER_LEN {
        return short;
    }
    let digest = Sha256::digest(tenant.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let prefix: String = tenant.chars().take(15).collect();
    format!("thumbup-{prefix}-{hash}")
}

/// The tenant's Redis ACL user: `thumbup-<name>` (Redis has no length cap).
pub fn redis_user(tenant: &str) -> String {
    format!("thumbup-{tenant}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_keep_the_readable_form() {
        assert_eq!(db_user("video-site"), "thumbup_video_site");
        assert_eq!(redis_user("video-site"), "thumbup-video-site");
        assert_eq!(schema_for("video-site"), "thumbup_video_site");
        let longest_short = "a".repeat(24);
        assert_eq!(db_user(&longest_short), format!("thumbup_{longest_short}"));
    }

    #[test]
    fn every_valid_tenant_name_gets_a_db_user_of_at_most_32_characters() {
        for len in 1..=31 {
            let name: String =
                std::iter::once('a').chain((1..len).map(|i| if i % 5 == 0 { '-' } else { 'x' })).collect();
            assert!(crate::config::valid_tenant_name(&name), "{name}");
            let user = db_user(&name);
            assert!(user.len() <= MAX_DB_USER_LEN, "{name} -> {user} ({} chars)", user.len());
            assert!(user.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)), "{user}");
            assert!(schema_for(&name).len() <= 64);
        }
    }

    #[test]
    fn long_names_are_hashed_deterministically_and_stay_distinct() {
        let a = "a-very-long-tenant-name-of-31ch";
        let b = "a-very-long-tenant-name-of-31cx";
        assert_eq!(a.len(), 31);
        assert_eq!(db_user(a), db_user(a), "deterministic");
        assert_ne!(db_user(a), db_user(b), "same prefix, different names");
        assert!(db_user(a).starts_with("thumbup-a-very-long-ten-"), "{}", db_user(a));
        assert_eq!(db_user(a).len(), 32);
        // The long form holds '-', the short form never does.
        assert!(db_user(a).contains('-') && !db_user("a-b").contains('-'));
    }

    #[test]
    fn system_and_control_schemas_are_reserved_in_any_case() {
        for s in ["mysql", "MySQL", "information_schema", "INFORMATION_SCHEMA", "performance_schema", "sys", "SYS"] {
            assert!(reserved_schema(s), "{s}");
        }
        assert!(reserved_schema(CONTROL_SCHEMA) && reserved_schema("THUMBUP__CONTROL"));
        for s in ["thumbup_demo", "mysql_data", "sysx"] {
            assert!(!reserved_schema(s), "{s}");
        }
        // No valid tenant name derives the control schema.
        assert_ne!(schema_for("control"), CONTROL_SCHEMA);
    }
}
