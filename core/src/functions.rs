//! The project's Redis code as a Redis 7 Functions library
//! (`functions.lua`): the atomic transition, set-if-newer and the applied
//! watermark. Provisioning loads it with the admin account
//! (`FUNCTION LOAD REPLACE`, [`load`]); tenants call it by name with FCALL
//! and FCALL_RO ([`crate::cache::Scripts`]) and may not run EVAL, load
//! scripts or touch functions themselves: a tenant runs only this code.
//!
//! Names carry a version, a hash of the library source: a release whose
//! code differs loads its own library beside the old one, so pods of the
//! old release keep calling theirs while the new ones roll out, and one
//! whose code is the same finds its library already there. Nothing removes
//! an old version; once no pod runs it, `FUNCTION DELETE thumbup_<version>`
//! with the admin account does.

use std::sync::LazyLock;

use redis::RedisError;

use crate::version::EPOCH_MS;

/// The library template: `__VERSION__` and `__EPOCH_MS__` are filled in.
const TEMPLATE: &str = include_str!("functions.lua");

/// The error code of a call to a function that is not loaded on the Redis
/// it was sent to (see [`explain`]).
pub const NOT_LOADED: &str = "THUMBUP_NOT_LOADED";

/// One function of the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    /// The atomic state transition (writes the state, the liked list and
    /// the event).
    Transition,
    /// Caches a versioned value unless a newer one is cached.
    SetIfNewer,
    /// The applied watermark of a stream shard (reads only).
    Watermark,
    /// Establishes a stream shard's newest-user bound.
    Establish,
    /// Forgets records of a user's cache that were written elsewhere.
    Forget,
}

impl Function {
    /// Every function of the library.
    pub const ALL: [Function; 5] =
        [Function::Transition, Function::SetIfNewer, Function::Watermark, Function::Establish, Function::Forget];

    fn base(self) -> &'static str {
        match self {
            Function::Transition => "transition",
            Function::SetIfNewer => "set_if_newer",
            Function::Watermark => "watermark",
            Function::Establish => "establish",
            Function::Forget => "forget",
        }
    }

    /// Registered with the `no-writes` flag, so called with FCALL_RO.
    pub fn read_only(self) -> bool {
        self == Function::Watermark
    }

    /// The command that calls it.
    pub fn command(self) -> &'static str {
        if self.read_only() { "FCALL_RO" } else { "FCALL" }
    }
}

/// The library of this build: its version and its source as loaded.
#[derive(Debug)]
pub struct Library {
    version: String,
    source: String,
}

/// FNV-1a (64 bit): stable across Rust versions and platforms, unlike
/// `DefaultHasher`, so every build of the same source gets the same name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl Library {
    fn build(template: &str) -> Library {
        let code = template
            .replace("__EPOCH_MS__", &EPOCH_MS.to_string())
            .replace("__NONE_BASE__", &crate::cache::NONE_BASE.to_string());
        let version = format!("{:016x}", fnv1a(code.as_bytes()));
        let source = code.replace("__VERSION__", &version);
        Library { version, source }
    }

    /// The version: a hash of the source.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The library name: `thumbup_<version>`.
    pub fn name(&self) -> String {
        format!("thumbup_{}", self.version)
    }

    /// The registered name of `f`: `thumbup_<function>_<version>` (function
    /// names are global in Redis, so they carry the version too).
    pub fn function(&self, f: Function) -> String {
        format!("thumbup_{}_{}", f.base(), self.version)
    }

    /// The source sent with `FUNCTION LOAD`.
    pub fn source(&self) -> &str {
        &self.source
    }
}

static LIBRARY: LazyLock<Library> = LazyLock::new(|| Library::build(TEMPLATE));

/// The library of this build.
pub fn library() -> &'static Library {
    &LIBRARY
}

/// Loads (or replaces) this build's library with an admin connection.
/// Converges: loading the same source again changes nothing, and other
/// versions stay loaded.
pub async fn load<C: redis::aio::ConnectionLike>(con: &mut C) -> Result<(), RedisError> {
    let _name: String =
        redis::cmd("FUNCTION").arg("LOAD").arg("REPLACE").arg(library().source()).query_async(con).await?;
    Ok(())
}

/// Turns Redis's `ERR Function not found` into an error that says which
/// library is missing and what loads it; other errors pass unchanged. Such
/// a call ran nothing. The result has a code, so it is not taken for an
/// unreachable Redis ([`crate::cache::is_unreachable`]).
pub fn explain(e: RedisError) -> RedisError {
    if e.code() == Some("ERR") && e.detail().is_some_and(|d| d.starts_with("Function not found")) {
        let why = format!(
            "the Redis function library {} is not loaded on this Redis (it answered: Function not found); \
             provision the tenant with the admin account (`thumbup-service provision`, or the operator's \
             reconcile), which runs FUNCTION LOAD",
            library().name()
        );
        return redis::make_extension_error(NOT_LOADED.to_string(), Some(why));
    }
    e
}

/// True when the call failed because this build's library is not loaded:
/// nothing ran.
pub fn is_not_loaded(e: &RedisError) -> bool {
    e.code() == Some(NOT_LOADED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loaded_source_names_every_function_under_this_version_and_nothing_is_left_to_fill() {
        let lib = library();
        assert_eq!(lib.version().len(), 16);
        assert!(lib.source().starts_with(&format!("#!lua name={}\n", lib.name())));
        assert!(!lib.source().contains("__"), "a placeholder was not filled in");
        assert!(lib.source().contains(&format!("(ms - {EPOCH_MS}) * 4096")));
        for f in Function::ALL {
            let name = lib.function(f);
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{name}");
            assert!(lib.source().contains(&format!("'{name}'")), "{name} is not registered");
        }
        // The read-only flag that FCALL_RO relies on is the source's.
        let ro = lib.source().split("function_name = ").filter(|s| s.contains("'no-writes'")).count();
        assert_eq!(ro, Function::ALL.iter().filter(|f| f.read_only()).count());
        assert!(lib.source().contains(&format!("function_name = '{}'", lib.function(Function::Watermark))));
    }

    #[test]
    fn a_changed_source_gets_another_version_and_the_same_source_the_same() {
        let a = Library::build(TEMPLATE);
        assert_eq!(a.version(), library().version());
        let b = Library::build(&TEMPLATE.replace("return 1\nend", "return 1 \nend"));
        assert_ne!(a.version(), b.version());
        assert_ne!(a.function(Function::Transition), b.function(Function::Transition));
        // A known vector, so the hash cannot drift between builds.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn only_a_missing_function_is_explained() {
        let missing = redis::make_extension_error("ERR".into(), Some("Function not found".into()));
        let e = explain(missing);
        assert!(is_not_loaded(&e));
        assert!(e.to_string().contains(&library().name()) && e.to_string().contains("provision"), "{e}");
        assert!(!crate::cache::is_unreachable(&e));
        let other = redis::make_extension_error("ERR".into(), Some("malformed state U".into()));
        assert!(!is_not_loaded(&explain(other)));
    }
}
