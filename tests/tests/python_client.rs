//! The Python client test: `tests/python/client_test.py`, with grpcio and
//! stubs that grpcio-tools generates from `proto/` in the run, calls every
//! RPC of the service (served by the e2e [`World`] against the real MariaDB
//! and Redis, with the tenant's job applying its stream) and lists the
//! services through reflection v1alpha and v1. The interpreter is
//! `THUMBUP_PYTHON`, the venv that `scripts/python.sh` makes and
//! `scripts/test.sh` exports.

use std::path::PathBuf;

use thumbup_e2e::*;
use thumbup_test_support::stack::{root, stack_ca};

const TENANT: &str = "e2e-python";

/// The venv's interpreter; without one the test fails saying how to get it.
fn python() -> PathBuf {
    match std::env::var_os("THUMBUP_PYTHON") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            assert!(
                p.exists(),
                "THUMBUP_PYTHON={} does not exist: run `scripts/python.sh` to make the venv",
                p.display()
            );
            p
        }
        _ => panic!(
            "THUMBUP_PYTHON is not set: run scripts/test.sh, or make the venv and point at it: \
             `export THUMBUP_PYTHON=\"$(scripts/python.sh)\"` then \
             `cargo test -p thumbup-e2e --test python_client`"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_calls_every_rpc_and_lists_the_services_through_reflection_v1alpha_and_v1() {
    let python = python();
    let w = World::start("python", &tenant_yaml(TENANT, &[1], "")).await;
    let _job = w.job(TENANT, 100);
    let host_port = w.addr.split_once("://").map(|(_, a)| a.to_string()).expect("scheme://host:port");
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(root().join("tests/python/client_test.py"))
        .args(["--addr", &host_port, "--tenant", TENANT, "--token", &format!("tok-{TENANT}-0001"), "--business", "1"])
        .arg("--proto-dir")
        .arg(root().join("proto"))
        .env("PYTHONUNBUFFERED", "1")
        .kill_on_drop(true);
    if tls_mode() {
        cmd.arg("--ca-file").arg(stack_ca());
    }
    let out = cmd.output().await.unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("--- client_test.py stdout\n{stdout}--- client_test.py stderr\n{stderr}---");
    assert!(out.status.success(), "client_test.py failed ({}):\n{stderr}", out.status);
    assert!(stdout.contains("all checks passed"), "{stdout}");
    // What the script did left the tenant's data exact.
    check_exact(w.tenant(TENANT)).await;
    w.stop().await;
}
