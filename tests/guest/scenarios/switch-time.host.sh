# Host side of switch-time (sourced by tests/guest/run).
ROUNDS=${KUP_SWITCH_ROUNDS:-3}
NO_REBOOT=0                            # let `reboot -f` reset the guest through the firmware
MAX_BOOTS=$((3 * ROUNDS + 1))          # a reset or panic loop stops here
SCENARIO_APPEND="kup.rounds=$ROUNDS"
# Boot QEMU's -kernel with the same uncompressed archive that kexec loads, so that the two paths
# differ only in how they get to the new kernel.
COMPRESS=${KUP_GUEST_COMPRESS:-none}

host_report() {
    local log=$1 kind secs stage up kexec=() reset=() kpre=() rpre=()
    while read -r kind secs stage up; do
        if ! [[ $secs =~ ^[0-9]+(\.[0-9]+)?$ && $up =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
            echo "switch-time: a $kind switch to stage $stage without a time or uptime (secs='$secs' uptime='$up')"
            return 1
        fi
        case $kind in
            kexec) kexec+=("$secs") kpre+=("$(awk -v a="$secs" -v b="$up" 'BEGIN { printf "%.3f", a - b }')") ;;
            reset) reset+=("$secs") rpre+=("$(awk -v a="$secs" -v b="$up" 'BEGIN { printf "%.3f", a - b }')") ;;
        esac
    done < <(switch_times "$log")
    if ((${#kexec[@]} != 2 * ROUNDS || ${#reset[@]} != ROUNDS)); then
        echo "switch-time: expected $((2 * ROUNDS)) kexec and $ROUNDS reset switches, saw ${#kexec[@]} and ${#reset[@]}"
        return 1
    fi
    # Medians: one slow sample (the host's other core busy) moves a mean a lot under emulation.
    awk -v k="${kexec[*]}" -v r="${reset[*]}" -v kp="${kpre[*]}" -v rp="${rpre[*]}" '
        function median(s,   a, n, i, j, t) {
            n = split(s, a, " ")
            for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        BEGIN {
            mk = median(k); mr = median(r)
            printf "switch-time: kexec (kexec -e -> new /init): %s s; median %.3f s, of which %.3f s before the new kernel'\''s clock starts\n", k, mk, median(kp)
            printf "switch-time: reset (reboot -f -> firmware -> /init): %s s; median %.3f s, of which %.3f s before the new kernel'\''s clock starts\n", r, mr, median(rp)
            printf "switch-time: reset / kexec = %.2f (medians; above 1: kexec is faster)\n", mr / mk
        }'
}
