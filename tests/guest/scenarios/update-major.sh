# update-major: the update of update.sh across Debian suites, bookworm's 6.1 (A) to trixie's 6.12 (B),
# with the guest's CRIU (bookworm's 3.17.1) on both sides: the paper's "major releases" claim. B must
# resume memcached with every item: the update record must say it resumed on B's release. A fallback to
# A is a failed update; the scenario then fails, saying why B could not (the failed resume recorded in
# the update record), after checking that A at least kept memcached's items.

. /bench/scenarios/update.sh

stage_b() {
    resume_verified "on B (without falling back)"
    resumed_on_b
    pass "major update $(kver a) -> $(kver b): resumed on B ($(resumed_release)), memcached kept every item: $out"
}

stage_a2() {
    rc=0
    kup resume || rc=$?
    kept=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || true
    kup status | sed 's/^/GUEST: INFO status: /'
    why=$(kup status | sed -n 's/^  failed resume: //p' | head -n 1)
    fail "major update $(kver a) -> $(kver b) did not resume on B with CRIU $(criu --version | sed -n 's/Version: //p'): kup fell back to $(uname -r) (resume there exited $rc; $kept). Why: ${why:-not recorded}"
}
