# guestcred: the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test demo deps build fmt-check clippy crds lint unit bench help controlplane

help:
	@echo "make demo   - install deps, bring up the lab (real kube-apiserver + etcd + controller manager with the chart, libvirtd, tiny VMs, shims, controller), apply examples, show status; DEMO_CONTROL_PLANE=emulator for the emulator"
	@echo "make test   - install deps, then fmt check, clippy -D warnings, and every test (real guests included)"
	@echo "make crds   - regenerate crds/ from the Rust types"
	@echo "make controlplane - build the real kube-apiserver + etcd + kube-controller-manager (lab/controlplane, cached)"

deps:
	@if [ "$$(id -u)" = 0 ]; then bash scripts/install-deps.sh; else sudo bash scripts/install-deps.sh; fi

build: deps
	$(CARGO) build --workspace --bins

fmt-check:
	$(CARGO) fmt --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

crds:
	$(CARGO) run -q -p guestcred --bin guestcred -- crdgen --out crds
	cp crds/*.yaml charts/guestcred/crds/

# Tests run with `cargo test` (not nextest) on purpose: the lab fixture boots its guests
# once per test binary and shares them between the tests of that binary.
# The real control plane (lab/controlplane, Go) is built first, cached by a stamp: a cold
# build takes ~8 min on 2 busy cores, a warm one 0.05 s. tests/real_control_plane.rs runs
# the operator on it and FAILS (never skips) when it cannot be built or started.
# The workspace's binaries are built first: tests run other packages' programs
# (guestcred-lab, kubectl-guestcred) from target/debug, and `cargo test` builds bin targets
# only as test harnesses.
# REAL_SUITES run a second time on the real control plane (GUESTCRED_CONTROL_PLANE=real):
# each binary's shared World starts one kube-apiserver + etcd + kube-controller-manager
# (~4 s) for all its tests. The bad-input cases (where the API server refuses an object up
# front, its message is the expected outcome), the examples ending Ready, and optimistic
# concurrency without injected faults. Adds about a minute (bad_input 31 s, examples_ready
# 11 s, conflicts 9 s measured). The e2e lab, Helm and leader election already run on the
# real control plane in tests/real_control_plane.rs. fleet_scale: a 5,000-target run
# against real etcd's request limits (~90 s on the real server). Both passes always run;
# either one failing fails `make test`.
REAL_SUITES := bad_input examples_ready conflicts fleet_scale
test: deps fmt-check clippy controlplane
	$(CARGO) build --workspace --bins
	@rc=0; \
	$(CARGO) test --workspace --all-targets --no-fail-fast -- --test-threads=4 || rc=1; \
	t0=$$(date +%s); \
	GUESTCRED_CONTROL_PLANE=real $(CARGO) test -p guestcred $(addprefix --test ,$(REAL_SUITES)) \
	  --no-fail-fast -- --test-threads=4 || rc=1; \
	echo "make test: $(REAL_SUITES) on the real control plane took $$(( $$(date +%s) - t0 )) s"; \
	exit $$rc

controlplane: deps
	@t0=$$(date +%s%N) && bash scripts/build-controlplane.sh >/dev/null && \
	  echo "control plane build (scripts/build-controlplane.sh): $$(( ($$(date +%s%N) - t0) / 1000000 )) ms"

demo: build
	bash scripts/demo.sh

# Benchmarks P1-P6 (docs/benchmarks.md): release build, then bench/results.md and
# bench/results.json. Needs root (private libvirtd, qemu-ga namespaces); P6 runs on the
# emulator and on the real control plane (built by `controlplane`, cached), 1,000 to
# 100,000 VMIs on each; about 35 minutes.
bench: deps controlplane
	$(CARGO) build --release -p guestcred --bins
	$(CARGO) build --release -p guestcred-bench
	target/release/guestcred-bench --out bench

# Soak (docs/bad-input.md): rounds of bulk runs under shim/controller kills, 409s and 410s.
# GUESTCRED_SOAK_ROUNDS / GUESTCRED_SOAK_VMS scale it.
.PHONY: soak
# FAULT_SEEDS: how many seeds of the randomized fault run (tests/fault_random.rs; make test
# runs seeds 1-5).
FAULT_SEEDS ?= 50
soak: deps
	$(CARGO) test -p guestcred --test soak -- --ignored --nocapture
	GUESTCRED_FAULT_SEEDS=$$(seq -s, 1 $(FAULT_SEEDS)) $(CARGO) test -p guestcred --test fault_random -- --nocapture

# Fuzzing (fuzz/README.md): each cargo-fuzz target for FUZZ_SECONDS (default 60), on the
# nightly toolchain cargo-fuzz needs. New corpus entries go to fuzz/target-corpus/, not
# the committed seeds; crashes stop the run and land in fuzz/artifacts/. `make test` only
# replays the committed corpus (api/tests/fuzz_corpus.rs, lab/tests/fuzz_corpus.rs).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := shim_request authorized_keys crypt selectors
.PHONY: fuzz
fuzz: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p target-corpus/$$t && \
		cargo +nightly fuzz run $$t target-corpus/$$t corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -max_len=16384 -timeout=10 || exit 1; \
	done
