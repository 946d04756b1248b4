# Omerta: the developer entry points. `make help` lists them.
CARGO ?= cargo
# rustup installs into ~/.cargo/bin: a toolchain that `make setup` has just installed is found
# by the rest of the same `make run` or `make test`, in the same shell.
export PATH := $(HOME)/.cargo/bin:$(PATH)
# The map from the seed test plan's cases to our tests (docs/test-plan.md explains it).
PLAN_CASES ?= docs/plan-cases.tsv
FUZZ_SECONDS ?= 30

.PHONY: help test lint fmt plan-check fuzz bench-micro bench-scenarios perf run run-small setup image provider-image man install deb bins programs

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
	@echo "make provider-image  the same with the package's dependencies, for the package test (target/provider-image)"
	@echo "make man         the man pages, from each binary's --help, under target/release/man"
	@echo "make deb         the Debian package target/debian/omerta_VERSION_amd64.deb (PROFILE=debug: the debug build)"
	@echo "make install     binaries, man pages, systemd units and an example config, on other systems (PREFIX=/usr/local, DESTDIR)"

setup:
	@scripts/setup.sh

# Debian 12 with systemd, cloud-init, OpenSSH and WireGuard, from Debian's packages (a few
# minutes the first time, then cached until scripts/cloud-image.sh changes).
image: setup
	@scripts/cloud-image.sh

# The cloud image plus the omerta package's dependencies, for tests/package.rs (cached).
provider-image: setup
	@scripts/cloud-image.sh provider

bins: setup
	$(CARGO) build --workspace --bins

# The images download and unpack while the build compiles.
test: setup
	@$(MAKE) --no-print-directory -j3 image provider-image bins
	$(CARGO) test --workspace
	@$(MAKE) --no-print-directory plan-check

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

plan-check:
	@scripts/plan-check.sh "$(PLAN_CASES)"

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

# Where `make install` puts things. PROFILE=debug installs the debug build (tests do).
PREFIX ?= /usr/local
DESTDIR ?=
PROFILE ?= release
BINS := omerta-engine omertactl omertad omerta
BUILT := target/$(PROFILE)
CARGO_PROFILE := $(if $(filter debug,$(PROFILE)),,--profile $(PROFILE))

# The four programs and omerta-man, in PROFILE's build.
programs:
	$(CARGO) build $(CARGO_PROFILE) -p omerta-control -p omerta-mesh -p omerta-tools --bins

# Man pages made from each binary's own --help (tools/src/bin/omerta-man.rs): they cannot
# say anything the program does not.
man: programs
	@mkdir -p $(BUILT)/man/man8
	@for b in $(BINS); do $(BUILT)/omerta-man $(BUILT)/$$b 8 > $(BUILT)/man/man8/$$b.8 || exit 1; done
	@echo "man pages in $(BUILT)/man/man8 (man -l $(BUILT)/man/man8/omerta-engine.8)"

# The Debian package (scripts/deb.sh; docs/operations.md): the build of PROFILE, its man pages,
# units, users and directories, checked by lintian. It makes the man pages itself.
deb: programs
	@PROFILE=$(PROFILE) scripts/deb.sh

# On systems other than Debian. The units' paths follow PREFIX. The example config is installed
# only where none exists.
install: man
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man8 $(DESTDIR)/etc/systemd/system $(DESTDIR)/etc/omerta
	for b in $(BINS); do install -m 0755 $(BUILT)/$$b $(DESTDIR)$(PREFIX)/bin/$$b || exit 1; done
	for b in $(BINS); do install -m 0644 $(BUILT)/man/man8/$$b.8 $(DESTDIR)$(PREFIX)/share/man/man8/$$b.8 || exit 1; done
	for u in packaging/systemd/*.service; do sed 's|/usr/bin/|$(PREFIX)/bin/|g' $$u > $(DESTDIR)/etc/systemd/system/$$(basename $$u) || exit 1; done
	[ -e $(DESTDIR)/etc/omerta/engine.toml ] || install -m 0644 packaging/engine.toml $(DESTDIR)/etc/omerta/engine.toml
	install -D -m 0644 packaging/sysctl.d/90-omerta.conf $(DESTDIR)/etc/sysctl.d/90-omerta.conf
	@echo "installed under $(DESTDIR)$(PREFIX); then: systemctl daemon-reload && systemctl enable --now omerta-engine"
