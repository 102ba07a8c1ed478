#!/usr/bin/env bash
# Installs what building and testing kup needs on a Debian host; a no-op when all is present.
set -euo pipefail
need=()
for pkg in gcc make util-linux procps psmisc python3; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        echo "setup: cargo is in ~/.cargo/bin; add it to PATH" >&2
    else
        echo "setup: installing the Rust toolchain (rustup)"
        apt-get install -y -qq curl >/dev/null
        curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    fi
fi
# clippy checks the workspace's rust-version (make msrv, part of make test-host).
cargo_bin=$(command -v cargo 2>/dev/null || echo "$HOME/.cargo/bin/cargo")
if [ -x "$cargo_bin" ] && ! "$cargo_bin" clippy --version >/dev/null 2>&1; then
    rustup_bin=$(command -v rustup 2>/dev/null || echo "$HOME/.cargo/bin/rustup")
    if [ -x "$rustup_bin" ]; then
        echo "setup: installing clippy (rustup component add clippy)"
        "$rustup_bin" component add clippy || echo "setup: could not install clippy; make msrv (in make test-host) will fail" >&2
    else
        echo "setup: cargo has no clippy and there is no rustup to add it; make msrv (in make test-host) will fail" >&2
    fi
fi
if [ ! -e /dev/fuse ]; then
    modprobe fuse 2>/dev/null || true
fi
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing: this kernel has no FUSE; rpramfs cannot mount here" >&2; exit 1; }
