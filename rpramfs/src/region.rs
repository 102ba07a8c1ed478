//! The one way into the reserved memory.
//!
//! Every load and store the file system makes to the region goes through [`Region`]: bounds are
//! checked here, block-device mappings are msync'ed here, and in tests every store is logged here so
//! that the crash-state tests can replay each prefix of the store sequence.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::layout::{ByteOffset, BLOCK_SIZE};

/// What kind of object backs the region; decides how stores become durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// A regular file (tests, or a region kept on tmpfs/hugetlbfs).
    File,
    /// A block device such as /dev/pmem0: its mmap goes through the page cache, so every commit
    /// msyncs the ranges it depends on (a kexec drops the page cache).
    BlockDevice,
    /// A devdax character device: stores go straight to the memory; no msync needed.
    DevDax,
}

/// One logged store (test builds replay prefixes of these).
#[derive(Clone, Debug)]
pub enum Store {
    Write { offset: u64, bytes: Vec<u8> },
    Fence,
}

/// The reserved memory, mapped once.
pub struct Region {
    map: MmapRaw,
    len: u64,
    kind: RegionKind,
    file: File,
    name: String,
    store_log: Option<Mutex<Vec<Store>>>,
    read_only: bool,
    /// The exclusive flock, held as long as the region is open.
    _lock: Option<nix::fcntl::Flock<File>>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("name", &self.name).field("len", &self.len).field("kind", &self.kind).finish()
    }
}

/// How a region is opened.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenRegion {
    /// Create the file if missing, or grow it, to this many bytes (regular files only).
    pub create_size: Option<u64>,
    /// Log every store (crash-state tests).
    pub log_stores: bool,
    /// Look without taking the lock (the region may be mounted): read-only mapping, writes refused.
    pub inspect_only: bool,
}

