//! Per-process scratch directories under the system's temp dir, so that
//! concurrent runs of the same test do not share files.

use std::path::PathBuf;

/// `<temp>/thumbup-<name>-<pid>`: the scratch directory `name` of this
/// test process (not created).
pub fn test_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("thumbup-{name}-{}", std::process::id()))
}

/// [`test_dir`], emptied of what an earlier run left and created.
pub fn fresh_test_dir(name: &str) -> PathBuf {
    let dir = test_dir(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
