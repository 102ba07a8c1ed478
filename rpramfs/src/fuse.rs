//! The FUSE front end: translates kernel requests into [`Fs`] operations. Every mutating request
//! has committed (durable in the region) before its reply is sent, because the kernel never sends
//! syncfs to a FUSE daemon; fsync and flush therefore have nothing left to do.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    IoctlFlags, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use tracing::{error, info, warn};
use zerocopy::IntoBytes;

use crate::error::Error;
use crate::fs::lease::{CommitRequest, LeaseRequest, MapRequest, IOC_COMMIT, IOC_DIRECT_INFO, IOC_LEASE, IOC_MAP};
use crate::fs::{Attr, Creator, Fs, SetAttr, Time};
use crate::layout::{BLOCK_SIZE, INODES_PER_BLOCK, NAME_MAX};

/// Attributes and entries are cached by the kernel for this long: every change goes through this
/// mount, so the kernel's copy never goes stale behind its back.
const TTL: Duration = Duration::from_secs(1);

pub struct RpramFuse {
    fs: Arc<Fs>,
    /// File handles are numbered: direct-write leases belong to the open file that took them.
    next_fh: AtomicU64,
    /// Tells the kernel to drop cached pages and attributes that a direct write changed (set
    /// once the session exists).
    notifier: Arc<OnceLock<fuser::Notifier>>,
}

impl RpramFuse {
    pub fn new(fs: Arc<Fs>) -> RpramFuse {
        RpramFuse { fs, next_fh: AtomicU64::new(1), notifier: Arc::new(OnceLock::new()) }
    }

    fn new_handle(&self) -> FileHandle {
        FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed))
    }

    /// The kernel's copy of `ino` (attributes, and pages `off..off + len`) is stale: direct
    /// writes change a file without a FUSE write passing through the kernel.
    fn invalidate(&self, ino: u64, off: u64, len: u64) {
        if let Some(n) = self.notifier.get() {
            if let Err(e) = n.inval_inode(INodeNo(ino), off as i64, len as i64) {
                // ENOENT: the kernel holds nothing of this inode.
                if e.raw_os_error() != Some(libc::ENOENT) {
                    warn!(ino, error = %e, "invalidating the kernel's cache after a direct write failed");
                }
            }
        }
    }
}

fn errno(e: &Error) -> Errno {
    if let Error::Corrupt { .. } | Error::OutOfRange { .. } = e {
        error!(error = %e, "damaged metadata: request fails with EIO");
    }
    Errno::from_i32(e.errno())
}

fn time(s: i64, ns: u32) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, ns)
    } else {
        UNIX_EPOCH - Duration::new((-s) as u64, 0) + Duration::new(0, ns)
    }
}

fn from_system_time(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}

