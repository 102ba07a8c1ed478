# Host side of the kup guest bench: packages, kernels, initramfs, QEMU.
# Sourced by tests/guest/run (bash). Nothing here touches the system's apt configuration: other Debian
# suites are reached through a private sources.list and lists directory under the cache.

shopt -s extglob inherit_errexit
GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$GUEST_DIR/../.." && pwd)
CACHE=${KUP_GUEST_CACHE:-/var/cache/kup-guest}
. "$REPO_DIR/scripts/apt-lists.sh"

# Modules each kernel's tree in the initramfs carries (their dependencies are added from modules.dep).
# pmem from memmap=, FUSE for rpramfs, and what CRIU 3.17 needs for `criu check` (NOTES.md).
GUEST_MODULES=(libnvdimm nd_btt nd_pmem nd_e820 dax_pmem device_dax fuse
    nf_tables netlink_diag unix_diag inet_diag tcp_diag udp_diag af_packet_diag)
# System binaries copied in with their libraries (all but kexec are optional: skipped with a note).
GUEST_BINS=(kexec ndctl criu memcached memcslap memcaslap memcstat)

note() { printf 'guest-bench: %s\n' "$*" >&2; }
die() { printf 'guest-bench: error: %s\n' "$*" >&2; exit 2; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; } # seconds since $EPOCHREALTIME $1

# --- host packages -----------------------------------------------------------------------------------

