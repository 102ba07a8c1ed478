# switch-time: kexec against a full guest reset through the firmware, in the same run (the paper's
# Table 3 comparison). Each round: kexec A -> B, kexec B -> A, then `reboot -f` on A: QEMU (started
# without -no-reboot) resets the machine, SeaBIOS runs and boots QEMU's -kernel (A) again. The host
# timestamps the console lines and computes the times (switch-time.host.sh). Rounds: kup.rounds=N.
#
# The round counter lives in a note in the last 4 KiB of /dev/pmem0, which survives both kexec and the
# warm reset (QEMU keeps guest RAM across a reset); a fresh QEMU starts with a zeroed region.

stage_a() {
    rounds=$(cmdline_arg kup.rounds || echo 1)
    done_rounds=$(note_read)
    case $done_rounds in '') done_rounds=0 ;; esac
    if [ "$done_rounds" -ge "$rounds" ]; then
        note_clear
        pass "$rounds round(s) of kexec A->B, kexec B->A, firmware reset ->A ($(kver a), $(kver b))"
        finish
    fi
    info "round $((done_rounds + 1)) of $rounds"
    kexec_to b b
}

stage_b() {
    kexec_to a a2
}

stage_a2() {
    done_rounds=$(note_read)
    note_write $((${done_rounds:-0} + 1))
    [ "$(note_read)" = $((${done_rounds:-0} + 1)) ] || fail "cannot write the round note to /dev/pmem0"
    mark "reset-now from=$(uname -r)"
    reboot -f
    sleep 30
    fail "reboot -f did not reset the machine"
}
