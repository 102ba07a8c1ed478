# ppp-fallback-app: ppp's update, with a health check that fails on B after it has changed
# memcached's memory there (it reads every item, which updates their LRU state in place, and adds
# items of another seed). kup falls back by kexec into A, where `kup resume` puts the same pages in
# place again: they must be as they were at checkpoint (each page's CRC is checked), because on B the
# module mapped them read-only and shared, so that memcached's writes went to copies. Every item of
# the checkpoint must read back on A, and none of those added on B.

. /bench/scenarios/ppp.sh

# kup resume's health check: on B it changes memcached's memory, then reports unhealthy; on A it passes.
PPP_HEALTH_CHECK="[ \"\$(uname -r)\" = $(kver b) ] || exit 0; mctool verify --addr $MC_ADDR --items $PPP_ITEMS --value-size $MC_VALUE >/dev/null; mctool load --addr $MC_ADDR --items 256 --value-size $MC_VALUE --seed 7 >/dev/null; exit 1"

stage_b() {
    rc=0
    kup resume || rc=$?
    fail "kup resume did not fall back to A (exit $rc)"
}

stage_a2() {
    [ "$(uname -r)" = "$(kver a)" ] || fail "fell back to $(uname -r), not A"
    rc=0
    kup resume || rc=$?
    [ $rc -eq 0 ] || fail "kup resume on A after the fallback exited $rc"
    kup status | sed 's/^/GUEST: INFO status: /'
    kup status | grep -q 'state: resumed-on-old' || fail "the update record does not say resumed-on-old"
    kup status | grep -q ' fallback ' || fail "the timeline has no fallback"
    ppp_keys_back "after the fallback"
    added=$(mctool verify --addr $MC_ADDR --items 256 --value-size $MC_VALUE --seed 7 | sed -n 's/.*keys=\([0-9]*\)\/.*/\1/p')
    figure added_on_b "$added"
    [ "$added" = 0 ] || fail "$added items written on B are in memcached after the fallback"
    ppp_in_place "after the fallback"
    pass "fell back to $(uname -r) after a failed health check on $(kver b): keys=$keys added_on_b=$added in_place=$in_place"
}
