# Host side of ppp-major: ppp's guest with an arena; kernel B is the newest 6.12 cloud kernel of the
# host's own Debian (bookworm carries 6.12 next to 6.1, built with its gcc-12, so ppp.ko builds here
# against its headers package) unless --kernel-b names one.
. "$GUEST_DIR/scenarios/ppp.host.sh"
if [[ -z $KB ]]; then
    apt_lists_fresh || die "the apt lists could not be refreshed"
    KB=$(apt-cache search --names-only '^linux-image-6\.12\..*-cloud-amd64$' | awk '{print $1}' | sort -V | tail -n 1)
    [[ -n $KB ]] || die "no linux-image-6.12.*-cloud-amd64 in the apt sources"
fi

# The guest's PASS line must name both updates (a fallback fails in the guest).
host_report() {
    grep -q "GUEST: PASS ppp-major .*kernel=$VER_A->$VER_B->$VER_A" "$1" && return 0
    echo "ppp-major: the PASS line does not name the updates $VER_A -> $VER_B -> $VER_A"
    return 1
}
