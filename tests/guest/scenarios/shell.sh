# shell: an interactive busybox shell on kernel A, for work by hand (see docs/guest-bench.md); leaving
# the shell powers the guest off. `kexec_to b b` from the shell switches to kernel B and gives a shell
# there too. Not for tests/guest/run, which gives QEMU no input.

stage_a() {
    info "interactive shell on $(uname -r); '. /bench/guest-lib.sh' loads the helpers; exit powers off"
    setsid cttyhack sh -i
    pass "shell closed"
}

stage_b() {
    stage_a
}
