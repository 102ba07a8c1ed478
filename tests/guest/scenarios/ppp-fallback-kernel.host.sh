# Host side of ppp-fallback-kernel: ppp's guest with an arena, and fallback-kernel's reset and check
# that kernel B panicked.
. "$GUEST_DIR/scenarios/ppp.host.sh"
. "$GUEST_DIR/scenarios/fallback-kernel.host.sh"
