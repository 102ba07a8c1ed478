# Host side of update-major: kernel B is the newest trixie cloud kernel unless --kernel-b names one.
if [[ -z $KB ]]; then
    # In a command substitution: private_apt_setup's probes of optional apt files must not trip set -e.
    KB=$(
        private_apt_setup >&2
        apt-cache "${PRIV_APT[@]}" search --names-only '^linux-image-6\.12\..*-cloud-amd64$' | awk '{print $1}' | sort -V | tail -n 1
    )
    [[ -n $KB ]] || die "no linux-image-6.12.*-cloud-amd64 in trixie"
fi
