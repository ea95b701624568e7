# One image for every thumbup binary (see the operator spec): the chart and
# the operator pick the program with the container command, e.g.
#   thumbup-service serve --listen 0.0.0.0:50051 ...
#   thumbup-operator run ...
#   thumbup-job --tenant demo ...
#   thumbup-db-proxy --route-config-map thumbup/thumbup-route ...
#
#   docker build -t thumbup/thumbup:dev .
#
# The RUN --mount cache lines need BuildKit (the default builder since Docker 23).

# ---------------------------------------------------------------- builder
FROM rust:1-bookworm AS builder

# protoc: service/build.rs compiles proto/ with tonic-prost-build. (The
# kube client's TLS uses ring, which needs only the C compiler the image has.)
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The commit that the thumbup_build_info metric reports (none without it):
#   docker build --build-arg THUMBUP_GIT_SHA="$(git rev-parse HEAD)" .
ARG THUMBUP_GIT_SHA=

# The registry and target caches make rebuilds incremental; the binaries are
# copied out of the cached target dir within the same step, since a cache
# mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && for bin in thumbup-service thumbup-job thumbup-operator thumbup-db-proxy thumbupctl crdgen; do \
      install -m 0755 "target/release/$bin" /out/ || exit 1; \
    done

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim

# ca-certificates: for TLS to the Kubernetes API and to managed databases.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 thumbup \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin thumbup

COPY --from=builder /out/ /usr/local/bin/

# Numeric, so that runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001

# gRPC, service admin, job admin, operator admin, db-proxy admin (the
# db-proxy's DB listener stays on the pod's loopback).
EXPOSE 50051 9190 9191 9192 9193

# The chart and the operator always set the command; a bare `docker run`
# shows the service's usage.
CMD ["thumbup-service", "--help"]
