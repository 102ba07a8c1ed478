# Host side of ppp-fallback-app: ppp's guest with an arena.
. "$GUEST_DIR/scenarios/ppp.host.sh"
