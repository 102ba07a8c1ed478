# checkpoint: kup checkpoint/restore of memcached through CRIU (3.17 in these guests) into rpramfs on
# /dev/pmem0. memcached holds MC_ITEMS items of 64 KiB (128 MiB) and serves memcslap while kup
# pre-dumps it (soft-dirty tracking works on Debian kernels) and then dumps it frozen; it is killed,
# restored lazily, and every item must read back with its value; memcslap then runs against it again;
# killed again and restored eagerly (kup writes the memory into the stopped tasks), every item again.
# (Stages run under set -e: commands whose failure is reported use `|| rc=$?`.)

. /bench/bench-lib.sh

MC_ITEMS=2048
MC_VALUE=65536
MC_ADDR=127.0.0.1:11211

stage_a() {
    need rpramfs kup mctool memcached memcslap criu
    rpramfs mkfs "$REGION" || fail "rpramfs mkfs $REGION failed"
    rp_mount
    mc_start 11211 512
    out=$(mctool load --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "loading memcached: $out"
    info "$out"
    mc=$(pidof memcached) || fail "memcached is not running"
    info "memcached pid $mc: $(grep -E 'VmRSS' /proc/$mc/status | tr -s ' \t' ' ')"

    # Load while kup works: memcslap's connections are part of what CRIU checkpoints. (memcslap
    # allocates all its requests up front, so short runs in a loop rather than one long one.)
    (while memcslap --servers=$MC_ADDR --concurrency=2 --execute-number=2000 --binary >>/tmp/slap1.log 2>&1; do sleep 1; done) &
    slap=$!
    sleep 3
    kill -0 $slap 2>/dev/null || fail "memcslap did not keep running: $(tail -n 3 /tmp/slap1.log)"

    rc=0
    kup checkpoint --pid "$mc" --store $MNT --iterations 2 >/tmp/ckpt.out 2>&1 || rc=$?
    sed 's/^/GUEST: INFO checkpoint: /' /tmp/ckpt.out
    [ $rc -eq 0 ] || fail "kup checkpoint exited $rc: $(tail -n 2 /tmp/ckpt.out)"
    grep -q 'pass 1/2 pre-dump' /tmp/ckpt.out || fail "no pre-dump pass (is soft-dirty tracking missing?)"
    kill $slap 2>/dev/null || true
    kill $(pidof memcslap) 2>/dev/null || true
    wait_gone memcached 10 || fail "memcached still runs after the final dump"

    kup inspect --verify $MNT >/tmp/inspect.out 2>&1 || { cat /tmp/inspect.out; fail "kup inspect --verify failed"; }
    sed 's/^/GUEST: INFO inspect: /' /tmp/inspect.out

    rc=0
    kup restore --store $MNT >/tmp/restore.out 2>&1 || rc=$?
    sed 's/^/GUEST: INFO restore: /' /tmp/restore.out
    [ $rc -eq 0 ] || fail "kup restore exited $rc: $(tail -n 2 /tmp/restore.out)"
    pidof memcached >/dev/null || fail "memcached is not running after kup restore"

    out=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "after restore: $out"
    info "$out"
    memcslap --servers=$MC_ADDR --concurrency=2 --execute-number=500 --binary >/tmp/slap2.log 2>&1 ||
        fail "memcslap against the restored memcached failed: $(tail -n 3 /tmp/slap2.log)"
    grep -q 'Time total' /tmp/slap2.log || fail "memcslap printed no result: $(tail -n 3 /tmp/slap2.log)"
    frozen=$(sed -n 's/.*: frozen \([0-9.]*\) ms (downtime.*/\1/p' /tmp/ckpt.out)
    running=$(sed -n 's/.*running again after \([0-9.]*\) ms.*/\1/p' /tmp/restore.out)
    fetched=$(sed -n 's/.*all memory fetched after \([0-9.]*\) ms.*/\1/p' /tmp/restore.out)

    # The same checkpoint eagerly: CRIU restores memcached's threads stopped, kup writes their
    # memory into them and lets them run; every item reads back again.
    kill $(pidof memcached)
    wait_gone memcached 10 || fail "the lazily restored memcached did not stop"
    rc=0
    kup --json restore --store $MNT --eager >/tmp/eager.json 2>/tmp/eager.err || rc=$?
    [ $rc -eq 0 ] || { cat /tmp/eager.json; sed 's/^/GUEST: INFO eager restore: /' /tmp/eager.err; fail "kup restore --eager exited $rc: $(tail -n 1 /tmp/eager.err)"; }
    eager=$(jget /tmp/eager.json apps.0.running_ms)
    info "eager restore: running again after $eager ms, $(jget /tmp/eager.json apps.0.pages_eager) pages eager, written into the stopped tasks in $(jget /tmp/eager.json apps.0.fill_ms) ms"
    [ "$(jget /tmp/eager.json mode)" = eager ] || fail "kup restore --eager restored $(jget /tmp/eager.json mode)"
    out2=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "after the eager restore: $out2"
    info "after the eager restore: $out2"
    figure frozen_ms "$frozen"
    figure running_again_ms "$running"
    figure fetched_ms "$fetched"
    figure eager_running_ms "$eager"
    pass "$out; frozen_ms=$frozen running_again_ms=$running fetched_ms=$fetched eager_running_ms=$eager on $(uname -r)"
}
