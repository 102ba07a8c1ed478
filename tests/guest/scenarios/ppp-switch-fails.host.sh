# Host side of ppp-switch-fails (sourced by tests/guest/run), as of every PPP scenario: a guest with an arena. QEMU's pc
# machine maps guest RAM beyond 3 GiB from 4 GiB on, so -m 5G gives [4G, 6G) above the PCI hole: the
# whole of it is the arena (memmap=2G$4G, aligned to the 128 MiB memory blocks), and the region
# (512M!1G) and the kernels' own memory stay below 3 GiB.
MEM=5G
MEMMAP='512M!1G,2G$4G'
TIMEOUT=900
