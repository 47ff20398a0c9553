# syntax=docker/dockerfile:1
# crier container image: a release build of the `crier` binary on debian:bookworm-slim,
# running as an unprivileged user. Build from the repository root:
#   docker build -t crier .
# Configure with CRIER_* environment variables (docs/configuration.md).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p crier \
 && install -m 0755 target/release/crier /usr/local/bin/crier

FROM debian:bookworm-slim
# curl runs the HEALTHCHECK; ca-certificates lets crier verify rediss:// servers.
# Versions are not pinned: the slim base is rebuilt with Debian's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 crier \
 && useradd --system --uid 10001 --gid crier --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin crier
COPY --from=build /usr/local/bin/crier /usr/local/bin/crier
USER 10001:10001
ENV CRIER_LISTEN=0.0.0.0:8080
EXPOSE 8080
# SIGTERM drains: /readyz turns 503, clients are closed with 1012 over shutdown_drain (10s by
# default), then crier exits 0. Give the container a stop timeout longer than shutdown_drain
# (docker stop -t 30, compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# /healthz answers 200 while the process runs. The port must match CRIER_LISTEN.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["/usr/local/bin/crier"]
