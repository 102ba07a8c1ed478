# Host side of update-major: kernel B is the newest trixie cloud kernel unless --kernel-b names one.
if [[ -z $KB ]]; then
    # In a command substitution: private_apt_setup's probes of optional apt files must not trip set -e.
    KB=$(
        private_apt_setup >&2
        apt-cache "${PRIV_APT[@]}" search --names-only '^linux-image-6\.12\..*-cloud-amd64$' | awk '{print $1}' | sort -V | tail -n 1
    )
    [[ -n $KB ]] || die "no linux-image-6.12.*-cloud-amd64 in trixie"
fi

# The guest's PASS line must name B's release as the one the apps resumed on (a fallback to A fails
# in the guest; this catches a pass on the wrong kernel).
host_report() {
    grep -q "GUEST: PASS update-major .*: resumed on B ($VER_B)" "$1" && return 0
    echo "update-major: the PASS line does not say the apps resumed on B ($VER_B)"
    return 1
}
