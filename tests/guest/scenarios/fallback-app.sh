# fallback-app: the update of update.sh, with a fault injected into the resume on B (the health check
# fails: KUP_TEST_FAULT=health-check in kup-faults, the test-only build). kup must fall back: kexec into A, where
# `kup resume` restores the same checkpoint; every item must be there.

. /bench/scenarios/update.sh

stage_b() {
    rc=0
    KUP_TEST_FAULT=health-check kup-faults resume || rc=$?
    fail "kup resume did not fall back to A (exit $rc)"
}

stage_a2() {
    [ "$(uname -r)" = "$(kver a)" ] || fail "fell back to $(uname -r), not A"
    resume_verified "on A after the fallback"
    kup status | grep -q 'state: resumed-on-old' || fail "the update record does not say resumed-on-old"
    kup status | grep -q fallback || fail "the timeline has no fallback"
    pass "fell back to $(uname -r) after a failed health check on $(kver b): $out"
}
