# ShCR developer entry points. `make test` is the whole test suite, exactly what CI runs.
#
# Heavy builds are cached under ~/.cache/shcr, keyed by version, so a warm machine is fast:
#   ~/.cache/shcr/target/rust-<rustc version>/   the Cargo target dir for tests
#   ~/.cache/shcr/testenv/<tool>-<version>/      Kubernetes, etcd, helm, local-kms, OpenTofu, moto

SHELL := /bin/bash
RUSTC_VERSION := $(shell rustc --version 2>/dev/null | awk '{print $$2}')
export CARGO_TARGET_DIR ?= $(HOME)/.cache/shcr/target/rust-$(RUSTC_VERSION)
export CARGO_BUILD_JOBS ?= 2
export CARGO_TERM_COLOR ?= never

.PHONY: test testenv lint dev release

## test: build and start the test environment, then run every test of the workspace
test: testenv
	cargo test --workspace --no-fail-fast

## testenv: build (or find cached) every tool the tests start
testenv:
	cargo run --quiet -p shcr-testenv --bin shcr-testenv -- prepare

## lint: formatting and clippy as CI expects them
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## release: the optimised `shcr` binary, built exactly as the Dockerfile builds it
release:
	cargo build --release --locked --bin shcr

## dev: run the whole platform on this machine (embedded default)
dev:
	cargo run --release -- dev
