//! `kup`: instant kernel updates that keep running applications. Only the skeleton exists yet.
fn main() {
    eprintln!("kup: not implemented yet (see the issue tracker); rpramfs is the first part that exists");
    std::process::exit(2);
}
