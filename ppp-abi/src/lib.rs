//! The user ABI of ppp.ko, kup's PPP module: the Rust mirror of `kmod/include/uapi/kup_ppp.h`,
//! the one definition. `tests/header.rs` compiles a C program against that header and checks
//! every size, offset, constant and request number below against what the C compiler says, so a
//! change on one side without the other fails `make test`.
//!
//! The layouts are the kernel's native ones (`#[repr(C)]`, x86-64 little-endian): the module
//! copies them with `copy_from_user`/`copy_to_user`, and pointers travel as `u64`.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const ABI_VERSION: u32 = 3;
/// The misc device (`/dev/kup_ppp`, root only).
pub const DEVICE_NAME: &str = "kup_ppp";
/// The arena's memory in /proc/iomem once hot-added.
pub const RESOURCE_NAME: &str = "System RAM (kup ppp)";

pub const STATE_ATTACHED: u32 = 1 << 0;
/// Pins taken while the app ran, not yet confirmed.
pub const STATE_PROVISIONAL: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Info {
    pub abi_version: u32,
    pub state: u32,
    pub arena_start: u64,
    pub arena_size: u64,
    pub block_size: u64,
    pub held_pages: u64,
    pub pinned_pages: u64,
    pub guarded_pages: u64,
    pub pin_tag: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Attach {
    pub arena_start: u64,
    pub arena_size: u64,
    /// Pointer to `u64 pfn[nr_held]`, ascending.
    pub held: u64,
    pub nr_held: u64,
}

/// Why a page does (KEPT) or does not stay in place.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Why {
    Kept = 0,
    NotPresent = 1,
    NotArena = 2,
    NotAnon = 3,
    Shared = 4,
    Pinned = 5,
    BadCrc = 6,
    NotHeld = 7,
    NotHole = 8,
    ExitWrite = 9,
    RestorerReads = 10,
}

impl Why {
    pub const ALL: [Why; 11] = [Why::Kept, Why::NotPresent, Why::NotArena, Why::NotAnon, Why::Shared, Why::Pinned, Why::BadCrc, Why::NotHeld, Why::NotHole, Why::ExitWrite, Why::RestorerReads];

    pub fn from_raw(v: u32) -> Option<Why> {
        Why::ALL.into_iter().find(|w| *w as u32 == v)
    }

    /// The header's name of the constant.
    pub fn c_name(self) -> &'static str {
        match self {
            Why::Kept => "PPP_KEPT",
            Why::NotPresent => "PPP_NOT_PRESENT",
            Why::NotArena => "PPP_NOT_ARENA",
            Why::NotAnon => "PPP_NOT_ANON",
            Why::Shared => "PPP_SHARED",
            Why::Pinned => "PPP_PINNED",
            Why::BadCrc => "PPP_BAD_CRC",
            Why::NotHeld => "PPP_NOT_HELD",
            Why::NotHole => "PPP_NOT_HOLE",
            Why::ExitWrite => "PPP_EXIT_WRITE",
            Why::RestorerReads => "PPP_RESTORER_READS",
        }
    }

    /// In words, for kup's messages.
    pub fn describe(self) -> &'static str {
        match self {
            Why::Kept => "kept in place",
            Why::NotPresent => "not present",
            Why::NotArena => "outside the arena",
            Why::NotAnon => "not private anonymous memory",
            Why::Shared => "shared copy-on-write with another mapping",
            Why::Pinned => "already pinned",
            Why::BadCrc => "its CRC does not match the checkpoint's",
            Why::NotHeld => "its PFN is not held back by the module",
            Why::NotHole => "the address cannot take the page",
            Why::ExitWrite => "written by the kernel when the process exits (clear_child_tid, robust futexes)",
            Why::RestorerReads => "read by CRIU's restorer before the app runs (a vDSO kept from an earlier restore, AIO rings)",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Page {
    pub pfn: u64,
    pub crc: u32,
    /// A [`Why`].
    pub why: u32,
}

pub const PIN_CRC: u32 = 1 << 0;
/// The process may run: provisional pins, until CONFIRM.
pub const PIN_RUNNING: u32 = 1 << 1;
/// A page this tag pinned already is kept without another reference.
pub const PIN_REPIN: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Pin {
    pub pid: u32,
    pub flags: u32,
    pub tag: u64,
    pub start: u64,
    pub nr_pages: u64,
    /// Pointer to `Page[nr_pages]`.
    pub pages: u64,
    pub nr_kept: u64,
}

pub const MAP_VERIFY: u32 = 1 << 0;
pub const MAP_GUARD: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Map {
    pub pid: u32,
    pub flags: u32,
    pub start: u64,
    pub nr_pages: u64,
    /// Pointer to `Page[nr_pages]`.
    pub pages: u64,
    pub nr_mapped: u64,
    pub nr_copied: u64,
    pub nr_guarded: u64,
    pub failed: u64,
    pub failed_why: u32,
    pub pad: u32,
}

pub const LIST_MAGIC: u32 = 0x4c50_5050;
pub const LIST_VERSION: u32 = 3;
/// [`ListRun::flags`]: the run only removes the pages at its addresses (a list of changes).
pub const LIST_GONE: u32 = 1;

/// The head of a process's PFN list in the checkpoint; then `nr_runs` [`ListRun`]s, then one
/// little-endian u32 CRC per page of the runs without [`LIST_GONE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct ListHead {
    pub magic: u32,
    pub version: u32,
    pub arena_start: u64,
    pub arena_size: u64,
    pub nr_pages: u64,
    pub nr_runs: u64,
    pub pid: u32,
    /// CRC-32 of everything after the head.
    pub crc: u32,
}