fn time_or_now(t: TimeOrNow) -> Time {
    match t {
        TimeOrNow::SpecificTime(t) => from_system_time(t),
        TimeOrNow::Now => crate::fs::now(),
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn kind_of_dtype(d: u8) -> FileType {
    match d {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let i = &a.inode;
    FileAttr {
        ino: INodeNo(a.ino),
        size: i.size,
        blocks: i.blocks * (BLOCK_SIZE as u64 / 512),
        atime: time(i.atime_s, i.atime_ns),
        mtime: time(i.mtime_s, i.mtime_ns),
        ctime: time(i.ctime_s, i.ctime_ns),
        crtime: time(i.crtime_s, i.crtime_ns),
        kind: kind_of(i.mode),
        perm: (i.mode & 0o7777) as u16,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: BLOCK_SIZE as u32,
        flags: 0,
    }
}

fn generation(a: &Attr) -> Generation {
    Generation(a.inode.generation)
}

impl RpramFuse {
    fn entry(&self, r: crate::error::Result<Attr>, reply: ReplyEntry) {
        match r {
            Ok(a) => {
                self.fs.remember(a.ino);
                reply.entry(&TTL, &file_attr(&a), generation(&a));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn empty(r: crate::error::Result<()>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

fn creator(req: &Request) -> Creator {
    Creator { uid: req.uid(), gid: req.gid() }
}

impl Filesystem for RpramFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        Ok(())
    }

    fn destroy(&mut self) {
        match self.fs.close() {
            Ok(()) => info!("clean unmount recorded"),
            Err(e) => error!(error = %e, "could not record the clean unmount; the next mount will recover"),
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if name.len() > NAME_MAX {
            return reply.error(Errno::ENAMETOOLONG);
        }
        self.entry(self.fs.lookup(parent.0, name.as_bytes()), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_or_now),
            mtime: mtime.map(time_or_now),
            ctime: ctime.map(from_system_time),
        };
        match self.fs.setattr(ino.0, a) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let mode = (mode & libc::S_IFMT) | (mode & 0o7777 & !umask);
        self.entry(self.fs.create(parent.0, name.as_bytes(), mode, rdev, creator(req), None), reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mode = libc::S_IFDIR | (mode & 0o7777 & !umask);
        self.entry(self.fs.create(parent.0, name.as_bytes(), mode, 0, creator(req), None), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.fs.remove(parent.0, name.as_bytes(), false), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.fs.remove(parent.0, name.as_bytes(), true), reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let t = target.as_os_str().as_bytes();
        self.entry(self.fs.create(parent.0, link_name.as_bytes(), libc::S_IFLNK | 0o777, 0, creator(req), Some(t)), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.fs.rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes(), flags.bits()), reply);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.entry(self.fs.link(ino.0, newparent.0, newname.as_bytes()), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.getattr(ino.0) {
            // The kernel's page cache stays valid across opens: all writes come through it, and
            // direct writes invalidate what they change.
            Ok(_) => {
                // CRC hints belong to the writer that gave them, before this open.
                self.fs.forget_crc_hints(ino.0);
                reply.opened(self.new_handle(), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read_file(ino.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write_file(ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release_handle(fh.0);
        reply.ok();
    }

    /// Direct writes (rpramfs/src/fs/lease.rs): DIRECT_INFO, LEASE and COMMIT.
    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let direct = [IOC_DIRECT_INFO, IOC_LEASE, IOC_COMMIT, IOC_MAP].contains(&cmd);
        // Only root may lease: leased blocks hold whatever they held before, and the writer's
        // CRCs are trusted (with `allow_other`, other users reach this mount too).
        if direct && req.uid() != 0 {
            return reply.error(Errno::EPERM);
        }
        let r = match cmd {
            IOC_DIRECT_INFO => self.fs.direct_info().map(|i| i.as_bytes().to_vec()),
            IOC_LEASE => LeaseRequest::decode(in_data).and_then(|q| self.fs.lease(fh.0, ino.0, &q)).map(|a| a.as_bytes().to_vec()),
            IOC_MAP => MapRequest::decode(in_data).and_then(|q| self.fs.map_blocks(ino.0, &q)).map(|a| a.as_bytes().to_vec()),
            IOC_COMMIT => CommitRequest::decode(in_data).and_then(|q| {
                self.fs.commit_lease(fh.0, ino.0, &q)?;
                // One notification for the span of all extents (a checked, non-empty list): more
                // than changed, but one write to /dev/fuse instead of one per extent.
                let (first, &(last, n)) = (q.extents[0].0, q.extents.last().expect("a commit has extents"));
                self.invalidate(ino.0, first, last + n as u64 * BLOCK_SIZE as u64 - first);
                Ok(Vec::new())
            }),
            _ => Err(Error::Posix(libc::ENOTTY)),
        };
        match r {
            Ok(out) => reply.ioctl(0, &out),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.getattr(ino.0) {
            Ok(a) if a.inode.is_dir() => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.fs.readdir(ino.0, offset, 256) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(INodeNo(e.ino), e.next, kind_of_dtype(e.dtype), OsStr::from_bytes(&e.name)) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let u = self.fs.usage();
        // Inodes cost 256 bytes in the shared pool: as many more as free blocks × 16.
        let ffree = u.available_blocks * INODES_PER_BLOCK;
        reply.statfs(
            u.pool_blocks,
            u.free_blocks,
            u.available_blocks,
            u.inodes + ffree,
            ffree,
            BLOCK_SIZE as u32,
            NAME_MAX as u32,
            BLOCK_SIZE as u32,
        );
    }

    fn setxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32, _position: u32, reply: ReplyEmpty) {
        Self::empty(self.fs.setxattr(ino.0, name.as_bytes(), value, flags), reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs.getxattr(ino.0, name.as_bytes()) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.fs.removexattr(ino.0, name.as_bytes()), reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); only existence is ours.
        Self::empty(self.fs.getattr(ino.0).map(|_| ()), reply);
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, _flags: i32, reply: ReplyCreate) {
        let mode = libc::S_IFREG | (mode & 0o7777 & !umask);
        match self.fs.create(parent.0, name.as_bytes(), mode, 0, creator(req), None) {
            Ok(a) => {
                self.fs.remember(a.ino);
                reply.created(&TTL, &file_attr(&a), generation(&a), self.new_handle(), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        Self::empty(self.fs.fallocate(ino.0, offset, length, mode), reply);
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        match self.fs.seek(ino.0, offset as u64, whence) {
            Ok(p) => reply.offset(p as i64),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self.fs.copy_range(ino_in.0, offset_in, ino_out.0, offset_out, len) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Mount options an operator can give with `-o` (besides the standard ones).
#[derive(Clone, Debug, Default)]
pub struct MountConfig {
    pub read_only: bool,
    pub allow_other: bool,
    pub options: Vec<fuser::MountOption>,
    pub threads: usize,
}

/// Parses `-o a,b,c`. Unknown options are refused with the list of known ones.
pub fn parse_mount_options(opts: &[String]) -> Result<MountConfig, String> {
    use fuser::MountOption as M;
    let mut c = MountConfig { threads: 2, ..Default::default() };
    for o in opts.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        match o {
            "ro" => c.read_only = true,
            "rw" => c.read_only = false,
            "allow_other" => c.allow_other = true,
            "dev" => c.options.push(M::Dev),
            "nodev" => c.options.push(M::NoDev),
            "suid" => c.options.push(M::Suid),
            "nosuid" => c.options.push(M::NoSuid),
            "exec" => c.options.push(M::Exec),
            "noexec" => c.options.push(M::NoExec),
            "noatime" => c.options.push(M::NoAtime),
            "atime" | "relatime" => {}
            // fstab-only words that mount(8) passes through.
            "defaults" | "auto" | "noauto" | "user" | "nouser" | "_netdev" | "nofail" | "default_permissions" => {}
            o if o.starts_with("x-") || o.starts_with("comment=") => {}
            o if o.starts_with("threads=") => {
                c.threads = o[8..].parse().map_err(|_| format!("mount option {o:?}: threads=N needs a number"))?;
                if c.threads == 0 {
                    return Err("mount option threads=0: need at least one thread".into());
                }
            }
            other => {
                return Err(format!(
                    "unknown mount option {other:?} (known: ro, rw, allow_other, dev, nodev, suid, nosuid, exec, noexec, noatime, threads=N)"
                ))
            }
        }
    }
    Ok(c)
}

/// Mounts `fs` at `mountpoint` and returns once the kernel has completed the FUSE handshake, i.e.
/// the mount serves requests. `serve` then runs until `umount`.
pub fn mount(fs: Arc<Fs>, mountpoint: &Path, source: &str, cfg: &MountConfig) -> std::io::Result<fuser::Session<RpramFuse>> {
    let mut options = vec![
        fuser::MountOption::FSName(source.to_string()),
        fuser::MountOption::Subtype("rpramfs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    if cfg.read_only {
        options.push(fuser::MountOption::RO);
    }
    options.extend(cfg.options.iter().cloned());
    let mut config = fuser::Config::default();
    config.mount_options = options;
    config.acl = if cfg.allow_other { fuser::SessionACL::All } else { fuser::SessionACL::Owner };
    config.n_threads = Some(cfg.threads);
    config.clone_fd = true;
    let fuse = RpramFuse::new(fs);
    let notifier = fuse.notifier.clone();
    let session = fuser::Session::new(fuse, mountpoint, &config)?;
    let _ = notifier.set(session.notifier());
    Ok(session)
}

/// Runs the session until the file system is unmounted.
pub fn serve(session: fuser::Session<RpramFuse>) -> std::io::Result<()> {
    let r = session.run();
    if let Err(e) = &r {
        warn!(error = %e, "FUSE session ended with an error");
    }
    r
}
