//! The admin HTTP endpoint: the route (`GET`/`PUT /route`), `/metrics`,
//! `/healthz` and `/readyz` (ready once a route is held).
//!
//! `thumbup_core::admin` serves the other binaries' fixed set of paths from
//! the default registry; the proxy needs the route paths and its own
//! registry, so it has its own router.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
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

/// Takes the route as YAML or JSON (JSON is YAML): 200 when adopted or the
/// same, 409 when stale or conflicting, 400 when invalid; the body says why.
async fn put_route(State(admin): State<Admin>, body: String) -> Response {
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

/// The admin routes.
pub fn router(routes: Arc<Routes>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/route", get(get_route).put(put_route))
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Admin { routes, metrics })
}

/// Binds the admin endpoint; returns the bound address and the server,
/// which stops when `shutdown` resolves.
pub async fn bind(
    addr: SocketAddr,
    routes: Arc<Routes>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, impl Future<Output = Result<(), Error>>), Error> {
    let bind_error = |source| Error::Bind { what: "admin", addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    let app = router(routes, metrics);
    Ok((local, async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(Error::Admin) }))
}
