# The two commands of the README: `make demo` (the main job) and `make test` (everything).
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo

.PHONY: demo demo-rpramfs test test-host test-deb test-guest deb msrv lint-kmod build setup install bench bench-foam bench-ppp clean

setup:
	@scripts/setup-host.sh

# memsubject (tests/subjects) lands next to the Rust binaries, so guest initramfs builds pick it up.
# kup-faults: kup with test-only fault injection (kup-cli feature fault-injection) for the guest bench
# and the host tests; built first so that the release kup is the last one cargo puts in place.
build: setup
	$(CARGO) build --release -p kup-cli --features fault-injection
	cp target/release/kup target/release/kup-faults
	$(CARGO) build --release --workspace
	gcc -O2 -Wall -Wextra -o target/release/memsubject tests/subjects/memsubject.c

# The main job: the memcached kernel update in the QEMU guest (one PASS/FAIL line at the end).
demo: build
	tests/demo.sh

# rpramfs alone surviving a kill -9 of its daemon (no guest).
demo-rpramfs: build
	tests/demo-rpramfs.sh

test: test-host test-deb test-guest

# kup's host tests run the real CRIU: trixie's 4.1.1 with its own loader (docs/criu-host.md), installed
# on first use into /opt/kup/criu.
# The crash-state replay, the fault tests and the scattered-pages timings run on their own with
# their output shown: the crash-state count, what each fault left of the apps and the scattered
# against contiguous ratios are part of what `make test` reports (and the timings are not skewed
# by other tests running beside them).
SHOWN_TESTS := every_store_prefix_is_a_consistent_state one_failed_final_dump_leaves_every_app_running faults_mid_dump_leave_every_app_running \
	scattered_pages_cost_about_what_contiguous_ones_do a_scattered_dump_freezes_about_as_long_as_a_contiguous_one
test-host: build msrv lint-kmod
	KUP_CRIU=$$(scripts/criu-host/install.sh) $(CARGO) test --release --workspace -- --test-threads=2 $(addprefix --skip ,$(SHOWN_TESTS))
	$(CARGO) test --release -p rpramfs --test crash_states -- --nocapture
	KUP_CRIU=$$(scripts/criu-host/install.sh) $(CARGO) test --release -p kup-cli --test host_criu -- --test-threads=1 --nocapture --exact $(wordlist 2,5,$(SHOWN_TESTS))

# The kernel module in the kernel's coding style (checkpatch.pl), built with W=1 -Werror against the
# guest bench's kernels (6.1 and 6.12).
lint-kmod:
	scripts/kmod/check.sh

# The workspace's rust-version (Cargo.toml) is checked: clippy's incompatible_msrv lint fails on any std
# item stabilized after it. Only one toolchain is needed (no build with the old one).
msrv:
	$(CARGO) clippy --release --workspace --all-targets -- -D clippy::incompatible_msrv

# Real kexec between two Debian kernels over a memmap= pmem region, in a QEMU guest (docs/guest-bench.md).
test-guest: build
	tests/guest/run persist
	tests/guest/run crash-kexec
	tests/guest/run cold
	tests/guest/run checkpoint
	tests/guest/run converge
	tests/guest/run foam-bench-mc
	tests/guest/run update
	tests/guest/run update-multi
	tests/guest/run update-refuse
	tests/guest/run update-major
	tests/guest/run fallback-app
	tests/guest/run fallback-kernel
	tests/guest/run update-switch-fails
	tests/guest/run fallback-fails
	tests/guest/run ppp
	tests/guest/run ppp-refuse
	tests/guest/run ppp-fallback-app
	tests/guest/run ppp-fallback-kernel
	tests/guest/run ppp-switch-fails
	tests/guest/run ppp-major

bench: build
	$(CARGO) run --release -p rpramfs --example bench

# FOAM checkpoints against plain CRIU, lazy against eager restore, in a QEMU guest (docs/benchmarks.md);
# 10-25 minutes under TCG. KUP_BENCH_SIZES="64 128" KUP_BENCH_DIRTY="10" for a quick run. Then
# memcached with 70000 small items under a set load (foam-bench-mc; make test runs it with 20000).
bench-foam: build
	tests/guest/run foam-bench
	KUP_BENCH_MC_SMALL_ITEMS=70000 KUP_BENCH_SAMPLES=$${KUP_BENCH_SAMPLES:-3} tests/guest/run foam-bench-mc

# PPP against plain CRIU and FOAM 1/2-pass, frozen time and outage against the working set (the
# paper's Fig. 7), one real kexec per working set; then memcached's downtime per technique (Fig. 4)
# and 1, 2 and 4 instances updated together (Fig. 8), a kexec per PPP update; in a QEMU guest,
# plots into docs/plots (docs/ppp.md). KUP_BENCH_SIZES="256 512" KUP_BENCH_MC_ITEMS=1024 for a
# quick run.
bench-ppp: build
	tests/guest/run ppp-bench
	tests/guest/run ppp-bench-mc

# The Debian package: target/debian/kup_<version>_amd64.deb (scripts/deb/build.sh; docs/packaging.md).
deb: build
	scripts/deb/build.sh

# The package installed, upgraded and purged on this machine, lintian clean of errors.
test-deb: build
	tests/deb/check.sh

install: build
	install -m 0755 target/release/rpramfs /usr/local/sbin/rpramfs
	ln -sf /usr/local/sbin/rpramfs /sbin/mount.fuse.rpramfs
	install -m 0755 target/release/kup /usr/local/sbin/kup
	install -m 0755 target/release/kup-criu-hook /usr/local/sbin/kup-criu-hook
	install -m 0644 dist/kup-resume.service /etc/systemd/system/kup-resume.service

clean:
	$(CARGO) clean
