#!/usr/bin/env bash
# Installs a working CRIU 4.1.1 (from Debian trixie) for this host into a private prefix, without touching
# the system's apt configuration, package database or libraries.
#
# Why: bookworm's criu 3.17.1 fails on the 6.18 host kernel ("vdso: Unexpected rt vDSO area bounds");
# trixie's 4.1.1 works when it runs with its own dynamic loader and libraries.
#
#   scripts/criu-host/install.sh            # installs into /opt/kup/criu, prints the wrapper's path
#   KUP_CRIU_PREFIX=/x scripts/criu-host/install.sh
#
# Environment:
#   KUP_CRIU_PREFIX   install prefix (default /opt/kup/criu); the wrapper is PREFIX/bin/criu
#   KUP_CRIU_CACHE    private apt state, lists and downloaded .debs (default /var/cache/kup-criu)
#   KUP_CRIU_MIRROR   Debian mirror URI (default: the one the system's sources already name)
#   KUP_CRIU_SUITE    suite to take criu from (default trixie)
#   KUP_CRIU_VERSION  version the wrapper must report (default 4.1.1)
#   KUP_CRIU_FORCE=1  reinstall even if the wrapper already reports the wanted version
#
# Re-running is cheap: if PREFIX/bin/criu --version already reports KUP_CRIU_VERSION, nothing is done.
# Progress goes to stderr; the only line on stdout is the wrapper's path.
set -euo pipefail

PREFIX=${KUP_CRIU_PREFIX:-/opt/kup/criu}
CACHE=${KUP_CRIU_CACHE:-/var/cache/kup-criu}
SUITE=${KUP_CRIU_SUITE:-trixie}
WANT=${KUP_CRIU_VERSION:-4.1.1}
ARCH=amd64
TRIPLET=x86_64-linux-gnu
LOADER_NAME=ld-linux-x86-64.so.2
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MARKER=.kup-criu-prefix

log() { printf 'criu-host: %s\n' "$*" >&2; }
die() { printf 'criu-host: error: %s\n' "$*" >&2; exit 1; }

case "$PREFIX" in /*) ;; *) die "KUP_CRIU_PREFIX must be absolute: $PREFIX" ;; esac
case "$CACHE" in /*) ;; *) die "KUP_CRIU_CACHE must be absolute: $CACHE" ;; esac
case "$PREFIX" in *[\'\"\ \$\`\\]*) die "KUP_CRIU_PREFIX must not contain quotes, blanks, \$, \` or backslashes" ;; esac
PREFIX=${PREFIX%/}
WRAPPER=$PREFIX/bin/criu

installed_version() {
    # prints the version the wrapper reports, or nothing
    [ -x "$WRAPPER" ] || return 0
    "$WRAPPER" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1 || true
}

if [ "${KUP_CRIU_FORCE:-0}" != 1 ] && [ "$(installed_version)" = "$WANT" ]; then
    log "criu $WANT already installed in $PREFIX"
    echo "$WRAPPER"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "run as root (apt-get download and the install prefix need it)"
[ "$(dpkg --print-architecture)" = "$ARCH" ] || die "only $ARCH is supported"
for tool in apt-get apt-cache dpkg-deb sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done

# --- mirror: the URI the system's own Debian sources already use ------------------------------------------
find_mirror() {
    local f uri
    f=/etc/apt/sources.list.d/debian.sources
    if [ -r "$f" ]; then
        # deb822: the first stanza of Types deb whose Suites are not *-security
        uri=$(awk '
            function flush() { if (types ~ /(^|[ \t])deb([ \t]|$)/ && suites != "" && suites !~ /-security/ && uris != "" && out == "") { split(uris, u, /[ \t]+/); out = u[1] } types = ""; uris = ""; suites = "" }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]*#/ { next }
            tolower($1) == "types:"  { $1 = ""; types = $0 }
            tolower($1) == "uris:"   { $1 = ""; sub(/^[ \t]+/, ""); uris = $0 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 }
            END { flush(); print out }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    fi
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri=$(awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                                 if ($(i+1) !~ /-security/ && $i ~ /debian/) { print $i; exit } }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    echo http://deb.debian.org/debian
}
MIRROR=${KUP_CRIU_MIRROR:-$(find_mirror)}
MIRROR=${MIRROR%/}
log "mirror $MIRROR, suite $SUITE, prefix $PREFIX, cache $CACHE"

# --- private apt configuration -------------------------------------------------------------------------------
# APT_CONFIG is read before the parts directory, so pointing Dir::Etc::Parts at a private directory keeps the
# system's apt.conf.d (post-update hooks that clean /var/cache/apt, appstream, packagekit) out of these runs.
# Only the system's proxy and date-check settings are carried over.
A=$CACHE/apt
mkdir -p "$A/apt.conf.d" "$A/lists/partial" "$A/state" "$A/cache/archives/partial" "$A/log" "$CACHE/debs"
: > "$A/state/status"
[ -r "$KEYRING" ] || die "$KEYRING is missing (package debian-archive-keyring)"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" > "$A/sources.list"
cat > "$A/apt.conf" <<EOF
Dir::Etc::Main "/dev/null";
Dir::Etc::Parts "$A/apt.conf.d";
Dir::Etc::SourceList "$A/sources.list";
Dir::Etc::SourceParts "/dev/null";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "/dev/null";
Dir::State "$A/state";
Dir::State::Lists "$A/lists";
Dir::State::status "$A/state/status";
Dir::State::extended_states "$A/state/extended_states";
Dir::Cache "$A/cache";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Dir::Log "$A/log";
APT::Architecture "$ARCH";
APT::Architectures { "$ARCH"; };
Acquire::Languages "none";
EOF
apt-config dump 2>/dev/null \
    | grep -E '^Acquire::((https?|ftp)::([^ ]*::)?[Pp]roxy|Check-Valid-Until|Check-Date|Retries|ForceIPv4|ForceIPv6) ' \
    > "$A/apt.conf.d/50system-acquire" || true
export APT_CONFIG=$A/apt.conf
APTOPTS=(-q -oDir::Etc::SourceList="$A/sources.list" -oDir::Etc::SourceParts=/dev/null
         -oDir::State::Lists="$A/lists" -oDir::Cache="$A/cache" -oDir::State::status="$A/state/status")

t0=$(date +%s)
log "apt-get update ($SUITE, private lists in $A/lists)"
apt-get "${APTOPTS[@]}" update >&2 || die "apt-get update of the private $SUITE sources failed"

candidate=$(apt-cache "${APTOPTS[@]}" policy criu | sed -n 's/^ *Candidate: *//p')
case "$candidate" in
    "$WANT"|"$WANT"-*) ;;
    *) die "$SUITE offers criu '$candidate', not $WANT (set KUP_CRIU_SUITE / KUP_CRIU_VERSION)" ;;
