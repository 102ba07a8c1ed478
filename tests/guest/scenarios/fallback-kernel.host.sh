# Host side of fallback-kernel: the guest must be allowed to reset (B panics, panic=-1 resets).
NO_REBOOT=0
MAX_BOOTS=4
PANICS_EXPECTED=1 # kernel B's, on purpose