ensure_host_tools() {
    local pkgs=(qemu-system-x86 busybox-static kexec-tools cpio kmod lz4 criu memcached libmemcached-tools ndctl)
    local missing=() p
    for p in "${pkgs[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == 'install ok installed' ]] || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    note "installing ${missing[*]}"
    [[ $EUID -eq 0 ]] || die "need root to apt-get install ${missing[*]}"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

# --- apt: the system's sources, or a private configuration for other suites -------------------------

# The mirror URI the system's apt sources already name for the main archive (main) or the security
# archive (security), from deb822 .sources files or one-line sources.list entries.
system_mirror() {
    local uri
    # Some of these files do not exist on a given system; that is no error (set -e, pipefail).
    uri=$({ cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
        awk -v sec="$([[ $1 == security ]] && echo 1 || echo 0)" '
            /^URIs:/ { for (i = 2; i <= NF; i++) pick($i) }
            /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { pick($i); break } }
            function pick(u) { if (found == "" && u ~ /debian/ && (u ~ /security/) == sec) found = u }
            END { print found }')
    if [[ -z $uri ]]; then
        [[ $1 == security ]] && uri=http://deb.debian.org/debian-security || uri=http://deb.debian.org/debian
    fi
    echo "$uri"
}

PRIV_APT=() # apt options of the private configuration, set by private_apt_setup

private_apt_setup() {
    local dir=$CACHE/apt suites=${KUP_GUEST_SUITES:-trixie trixie-updates trixie-security bookworm-backports}
    local main sec s list=$dir/sources.list kr=/usr/share/keyrings/debian-archive-keyring.gpg
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    main=$(system_mirror main) sec=$(system_mirror security)
    {
        for s in $suites; do
            if [[ $s == *-security ]]; then echo "deb [signed-by=$kr] $sec $s main"
            else echo "deb [signed-by=$kr] $main $s main"; fi
        done
    } >"$list.new"
    PRIV_APT=(-oDir::Etc::SourceList="$list" -oDir::Etc::SourceParts=/dev/null
        -oDir::State::Lists="$dir/lists" -oDir::Cache="$dir/cache" -oAPT::Sandbox::User=root)
    # Refresh when the suite list changed or the lists are older than a day.
    if ! cmp -s "$list.new" "$list" || [[ -z $(find "$dir/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440) ]]; then
        mv "$list.new" "$list"
        note "apt-get update of private suites: $suites"
        apt-get -qq "${PRIV_APT[@]}" update || die "apt-get update of $suites failed"
    else
        rm -f "$list.new"
    fi
}

# Candidate version of package $1 under apt options $2...; empty when there is none.
candidate() {
    local pkg=$1
    shift
    apt-cache "$@" show --no-all-versions "$pkg" 2>/dev/null | awk '/^Version:/ && v == "" { v = $2 } END { print v }'
}

# Sets PKG_APT to the apt options under which package $1 has a candidate (empty: the system's
# configuration) and PKG_VER to that version, or fails.
PKG_APT=() PKG_VER=
locate_pkg() {
    local pkg=$1
    PKG_APT=()
    PKG_VER=$(candidate "$pkg")
    [[ -n $PKG_VER ]] && return 0
    private_apt_setup
    PKG_APT=("${PRIV_APT[@]}")
    PKG_VER=$(candidate "$pkg" "${PKG_APT[@]}")
    [[ -n $PKG_VER ]]
}

# The two newest published 6.1 cloud kernels, oldest first ("A B").
default_kernels() {
    local list
    apt_lists_fresh || die "the apt lists could not be refreshed"
    list=$(apt-cache search --names-only '^linux-image-6.1.0-.*-cloud-amd64$' | awk '{print $1}' | sort -V)
    if [[ -z $list ]]; then
        apt-get update -qq || die "apt-get update failed"
        list=$(apt-cache search --names-only '^linux-image-6.1.0-.*-cloud-amd64$' | awk '{print $1}' | sort -V)
    fi
    (($(wc -l <<<"$list") >= 2)) || die "fewer than two linux-image-6.1.0-*-cloud-amd64 packages are published"
    tail -n 2 <<<"$list" | tr '\n' ' '
}

# fetch_kernel PKG -> prints the extracted root: ROOT/vmlinuz, ROOT/version, ROOT/lib/modules/VER
fetch_kernel() {
    local pkg=$1 opts=() ver deb root kver
    locate_pkg "$pkg" || die "no package $pkg in the system's suites nor in ${KUP_GUEST_SUITES:-trixie trixie-updates trixie-security bookworm-backports}"
    opts=("${PKG_APT[@]}") ver=$PKG_VER
    mkdir -p "$CACHE/debs" "$CACHE/kernels"
    deb=$CACHE/debs/${pkg}_${ver//:/%3a}_amd64.deb
    if [[ ! -s $deb ]]; then
        note "downloading $pkg $ver"
        (cd "$CACHE/debs" && apt-get -qq "${opts[@]}" -oAPT::Sandbox::User=root download "$pkg") \
            || die "apt-get download $pkg failed"
        [[ -s $deb ]] || die "apt-get download $pkg did not produce $deb"
    fi
    root=$CACHE/kernels/$(basename "$deb" .deb)
    if [[ ! -e $root/.ok ]]; then
        local tmp=$root.tmp.$$
        rm -rf "$tmp"
        mkdir -p "$tmp/x"
        dpkg-deb -x "$deb" "$tmp/x"
        kver=$(ls "$tmp/x/lib/modules" 2>/dev/null || ls "$tmp/x/usr/lib/modules")
        [[ $(wc -w <<<"$kver") -eq 1 ]] || die "$deb: cannot tell the kernel version"
        mv "$tmp/x/boot/vmlinuz-$kver" "$tmp/vmlinuz"
        mkdir -p "$tmp/lib/modules"
        mv "$tmp/x"/{usr/,}lib/modules/"$kver" "$tmp/lib/modules/" 2>/dev/null || true
        [[ -d $tmp/lib/modules/$kver ]] || die "$deb: no module tree for $kver"
        rm -rf "$tmp/x"
        depmod -b "$tmp" "$kver" || die "depmod of $kver failed"
        echo "$kver" >"$tmp/version"
        touch "$tmp/.ok"
        rm -rf "$root"
        mv "$tmp" "$root"
    fi
    echo "$root"
}

# --- initramfs -----------------------------------------------------------------------------------------

# copy_elf SRC DEST: a binary and the libraries and ELF interpreter `ldd` lists, into the staging tree $S.
copy_elf() {
    local src=$1 dest=$2 lib out
    install -D -m 0755 "$src" "$S/$dest"
    # Debug info only makes the initramfs bigger, and every byte is copied and hashed at each kexec.
    command -v strip >/dev/null && strip --strip-debug "$S/$dest" 2>/dev/null
    out=$(ldd "$src" 2>&1) || { grep -q 'not a dynamic executable' <<<"$out" && return 0; die "ldd $src: $out"; }
    grep -q 'not found' <<<"$out" && die "ldd $src: $(grep 'not found' <<<"$out")"
    for lib in $(awk '/=> \//{print $3} /^\t\//{print $1}' <<<"$out"); do
        [[ -e $S/usr/${lib#/usr/} ]] || install -D -m 0755 "$(readlink -f "$lib")" "$S/usr/${lib#/usr/}"
    done
}

# copy_modules KROOT: the GUEST_MODULES closure of one kernel, decompressed, depmod'ed inside $S.
copy_modules() {
    local kroot=$1 kver m f rel dst
    kver=$(<"$kroot/version")
    local md=$kroot/lib/modules/$kver
    declare -A want=()
    for m in "${GUEST_MODULES[@]}" ${KUP_GUEST_MODULES:-}; do
        # modules.dep: "kernel/path/name.ko[.xz]: dep1 dep2"; names use - and _ interchangeably.
        local line
        line=$(grep -m1 -E "/${m//[-_]/[-_]}\.ko(\.[a-z]+)?:" "$md/modules.dep" || true)
        if [[ -z $line ]]; then
            grep -qE "/${m//[-_]/[-_]}\.ko" "$md/modules.builtin" 2>/dev/null || note "$kver: no module $m"
            continue
        fi
        for rel in ${line/:/}; do want[$rel]=1; done
    done
    dst=$S/usr/lib/modules/$kver
    mkdir -p "$dst"
    for rel in "${!want[@]}"; do
        f=$md/$rel
        mkdir -p "$dst/$(dirname "$rel")"
        case $rel in
            *.ko) cp "$f" "$dst/$rel" ;;
            *.ko.xz) xz -dc "$f" >"$dst/${rel%.xz}" ;;
            *.ko.zst) zstd -qdc "$f" >"$dst/${rel%.zst}" ;;
            *.ko.gz) gzip -dc "$f" >"$dst/${rel%.gz}" ;;
            *) die "unknown module file $rel" ;;
        esac
    done
    for f in modules.builtin modules.builtin.modinfo modules.order; do
        [[ -e $md/$f ]] && sed 's/\.ko\.\(xz\|zst\|gz\)$/.ko/' "$md/$f" >"$dst/$f"
    done
    # kup's PPP module, built against this kernel's headers package where this Debian has one.
    local ko
    if [[ -n $(candidate "linux-headers-$kver") || -e /usr/src/linux-headers-$kver/Makefile ]]; then
        ko=$("$REPO_DIR/scripts/kmod/build.sh" "$kver") || die "building ppp.ko for $kver failed"
        install -D -m 0644 "$ko" "$dst/extra/ppp.ko"
    else
        note "$kver: no linux-headers-$kver in the system's apt sources, so no ppp.ko (PPP scenarios need kernels that have one)"
    fi
    depmod -b "$S" "$kver" || die "depmod of the initramfs tree for $kver failed"
}

# build_initramfs KROOT_A KROOT_B -> prints the path of a cached initramfs image.
build_initramfs() {
    local ka=$1 kb=$2 b p key out
    S=$(mktemp -d "$CACHE/staging.XXXXXX")
    mkdir -p "$S"/usr/{bin,sbin,lib/x86_64-linux-gnu,lib64} "$S"/{dev,proc,sys,tmp,run,boot,etc,root,kup,bench}
    ln -s usr/bin "$S/bin"; ln -s usr/sbin "$S/sbin"; ln -s usr/lib "$S/lib"; ln -s usr/lib64 "$S/lib64"
    mknod -m 600 "$S/dev/console" c 5 1 2>/dev/null || true
    mknod -m 666 "$S/dev/null" c 1 3 2>/dev/null || true

    install -m 0755 "$(command -v busybox)" "$S/usr/bin/busybox"
    for p in $(busybox --list-full); do
        p=usr/${p#usr/}
        [[ -e $S/$p || -L $S/$p ]] || ln -s /usr/bin/busybox "$S/$p"
    done
    for b in "${GUEST_BINS[@]}"; do
        p=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v "$b") || {
            [[ $b != kexec ]] || die "no kexec on the host"
            note "not in the guest (missing on the host): $b"
            continue
        }
        p=$(readlink -f "$p")
        copy_elf "$p" "usr/${p#/usr/}"
    done
    # The project's release binaries: every ELF executable at the top of target/release.
    local rel=${KUP_GUEST_TARGET:-$REPO_DIR/target/release}
    for b in "$rel"/*; do
        [[ -f $b && -x $b && $(head -c 4 "$b") == $'\x7fELF' ]] || continue
        copy_elf "$b" "usr/bin/$(basename "$b")"
        note "project binary in the guest: $(basename "$b")"
    done

    install -m 0644 "$ka/vmlinuz" "$S/boot/vmlinuz-a"
    install -m 0644 "$kb/vmlinuz" "$S/boot/vmlinuz-b"
    printf 'a %s\nb %s\n' "$(<"$ka/version")" "$(<"$kb/version")" >"$S/boot/kernels"
    copy_modules "$ka"
    copy_modules "$kb"

    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$S/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$S/etc/group"
    install -m 0755 "$GUEST_DIR/init.sh" "$S/init"
    install -m 0644 "$GUEST_DIR/guest-lib.sh" "$S/bench/guest-lib.sh"
    install -m 0644 "$GUEST_DIR/bench-lib.sh" "$S/bench/bench-lib.sh"
    mkdir -p "$S/bench/scenarios"
    for p in "$GUEST_DIR"/scenarios/*.sh; do
        [[ $p == *.host.sh ]] || install -m 0644 "$p" "$S/bench/scenarios/"
    done

    # The archive's member list; the guest rebuilds the archive from it for kexec (guest-lib.sh: kexec_to).
    (cd "$S" && find . -mindepth 1 | LC_ALL=C sort >bench/files && echo ./bench/files >>bench/files)
    # Content hash of the tree (names, types, modes, link targets, file contents) keys the cache.
    key=$( (cd "$S" && find . -printf '%y %m %p %l\n' | LC_ALL=C sort &&
        find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)
    out=$CACHE/initrd/$key-$COMPRESS.img
    if [[ ! -s $out ]]; then
        mkdir -p "$CACHE/initrd"
        (cd "$S" && cpio --create --format=newc --owner=0:0 --reproducible --quiet <bench/files) | compress >"$out.$$"
        mv "$out.$$" "$out"
        # Keep the newest few images only.
        ls -t "$CACHE"/initrd/*.img 2>/dev/null | tail -n +9 | xargs -r rm -f
    fi
    rm -rf "$S"
    echo "$out"
}

compress() {
    case $COMPRESS in
        none) cat ;;
        gzip) gzip -1 -n ;;
        lz4) lz4 -l -q ;;
        zstd) zstd -q -3 ;;
        *) die "unknown KUP_GUEST_COMPRESS=$COMPRESS" ;;
    esac
}

# --- QEMU ----------------------------------------------------------------------------------------------

QEMU_GROUP= # pid of the process group running QEMU (timeout + qemu), for cleanup
READER_PID=

stop_qemu() {
    if [[ -n $QEMU_GROUP ]]; then
        kill -TERM -- "-$QEMU_GROUP" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 -- "-$QEMU_GROUP" 2>/dev/null || break
            sleep 0.3
        done
        kill -KILL -- "-$QEMU_GROUP" 2>/dev/null || true
        wait "$QEMU_GROUP" 2>/dev/null || true
        QEMU_GROUP=
    fi
    if [[ -n $READER_PID ]]; then
        kill "$READER_PID" 2>/dev/null || true
        wait "$READER_PID" 2>/dev/null || true
        READER_PID=
    fi
}

# Reads the serial console, prefixes each line with seconds since QEMU started (host clock), writes the
# log, echoes the bench's own lines (GUEST:, KUP:) live, and stops QEMU when more than $2 boots of the
# bench's init are seen (a reboot loop), or when the first kernel has not reached the bench's init
# within $3 seconds: an early-boot hang of the emulator, before any project code ran (a normal boot
# takes 3-10 s). That case leaves the file $4, so the caller can boot once more. Likewise, when the
# console stays silent for $5 seconds after a switch began (kexec or reset) with no new /init and no
# GUEST: line since, it stops QEMU and leaves the file $6.
console_reader() {
    local log=$1 max_boots=$2 boot_deadline=$3 hung_mark=$4 switch_deadline=$5 switch_mark=$6
    local t0 now line us boots=0 partial= got switch_at=0
    t0=${EPOCHREALTIME/./}
    while :; do
        line= got=1
        if IFS= read -r -t 2 line; then
            line=$partial$line partial=
        elif (($? > 128)); then # read timed out; bash keeps what it had of an unfinished line
            partial+=$line got=0
        else # end of the console: QEMU exited
            line=$partial$line partial=
            [[ -n $line ]] || break
        fi
        now=${EPOCHREALTIME/./}
        if ((boots == 0 && (now - t0) / 1000000 >= boot_deadline)) && [[ $line != *'KUP: init '* ]]; then
            printf '%s\n' "[host] the kernel did not reach the bench's init within $boot_deadline s" \
                "(an early-boot hang under TCG, before any project code): stopping QEMU" | tee -a "$log"
            : >"$hung_mark"
            kill -TERM -- "-$QEMU_GROUP" 2>/dev/null
            boots=-1 # report once
        fi
        # A switch is followed by silence (quiet kernels) until the next /init, 4-80 s under TCG.
        if ((switch_at && (now - switch_at) / 1000000 >= switch_deadline && !got)); then
            printf '%s\n' "[host] nothing on the console for $switch_deadline s after the switch" \
                "(the old kernel's shutdown or the new kernel's early boot hung): stopping QEMU" | tee -a "$log"
            : >"$switch_mark"
            kill -TERM -- "-$QEMU_GROUP" 2>/dev/null
            switch_at=0
        fi
        ((got)) || continue
        ((switch_at)) && switch_at=$now # silence counts from the last line
        us=$((now - t0))
        line=${line//$'\r'/}
        line=${line//$'\e'[[(]*([0-9;?])[a-zA-Z]/} # terminal escapes (firmware, console resets)
        line=${line//$'\e'c/}
        printf -v line '[%4d.%06d] %s' $((us / 1000000)) $((us % 1000000)) "$line"
        printf '%s\n' "$line" >>"$log"
        case $line in
            *'GUEST: '* | *'KUP: '*) printf '%s\n' "$line" ;;
        esac
        case $line in
            *'KUP: kexec-e '* | *'KUP: reset-now'* | *'kup update: checkpoint '*'; switching to '*) switch_at=$now ;;
            *'KUP: init '* | *'GUEST: '*) switch_at=0 ;;
        esac
        if [[ $line == *'KUP: init '* ]] && ((boots >= 0 && ++boots > max_boots)); then
            printf '%s\n' "[host] more than $max_boots boots: stopping QEMU" | tee -a "$log"
            kill -TERM -- "-$QEMU_GROUP" 2>/dev/null
        fi
    done 2>/dev/null
}

# run_qemu VMLINUZ INITRD APPEND LOG -> returns QEMU's exit status (124 on timeout)
run_qemu() {
    local kernel=$1 initrd=$2 append=$3 log=$4 rc=0
    local args=(-accel tcg,thread=multi -cpu max -m "$MEM" -smp 2 -nographic -serial stdio -monitor none
        -nic none -kernel "$kernel" -initrd "$initrd" -append "$append")
    ((NO_REBOOT)) && args+=(-no-reboot)
    rm -f "$WORK/console.fifo" && mkfifo "$WORK/console.fifo"
    printf '[host] qemu-system-x86_64' >"$log"
    printf " '%s'" "${args[@]}" >>"$log"
    printf '\n' >>"$log"
    # setsid: QEMU and its timeout run in their own session and process group (a background job of a
    # script is no group leader, so setsid does not fork and $! is that group), killed as a whole by
    # stop_qemu and out of reach of the terminal's Ctrl-C, which the trap in `run` handles instead.
    setsid timeout -k 10 "$TIMEOUT" qemu-system-x86_64 "${args[@]}" \
        </dev/null >"$WORK/console.fifo" 2>"$WORK/qemu.stderr" &
    QEMU_GROUP=$!
    rm -f "$WORK/boot-hung" "$WORK/switch-hung"
    console_reader "$log" "$MAX_BOOTS" "$BOOT_DEADLINE" "$WORK/boot-hung" "$SWITCH_DEADLINE" "$WORK/switch-hung" \
        <"$WORK/console.fifo" &
    READER_PID=$!
    wait "$QEMU_GROUP" || rc=$?
    QEMU_GROUP=
    wait "$READER_PID" 2>/dev/null || true
    READER_PID=
    return "$rc"
}

# Every switch in the log: from a `KUP: kexec-e`/`KUP: reset-now` line to the next `KUP: init` line.
# Prints "kind seconds target-stage uptime" per switch; uptime is the new kernel's own clock at its
# /init, so seconds - uptime is the part before that kernel started counting (shutdown of the old
# kernel, kexec purgatory or firmware, decompression of the new kernel).
switch_times() {
    awk '
        function stamp() { match($0, /^\[ *[0-9.]+\]/); return substr($0, 2, RLENGTH - 2) + 0 }
        function field(name) { if (!match($0, name "=[^ ]*")) return "?"; return substr($0, RSTART + length(name) + 1, RLENGTH - length(name) - 1) }
        /KUP: (kexec-e|reset-now)/ { t = stamp(); kind = ($0 ~ /kexec-e/) ? "kexec" : "reset"; next }
        /KUP: init / && kind != "" { printf "%s %.3f %s %s\n", kind, stamp() - t, field("stage"), field("uptime"); kind = "" }
    ' "$1"
}