impl Region {
    /// Opens the region at `path` (a regular file, a block device or a devdax device) and takes the
    /// exclusive lock on it. A second opener gets [`Error::RegionBusy`] naming the holder.
    pub fn open(path: &Path, opts: OpenRegion) -> Result<Region> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path);
        let file = match (&meta, opts.create_size) {
            (Err(e), Some(_)) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode_0600()
                .open(path)
                .map_err(|e| Error::io(format!("creating region file {name}"), e))?,
            (Err(e), None) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::RegionMissing { path: name });
            }
            _ => OpenOptions::new()
                .read(true)
                .write(!opts.inspect_only)
                .open(path)
                .map_err(|e| Error::io(format!("opening region {name}"), e))?,
        };
        let ft = file.metadata().map_err(|e| Error::io(format!("stat {name}"), e))?;
        let kind = if ft.file_type().is_block_device() {
            RegionKind::BlockDevice
        } else if ft.file_type().is_char_device() {
            RegionKind::DevDax
        } else if ft.file_type().is_file() {
            RegionKind::File
        } else {
            return Err(Error::BadRegion { path: name, why: "not a regular file, block device or devdax device".into() });
        };
        if kind == RegionKind::File {
            if let Some(size) = opts.create_size {
                if ft.len() < size {
                    file.set_len(size).map_err(|e| Error::io(format!("growing region file {name} to {size} bytes"), e))?;
                }
            }
        } else if opts.create_size.is_some() {
            // A device has the size the kernel gave it; --size may only confirm it.
            let dev = device_len(&file, kind, &ft, &name)?;
            if opts.create_size != Some(dev) {
                return Err(Error::BadRegion {
                    path: name,
                    why: format!("--size {} given but the device is {dev} bytes; omit --size for devices", opts.create_size.unwrap()),
                });
            }
        }
        // Sizes are read again: the file may just have grown.
        Self::from_file_inner(file, name, kind, None, opts)
    }

    /// A region in an anonymous memfd (tests, fuzzing).
    pub fn memfd(size: u64, log_stores: bool) -> Result<Region> {
        let fd = nix::sys::memfd::memfd_create(c"rpramfs-region", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| Error::io("memfd_create", io::Error::from(e)))?;
        let file = File::from(fd);
        file.set_len(size).map_err(|e| Error::io("sizing memfd", e))?;
        Self::from_file(file, "memfd", log_stores)
    }

    /// A new region holding a copy of `image` (crash-state replay).
    pub fn memfd_from(image: &[u8]) -> Result<Region> {
        let r = Self::memfd(image.len() as u64, false)?;
        r.write(ByteOffset(0), image)?;
        Ok(r)
    }

    /// A copy of the whole region (tests).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len as usize];
        self.read_into(ByteOffset(0), &mut v).expect("whole region is in range");
        v
    }

    /// Wraps an already open file (a memfd in tests). Takes the lock like [`Region::open`].
    pub fn from_file(file: File, name: &str, log_stores: bool) -> Result<Region> {
        Self::from_file_inner(file, name.to_string(), RegionKind::File, None, OpenRegion { log_stores, ..Default::default() })
    }

    fn from_file_inner(
        file: File,
        name: String,
        kind: RegionKind,
        meta: Option<&std::fs::Metadata>,
        opts: OpenRegion,
    ) -> Result<Region> {
        let lock = if opts.inspect_only { None } else { Some(lock_exclusive(&file, &name)?) };
        let meta = match meta {
            Some(m) => m.clone(),
            None => file.metadata().map_err(|e| Error::io(format!("stat {name}"), e))?,
        };
        let len = match kind {
            RegionKind::File => meta.len(),
            _ => device_len(&file, kind, &meta, &name)?,
        };
        if len < crate::layout::MIN_REGION_BYTES {
            return Err(Error::BadRegion {
                path: name,
                why: format!("{len} bytes is too small; a region needs at least {} bytes", crate::layout::MIN_REGION_BYTES),
            });
        }
        let len = len - len % BLOCK_SIZE as u64;
        let mut mo = MmapOptions::new();
        mo.len(len as usize);
        let map = if opts.inspect_only { mo.map_raw_read_only(&file) } else { mo.map_raw(&file) }
            .map_err(|e| Error::io(format!("mapping region {name} ({len} bytes)"), e))?;
        let store_log = opts.log_stores.then(|| Mutex::new(Vec::new()));
        Ok(Region { map, len, kind, file, name, store_log, read_only: opts.inspect_only, _lock: lock })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn kind(&self) -> RegionKind {
        self.kind
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file behind the region (tests copy memfd images through it).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check(&self, off: ByteOffset, len: usize) -> Result<usize> {
        match off.0.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(off.0 as usize),
            _ => Err(Error::OutOfRange { offset: off.0, len: len as u64, region_len: self.len }),
        }
    }

    /// Copies `buf.len()` bytes at `off` out of the region.
    pub fn read_into(&self, off: ByteOffset, buf: &mut [u8]) -> Result<()> {
        let start = self.check(off, buf.len())?;
        // SAFETY: `check` proved start..start+len lies inside the mapping, which lives as long as
        // `self`. We copy through raw pointers and never form a reference into the shared mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr().add(start), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Stores `bytes` at `off`. Not durable until a later [`Region::fence`] + [`Region::flush`].
    pub fn write(&self, off: ByteOffset, bytes: &[u8]) -> Result<()> {
        let start = self.check(off, bytes.len())?;
        if self.read_only {
            return Err(Error::io(format!("region {} is open for inspection only", self.name), io::Error::from(io::ErrorKind::PermissionDenied)));
        }
        if let Some(log) = &self.store_log {
            log.lock().push(Store::Write { offset: off.0, bytes: bytes.to_vec() });
        }
        // SAFETY: bounds checked above; the mapping is writable (MAP_SHARED, read-write file) and
        // outlives the copy; the source is a distinct Rust slice, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.map.as_mut_ptr().add(start), bytes.len()) };
        Ok(())
    }

    /// Orders all earlier stores before all later ones (compiler and CPU).
    pub fn fence(&self) {
        if let Some(log) = &self.store_log {
            log.lock().push(Store::Fence);
        }
        fence(Ordering::SeqCst);
    }

    /// Makes the given byte ranges durable where the mapping is a page cache (block devices).
    pub fn flush(&self, ranges: &[(u64, u64)]) -> Result<()> {
        if self.kind != RegionKind::BlockDevice {
            return Ok(());
        }
        for &(off, len) in ranges {
            self.map
                .flush_range(off as usize, len as usize)
                .map_err(|e| Error::io(format!("msync of region {} at {off}+{len}", self.name), e))?;
        }
        Ok(())
    }

    /// Whether every store is logged (crash-state tests): then every store must go through
    /// [`Region::write`], so no other mapping of the region is handed out (no DIRECT_INFO).
    pub fn logs_stores(&self) -> bool {
        self.store_log.is_some()
    }

    /// Takes the store log (crash-state tests).
    pub fn take_store_log(&self) -> Vec<Store> {
        self.store_log.as_ref().map(|l| std::mem::take(&mut *l.lock())).unwrap_or_default()
    }

    /// The process-wide path of the region, for messages.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.name)
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}
impl Mode0600 for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        // Region files hold checkpointed process memory: root-only.
        self.mode(0o600)
    }
}

