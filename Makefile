# Omerta: the developer entry points. `make help` lists them.
CARGO ?= cargo
SHARED ?= $(CURDIR)/../shared
FUZZ_SECONDS ?= 30

.PHONY: help test lint fmt plan-check fuzz bench-micro bench-throughput perf run setup

help:
	@echo "make run         a real guest behind the engine reaching its consumer over WireGuard (root)"
	@echo "make test        the whole test suite (unit, property, integration, real VMs)"
	@echo "make lint        rustfmt check + clippy with warnings denied"
	@echo "make plan-check  which test-plan cases still lack a Rust test (a count, not a failure)"
	@echo "make fuzz        build and run the cargo-fuzz targets for FUZZ_SECONDS each"
	@echo "make bench-micro per-frame cost of the allowlist check and the translation (ns)"
	@echo "make perf        the benchmarks: bench-micro and bench-throughput (LONG=1: longer)"
	@echo "make setup       install the system packages the build and tests need (Debian, root)"

setup:
	@scripts/setup.sh

test: setup
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

# The data-plane smoke: VM->host throughput through one worker, both backends, GSO off/on.
# LONG=1 runs longer rounds.
PERF_SECONDS := $(if $(LONG),10,2)
PERF_ROUNDS := $(if $(LONG),5,3)
bench-throughput:
	$(CARGO) run --release -p omerta-perf --bin throughput -- --seconds $(PERF_SECONDS) --rounds $(PERF_ROUNDS)

perf: bench-micro bench-throughput

run:
	@scripts/demo.sh
