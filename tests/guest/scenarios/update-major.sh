# update-major: the update of update.sh across Debian suites, bookworm's 6.1 (A) to trixie's 6.12 (B),
# with the guest's CRIU (bookworm's 3.17.1) on both sides: the paper's "major releases" claim. Either
# B resumes memcached with every item, or kup falls back to A, which resumes it there, and the scenario
# reports exactly why B could not (the failed resume recorded in the update record).

. /bench/scenarios/update.sh

stage_b() {
    resume_verified "on B (without falling back)"
    pass "major update $(kver a) -> $(uname -r) resumed memcached: $out"
}

stage_a2() {
    resume_verified "on A after the fallback"
    why=$(kup status | sed -n 's/^  failed resume: //p' | head -n 1)
    pass "major update $(kver a) -> $(kver b) not possible with CRIU $(criu --version | sed -n 's/Version: //p'); kup fell back to $(uname -r) and memcached kept its items ($out). Why: $why"
}
