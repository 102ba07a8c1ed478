# Host side of fallback-kernel: the guest must be allowed to reset (B panics, panic=-1 resets).
NO_REBOOT=0
MAX_BOOTS=4
PANICS_EXPECTED=1 # kernel B's, on purpose (an upper bound in run; host_report requires exactly this one)

# B must really have panicked: exactly one panic, by kernel B (its "CPU: ... <release>" line), after kup
# switched to B and before A booted again, and the PASS line from that second boot of A.
host_report() {
    awk -v a="$VER_A" -v b="$VER_B" -v s="$SCENARIO" '
        index($0, "kup update: checkpoint ") && index($0, "switching to " b " now") { sw = NR }
        /Kernel panic - not syncing/ { panics++; pl = NR; cpu = 0; next }
        pl && NR <= pl + 3 && / CPU: [0-9]+ PID: / { cpu = index($0, " " b " ") > 0; who = $0 }
        index($0, "KUP: init stage=a kernel=" a " ") { boots++; if (boots == 2) again = NR }
        index($0, "GUEST: PASS " s " ") { passl = NR }
        END {
            if (!sw) { print "fallback-kernel: kup never switched to B (" b ")"; exit 1 }
            if (panics != 1) { printf "fallback-kernel: %d kernel panics, not exactly 1 (B'\''s)\n", panics; exit 1 }
            if (!cpu) { print "fallback-kernel: the panic was not kernel B'\''s (" b "): " (who == "" ? "no CPU line after it" : who); exit 1 }
            if (!(sw < pl && pl < again)) { print "fallback-kernel: the panic is not between the switch to B and the second boot of A"; exit 1 }
            if (!(passl > again)) { print "fallback-kernel: the PASS line is not from the boot of A after the reset"; exit 1 }
            print "fallback-kernel: kernel B (" b ") panicked after the switch (console line " pl "); A (" a ") booted again and resumed the apps"
        }' "$1"
}