esac

# --- download: criu and the Depends closure (library packages only, no Recommends) ---------------------------
mapfile -t closure < <(apt-cache "${APTOPTS[@]}" depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances criu | grep -v '^ ' | grep -v '^<' | sort -u)
((${#closure[@]})) || die "could not compute the dependency closure of criu"
log "candidate packages: ${closure[*]}"
DEBS=$CACHE/debs
if id _apt >/dev/null 2>&1; then chown _apt "$DEBS" 2>/dev/null || true; fi   # lets apt download sandboxed
(cd "$DEBS" && apt-get "${APTOPTS[@]}" download "${closure[@]}" >&2) || die "apt-get download failed"

declare -A debfile candver
while read -r pkg ver; do candver[$pkg]=$ver; done < <(apt-cache "${APTOPTS[@]}" policy "${closure[@]}" \
    | awk '/^[^ ].*:$/ { sub(/:$/, ""); p = $0 } /^ +Candidate:/ { print p, $2 }')
for pkg in "${closure[@]}"; do
    ver=${candver[$pkg]:-}
    [ -n "$ver" ] || die "no candidate version for $pkg"
    f=$(compgen -G "$DEBS/${pkg}_${ver//:/%3a}_*.deb" | head -n1 || true)
    if [ -z "$f" ] || [ ! -f "$f" ]; then die "downloaded .deb for $pkg $ver not found in $DEBS"; fi
    debfile[$pkg]=$f
done

# --- stage every candidate, then keep only what the loader really resolves ---------------------------------
STAGE=$CACHE/stage
rm -rf "$STAGE"
mkdir -p "$STAGE"
for pkg in "${closure[@]}"; do
    dpkg-deb -x "${debfile[$pkg]}" "$STAGE/$pkg"
done
LOADER_PKG=libc6
STAGE_LOADER=$STAGE/$LOADER_PKG/usr/lib/$TRIPLET/$LOADER_NAME
[ -x "$STAGE_LOADER" ] || die "no $LOADER_NAME in $LOADER_PKG"
[ -x "$STAGE/criu/usr/sbin/criu" ] || die "no usr/sbin/criu in the criu package"
libpath=""
for pkg in "${closure[@]}"; do
    for d in "$STAGE/$pkg/usr/lib/$TRIPLET" "$STAGE/$pkg/lib/$TRIPLET"; do
        if [ -d "$d" ]; then libpath=${libpath:+$libpath:}$d; fi
    done
done
# ld.so --list is ldd: the recursive DT_NEEDED closure as this loader resolves it. --inhibit-cache keeps the
# host's /etc/ld.so.cache (bookworm libraries) out; anything that still resolves outside the stage is an error.
listing=$("$STAGE_LOADER" --inhibit-cache --library-path "$libpath" --list "$STAGE/criu/usr/sbin/criu") \
    || die "the $SUITE loader cannot resolve criu's libraries: $listing"
if grep -q 'not found' <<<"$listing"; then die "unresolved libraries: $(grep 'not found' <<<"$listing")"; fi
# libgcc_s.so.1 is not a DT_NEEDED of anything here, but glibc dlopen()s it for pthread_cancel and unwinding;
# without it in the prefix that dlopen would pick up the host's copy.
declare -A keep=([criu]=1 [$LOADER_PKG]=1)
DLOPENED_PKGS=(libgcc-s1)
for pkg in "${DLOPENED_PKGS[@]}"; do
    if [ -n "${debfile[$pkg]:-}" ]; then keep[$pkg]=1; fi
done
needed_report=""
while read -r path; do
    case "$path" in
        */"$LOADER_NAME") ;;   # the loader itself (listed under criu's PT_INTERP path)
        "$STAGE"/*) rel=${path#"$STAGE"/}; pkg=${rel%%/*}; keep[$pkg]=1
                    needed_report+="  $(basename "$path") <- $pkg"$'\n' ;;
        *) die "library resolved outside the staged packages: $path" ;;
    esac
done < <(awk '/=>/ { print $3; next } /^[ \t]*\// { print $1 }' <<<"$listing" | grep '^/' | sort -u)
if command -v readelf >/dev/null; then
    # cross-check with readelf: every DT_NEEDED of criu and of each resolved library is among the names the
    # loader listed (i.e. the closure is complete)
    mapfile -t resolved < <(awk '/=>/ { print $3 }' <<<"$listing" | grep '^/')
    while read -r soname; do
        [ "$soname" = "$LOADER_NAME" ] || grep -qF "$soname =>" <<<"$listing" \
            || die "$soname is needed but the loader did not list it"
    done < <(readelf -d "$STAGE/criu/usr/sbin/criu" "${resolved[@]}" 2>/dev/null \
             | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort -u)
fi
mapfile -t kept < <(printf '%s\n' "${!keep[@]}" | sort)
log "packages needed at run time: ${kept[*]}"

# --- assemble the prefix atomically ----------------------------------------------------------------------------
if [ -e "$PREFIX" ] && [ ! -e "$PREFIX/$MARKER" ] && [ -n "$(ls -A "$PREFIX" 2>/dev/null)" ]; then
    die "$PREFIX exists, is not empty and was not made by this script; refusing to replace it"
fi
NEW=$PREFIX.new.$$
rm -rf "$NEW"
mkdir -p "$NEW"
trap 'rm -rf "$NEW"' EXIT
for pkg in "${kept[@]}"; do
    dpkg-deb -x "${debfile[$pkg]}" "$NEW"
done
# Debian trixie is /usr-merged: give the prefix the same /lib -> usr/lib layout.
for d in lib lib64; do
    [ -e "$NEW/$d" ] || [ ! -d "$NEW/usr/$d" ] || ln -s "usr/$d" "$NEW/$d"
done
rm -rf "$NEW/usr/share/man" "$NEW/usr/share/lintian"
mkdir -p "$NEW/usr/lib/criu" "$NEW/share/kup-criu"
LIBDIRS=$PREFIX/usr/lib/$TRIPLET
mkdir -p "$NEW/bin"
cat > "$NEW/bin/criu" <<EOF
#!/bin/sh
# Generated by kup scripts/criu-host/install.sh: runs Debian $SUITE's criu $candidate with its own loader and
# libraries, so nothing of the host's (bookworm) libc or criu package is used.
# CRIU_LIBS_DIR: CRIU dlopen()s every *.so in its plugin directory (default /usr/lib/criu, which belongs to the
# host's criu package); point it at the prefix's own, empty, directory unless the caller chose one.
P='$PREFIX'
CRIU_LIBS_DIR="\${CRIU_LIBS_DIR:-\$P/usr/lib/criu}"
export CRIU_LIBS_DIR
exec "\$P/lib/$TRIPLET/$LOADER_NAME" --inhibit-cache --library-path "$LIBDIRS" --argv0 criu "\$P/usr/sbin/criu" "\$@"
EOF
chmod 755 "$NEW/bin/criu"
for pkg in "${kept[@]}"; do
    printf '%s %s %s\n' "$pkg" "$(dpkg-deb -f "${debfile[$pkg]}" Version)" \
        "$(sha256sum "${debfile[$pkg]}" | cut -d' ' -f1)"
done > "$NEW/share/kup-criu/packages"
{
    echo "suite=$SUITE"
    echo "mirror=$MIRROR"
    echo "installed=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "loader-resolved libraries:"
    printf '%s' "$needed_report"
} > "$NEW/share/kup-criu/info"
touch "$NEW/$MARKER"

OLD=$PREFIX.old.$$
if [ -e "$PREFIX" ]; then mv "$PREFIX" "$OLD"; fi
mkdir -p "$(dirname "$PREFIX")"
mv "$NEW" "$PREFIX"
trap - EXIT
rm -rf "$OLD" "$STAGE"

got=$(installed_version)
if [ "$got" != "$WANT" ]; then
    "$WRAPPER" --version >&2 || true
    die "the installed wrapper reports version '$got', expected $WANT"
fi
log "installed criu $got in $PREFIX ($(( $(date +%s) - t0 )) s)"
echo "$WRAPPER"