/// Pages at consecutive addresses in consecutive frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct ListRun {
    pub vaddr: u64,
    pub pfn: u64,
    pub nr_pages: u32,
    pub flags: u32,
}

pub const IOC_MAGIC: u8 = 0xB7;

/// Linux's `_IOC(dir, type, nr, size)` on x86-64.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((IOC_MAGIC as u64) << 8) | nr
}
const READ: u64 = 2;
const WRITE: u64 = 1;

pub const IOC_INFO: u64 = ioc(READ, 0, size_of::<Info>());
pub const IOC_ATTACH: u64 = ioc(WRITE, 1, size_of::<Attach>());
pub const IOC_PIN: u64 = ioc(READ | WRITE, 2, size_of::<Pin>());
pub const IOC_UNPIN: u64 = ioc(WRITE, 3, size_of::<u64>());
pub const IOC_MAP: u64 = ioc(READ | WRITE, 4, size_of::<Map>());
pub const IOC_RELEASE: u64 = ioc(0, 5, 0);
pub const IOC_EXIT_WRITES: u64 = ioc(READ | WRITE, 7, size_of::<ExitWrites>());
pub const IOC_CONFIRM: u64 = ioc(WRITE, 8, size_of::<Confirm>());
pub const IOC_WRITTEN: u64 = ioc(READ | WRITE, 9, size_of::<Written>());

/// The pages the kernel writes into when a stopped process's threads exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct ExitWrites {
    pub pid: u32,
    /// In: room at `addrs`; out: how many.
    pub nr: u32,
    /// Pointer to `u64 addr[nr]`, ascending.
    pub addrs: u64,
}

/// Ends the provisional state of a tag's pins, letting go of `drop`'s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Confirm {
    pub tag: u64,
    /// Pointer to `u32 pid[nr_pids]`.
    pub pids: u64,
    /// Pointer to `u64 pfn[nr_drop]`.
    pub drop: u64,
    pub nr_drop: u64,
    pub nr_pids: u32,
    pub pad: u32,
}

/// The pages of a range written since their soft-dirty bits were last reset, which it resets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Written {
    pub pid: u32,
    pub pad: u32,
    pub start: u64,
    /// At most [`WRITTEN_MAX_PAGES`].
    pub nr_pages: u64,
    /// Pointer to `u64 bits[(nr_pages + 63) / 64]`: bit i of word i / 64 is page i.
    pub bitmap: u64,
    /// Out: bits set.
    pub nr_written: u64,
}
pub const WRITTEN_MAX_PAGES: u64 = 1 << 28;

/// The header, for the test and for anything that wants to print where the ABI lives.
pub const HEADER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../kmod/include/uapi/kup_ppp.h");
