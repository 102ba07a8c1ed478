//! rpramfs: a reboot-persistent RAM file system.
//!
//! All of its data lives in one reserved region of physical memory (`memmap=SIZE!OFFSET` →
//! /dev/pmem0; a plain file or a memfd in tests), laid out with shadow paging: a change copies
//! the blocks it touches and becomes visible through one CRC'd commit record, so a daemon
//! `kill -9` or a kexec leaves either the old or the new state, never a mix, and every block is
//! vouched for by the CRC its parent holds. The FUSE front end serves it at a mount point.
//!
//! ```no_run
//! use rpramfs::{fs::{Fs, MkfsOptions, OpenOptions, Creator}, region::{Region, OpenRegion}};
//! let region = Region::open("/tmp/region".as_ref(), OpenRegion { create_size: Some(64 << 20), ..Default::default() })?;
//! Fs::mkfs(&region, &MkfsOptions::default())?;
//! let (fs, _report) = Fs::open(region, &OpenOptions::default())?;
//! let f = fs.create(1, b"hello", libc::S_IFREG | 0o644, 0, Creator { uid: 0, gid: 0 }, None)?;
//! fs.write_file(f.ino, 0, b"kept across kexec")?;
//! fs.close()?;
//! # Ok::<(), rpramfs::error::Error>(())
//! ```

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod alloc;
pub mod error;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod layout;
pub mod mountpoint;
pub mod owner;
pub mod region;
pub mod size;
pub mod tree;
pub mod tx;
