//! The admin HTTP endpoint: the route (`GET`/`PUT /route`), `/metrics`,
//! `/healthz` and `/readyz` (ready once a route is held).
//!
//! `PUT /route` moves every DB session of the pod, so it is the one write on
//! this endpoint and it needs a credential: a proxy started without
//! `--route-token-file` refuses it (403), and one started with it takes a
//! route only with `authorization: Bearer <a line of that file>` (401
//! otherwise). The file is read on each request, so the token rotates by
//! writing the new one beside the old and then removing the old.
//!
//! `thumbup_core::admin` serves the other binaries' fixed set of paths from
//! the default registry; the proxy needs the route paths and its own
//! registry, so it has its own router.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::routes::{Accepted, Routes};

#[derive(Clone)]
struct Admin {
    routes: Arc<Routes>,
    metrics: Arc<Metrics>,
    route_token_file: Option<Arc<PathBuf>>,
}

fn text(code: StatusCode, body: impl Into<String>) -> Response {
    (code, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body.into()).into_response()
}

async fn get_route(State(admin): State<Admin>) -> Response {
    match admin.routes.held() {
        None => text(StatusCode::NOT_FOUND, "no route yet\n"),
        Some(route) => match serde_json::to_string(&*route) {
            Ok(json) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], json).into_response(),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
    }
}

/// Why a `PUT /route` is not let through, or None when its credential is
/// one of the lines of the token file.
fn refused(admin: &Admin, headers: &HeaderMap) -> Option<Response> {
    let Some(path) = &admin.route_token_file else {
        return Some(text(
            StatusCode::FORBIDDEN,
            "route_updates_disabled: this proxy takes routes only from its route source; start it with --route-token-file to accept PUT /route\n",
        ));
    };
    let tokens = match std::fs::read_to_string(path.as_path()) {
        Ok(t) => t,
        Err(e) => {
            return Some(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("route_token_unreadable: {}: {e}\n", path.display()),
            ));
        }
    };
    let offered =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let valid = offered.is_some_and(|offered| {
        // Every line is compared, in constant time each, so the answer's
        // timing tells nothing about which line or how much matched.
        tokens
            .lines()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .fold(false, |ok, t| ok | constant_time_eq(t.as_bytes(), offered.as_bytes()))
    });
    if valid {
        None
    } else {
        Some(text(StatusCode::UNAUTHORIZED, "unauthenticated: PUT /route needs authorization: Bearer <route token>\n"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Takes the route as YAML or JSON (JSON is YAML) from a caller holding the
/// route token: 200 when adopted or the same, 409 when stale or
/// conflicting, 400 when invalid, 401/403 without the credential (nothing
/// changes); the body says why.
async fn put_route(State(admin): State<Admin>, headers: HeaderMap, body: String) -> Response {
    if let Some(refusal) = refused(&admin, &headers) {
        admin.metrics.route_rejected_total.with_label_values(&["unauthenticated"]).inc();
        return refusal;
    }
    match admin.routes.offer_text(&body, "admin") {
        Ok(Accepted::Adopted { epoch, datacenter, killed, .. }) => {
            text(StatusCode::OK, format!("adopted: epoch {epoch}, {datacenter}; {killed} sessions closed\n"))
        }
        Ok(Accepted::Same) => text(StatusCode::OK, "same: the held route already says this\n"),
        Err(e @ Error::RouteInvalid(_)) => text(StatusCode::BAD_REQUEST, format!("{}: {e}\n", e.reason())),
        Err(e) => text(StatusCode::CONFLICT, format!("{}: {e}\n", e.reason())),
    }
}

async fn get_metrics(State(admin): State<Admin>) -> Response {
    match admin.metrics.render() {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn readyz(State(admin): State<Admin>) -> Response {
    match admin.routes.held() {
        Some(_) => text(StatusCode::OK, "ready\n"),
        None => text(StatusCode::SERVICE_UNAVAILABLE, "no route yet\n"),
    }
}

/// The admin routes; `PUT /route` checks its credential against the lines
/// of `route_token_file` (refused when None).
pub fn router(routes: Arc<Routes>, metrics: Arc<Metrics>, route_token_file: Option<PathBuf>) -> Router {
    Router::new()
        .route("/route", get(get_route).put(put_route))
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Admin { routes, metrics, route_token_file: route_token_file.map(Arc::new) })
}

/// Binds the admin endpoint; returns the bound address and the server,
/// which stops when `shutdown` resolves.
pub async fn bind(
    addr: SocketAddr,
    routes: Arc<Routes>,
    metrics: Arc<Metrics>,
    route_token_file: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, impl Future<Output = Result<(), Error>>), Error> {
    let bind_error = |source| Error::Bind { what: "admin", addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    let app = router(routes, metrics, route_token_file);
    Ok((local, async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(Error::Admin) }))
}
