# syntax=docker/dockerfile:1
#
# The one Aegis Webhooks image: the `aegis-webhook` binary on Debian slim, run as
# uid 10001. Every role is a subcommand:
#
#   docker build -t aegis-webhook .
#   docker run --rm aegis-webhook migrate | api | ingester | worker
#
# Stages: `chef` (toolchain + cargo-chef), `planner` (reduces the workspace to a
# recipe of manifests and the lock file), `builder` (compiles the dependencies
# from the recipe alone, so that layer is reused until Cargo.toml/Cargo.lock
# change, then the workspace), `runtime`. cargo-chef finds workspace members by
# itself, so adding a crate needs no change here.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
ARG CARGO_CHEF_VERSION=0.1.77
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The dependency layer: the same package, profile and lock as the build below,
# or cargo would compile the dependencies again.
RUN cargo chef cook --release --locked -p aegis-webhook --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p aegis-webhook \
    && install -D -m 0755 target/release/aegis-webhook /out/aegis-webhook

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: webhook targets are public https endpoints (the TLS roots of
# the system are used); nothing else is installed. Unpinned on purpose: the
# root certificates should follow the Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 aegis \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/aegis --shell /usr/sbin/nologin aegis \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/aegis
COPY --from=builder /out/aegis-webhook /usr/local/bin/aegis-webhook

# Every process serves GET /healthz, /readyz and /metrics on AEGIS_LISTEN (the
# api also GraphQL and POST /v1/events). AEGIS_DATA_DIR only matters for `dev`
# (SQLite file and generated credentials); it is writable by the user below.
ENV AEGIS_LISTEN=0.0.0.0:8080 \
    AEGIS_DATA_DIR=/var/lib/aegis
EXPOSE 8080
WORKDIR /var/lib/aegis
# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001

LABEL org.opencontainers.image.title="aegis-webhook" \
      org.opencontainers.image.description="Aegis Webhooks: signed, retried webhook delivery for security events" \
      org.opencontainers.image.licenses="Apache-2.0"

# SIGTERM (the default stop signal) drains: see AEGIS_SHUTDOWN_GRACE.
ENTRYPOINT ["aegis-webhook"]
# No default role: say which one (`api`, `ingester`, `worker`, `migrate`, `dev`).
CMD ["--help"]
