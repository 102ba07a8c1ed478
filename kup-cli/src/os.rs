//! The only unsafe code in kup: the hook that gives CRIU one end of a socketpair as its fd 3
//! (`--ps-socket 3`) between fork and exec, and restoring SIGPIPE's default action.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The descriptor number CRIU is told to use.
pub const CHILD_FD: i32 = 3;

/// Arranges for `sock` to be fd 3 in the child started by `cmd` (and nowhere else: the socket
/// itself stays close-on-exec, so CRIU processes started in parallel do not inherit it and EOF
/// still reaches the server when this CRIU exits).
pub fn pass_socket(cmd: &mut Command, sock: &OwnedFd) {
    let fd = sock.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls dup2/fcntl, which
    // are async-signal-safe; it touches no memory of the parent besides the copied `fd` integer.
    unsafe {
        cmd.pre_exec(move || {
            if fd == CHILD_FD {
                // dup2 onto itself is a no-op that keeps FD_CLOEXEC: clear it instead.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, CHILD_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Lets a closed pipe end kup quietly (`kup status | head`), as it does other tools, instead of
/// Rust's default of ignoring SIGPIPE and panicking in `println!`.
pub fn default_sigpipe() {
    // SAFETY: called once at the start of main, before any thread exists; SIG_DFL installs no
    // handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