/// Copies `buf.len()` bytes at `off` of a device through a read-only mapping of its first 2 MiB
/// (a devdax device maps in units of its alignment, at most 2 MiB here, and has no read(2)).
pub(crate) fn read_mapped(file: &File, off: u64, buf: &mut [u8]) -> io::Result<()> {
    const HEAD: usize = 2 << 20;
    if off as usize + buf.len() > HEAD {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "beyond the mapped head of the region"));
    }
    let map = MmapOptions::new().len(HEAD).map_raw_read_only(file)?;
    // SAFETY: the range lies inside the HEAD-byte mapping, which lives until the end of this
    // function; we copy out through raw pointers and never form a reference into it.
    unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(off as usize), buf.as_mut_ptr(), buf.len()) };
    Ok(())
}

fn lock_exclusive(file: &File, name: &str) -> Result<nix::fcntl::Flock<File>> {
    // A holder that was just killed keeps the lock until its last thread has exited (its
    // mapping of the region holds the open file); give such a holder a few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let dup = file.try_clone().map_err(|e| Error::io("dup region fd", e))?;
        match nix::fcntl::Flock::lock(dup, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = crate::owner::read_owner(file);
                let exiting = holder.as_ref().is_some_and(|o| !o.is_alive());
                if exiting && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                }
                let holder = holder.map(|o| o.describe()).unwrap_or_else(|| "another process".to_string());
                return Err(Error::RegionBusy { path: name.to_string(), holder });
            }
            Err((_, e)) => return Err(Error::io(format!("locking region {name}"), io::Error::from(e))),
        }
    }
}

fn device_len(file: &File, kind: RegionKind, meta: &std::fs::Metadata, name: &str) -> Result<u64> {
    match kind {
        RegionKind::BlockDevice => {
            let mut size: u64 = 0;
            // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
            nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
            // SAFETY: the fd is an open block device and `size` is a valid u64 out-parameter.
            unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }
                .map_err(|e| Error::io(format!("BLKGETSIZE64 on {name}"), io::Error::from(e)))?;
            Ok(size)
        }
        RegionKind::DevDax => {
            let rdev = meta.rdev();
            let (major, minor) = (libc::major(rdev), libc::minor(rdev));
            let p = format!("/sys/dev/char/{major}:{minor}/size");
            let s = std::fs::read_to_string(&p).map_err(|e| Error::io(format!("reading {p} for devdax device {name}"), e))?;
            s.trim().parse().map_err(|_| Error::BadRegion { path: name.into(), why: format!("{p} holds {s:?}, not a size") })
        }
        RegionKind::File => Ok(meta.len()),
    }
}
