# syntax=docker/dockerfile:1.7
# The one ShCR image: the `shcr` binary runs every component (operator, gateway, store), chosen
# by its first argument, e.g. `docker run ghcr.io/shcr-dev/shcr:0.1.0 operator --help`.
#
# Invariants (checked by tests/charts.rs):
# - built with the pinned toolchain (RUST_VERSION, the toolchain the test suite runs) and the
#   exact `cargo build` of `make release`, with --locked: Cargo.lock decides every dependency;
# - runs as a non-root user (65532, the charts' runAsUser) on a distroless base (no shell, no
#   package manager) and writes nothing outside /tmp, so a read-only root filesystem works.
#
# Build: docker build -t ghcr.io/shcr-dev/shcr:0.1.0 .
# Pin the base images by digest in your registry mirror or CI (e.g. Renovate) for reproducible
# builds; the tags below name the versions.

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
# aws-lc-sys (the TLS and AEAD crypto) compiles C: a C toolchain and cmake.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake clang pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin shcr \
    && install -D -m 0755 target/release/shcr /out/shcr

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="shcr" \
      org.opencontainers.image.description="ShCR: operator, gateway and FHIR record store of an open shared care record platform" \
      org.opencontainers.image.source="https://github.com/shcr-dev/shcr" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/shcr /usr/local/bin/shcr
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/shcr"]
CMD ["--help"]
