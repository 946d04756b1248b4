# Omerta: the developer entry points. `make help` lists them.
CARGO ?= cargo
# rustup installs into ~/.cargo/bin: a toolchain that `make setup` has just installed is found
# by the rest of the same `make run` or `make test`, in the same shell.
export PATH := $(HOME)/.cargo/bin:$(PATH)
SHARED ?= $(CURDIR)/../shared
FUZZ_SECONDS ?= 30

.PHONY: help test lint fmt plan-check fuzz bench-micro bench-scenarios perf run run-small setup image

help:
	@echo "make run         a Debian cloud VM behind the engine, SSH through WireGuard, its escapes blocked (root)"
	@echo "make run-small   the same with the small test guest (boots in seconds)"
	@echo "make test        the whole test suite (unit, property, integration, real VMs)"
	@echo "make lint        rustfmt check + clippy with warnings denied"
	@echo "make plan-check  which test-plan cases still lack a Rust test (a count, not a failure)"
	@echo "make fuzz        build and run the cargo-fuzz targets for FUZZ_SECONDS each"
	@echo "make bench-micro per-frame cost of the allowlist check and the translation (ns)"
	@echo "make perf        the benchmarks: bench-micro and every scenario beside passt (LONG=1: longer)"
	@echo "make setup       install the system packages the build and tests need (Debian, root)"
	@echo "make image       build the Debian 12 cloud-style test image under target/cloud-image (root; cached)"

setup:
	@scripts/setup.sh

# Debian 12 with systemd, cloud-init, OpenSSH and WireGuard, from Debian's packages (a few
# minutes the first time, then cached until scripts/cloud-image.sh changes).
image: setup
	@scripts/cloud-image.sh

test: setup image
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace
	@$(MAKE) --no-print-directory plan-check

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

plan-check:
	@scripts/plan-check.sh "$(SHARED)/plan-cases.tsv"

fuzz: setup
	@FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh

bench-micro:
	$(CARGO) run --release -p omerta-perf --bin microbench

# The seed plan's performance scenarios beside passt (about 8 minutes with the zero-loss searches; LONG=1: the seed's
# durations, over an hour). Results in target/perf/; compare two runs with
# `cargo run --release -p omerta-perf -- compare A.json B.json`.
bench-scenarios: setup
	@command -v passt >/dev/null || { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends passt >/dev/null; } || echo "perf: passt is not installed; running without it"
	$(CARGO) build --release -p omerta-control --bin omerta-engine
	$(CARGO) run --release -p omerta-perf --bin omerta-perf -- $(if $(LONG),--long,)

perf: bench-micro bench-scenarios

run: setup image
	@scripts/demo.sh

# The small test guest (busybox, boots in seconds) behind the engine, over WireGuard.
run-small:
	@scripts/demo-small.sh
