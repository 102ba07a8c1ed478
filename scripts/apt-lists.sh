# Sourced by the scripts that pick "the newest published" Debian package (kernels, headers):
# apt_lists_fresh runs `apt-get update` unless kup's own scripts did so within the last day
# (KUP_APT_MAX_AGE_MIN, default 1440), so the choice is today's and not that of the day the
# machine's image was made, whose packages the mirror may no longer carry. The stamp is kup's
# own (apt's list files keep the archive's dates, not the time of the update).
apt_lists_fresh() {
    local stamp=${KUP_APT_STAMP:-/var/cache/kup/apt-lists-updated} age=${KUP_APT_MAX_AGE_MIN:-1440}
    if [[ -e $stamp && -z $(find "$stamp" -mmin +"$age" 2>/dev/null) ]]; then
        return 0
    fi
    [[ $EUID -eq 0 ]] || { echo "apt: the package lists may be stale; run apt-get update as root" >&2; return 0; }
    echo "apt: apt-get update (the lists were not refreshed by kup within $age minutes)" >&2
    apt-get update -qq || { echo "apt: error: apt-get update failed" >&2; return 1; }
    mkdir -p "$(dirname "$stamp")" && touch "$stamp"
}
