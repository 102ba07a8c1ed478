//! `rpramfs`: make, mount, check and describe a reboot-persistent RAM file system.
//! Also installed as `mount.fuse.rpramfs`, so `mount -t fuse.rpramfs REGION DIR` and fstab work.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use rpramfs::error::Error;
use rpramfs::fs::{self, Fs, MkfsOptions, OpenOptions};
use rpramfs::region::{OpenRegion, Region, RegionKind};
use rpramfs::size::{human, parse_size};
use rpramfs::{fsck, fuse, mountpoint};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(name = "rpramfs", version, about = "Reboot-persistent RAM file system (survives kexec, daemon crashes and corruption)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a new, empty file system on REGION (erases it).
    Mkfs {
        /// A file (created or grown to --size), a block device such as /dev/pmem0, or a devdax device.
        region: PathBuf,
        /// Region size for files, e.g. 512M or 4G.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// A label stored in the superblock.
        #[arg(long, default_value = "")]
        label: String,
        /// Erase a region that already holds an rpramfs file system.
        #[arg(long)]
        force: bool,
    },
    /// Mount REGION at MOUNTPOINT; returns once the mount serves requests.
    Mount {
        region: PathBuf,
        mountpoint: PathBuf,
        /// Stay in the foreground (log to stderr) instead of starting a background daemon.
        #[arg(long, short = 'f')]
        foreground: bool,
        /// Mount options: ro, allow_other, dev, suid, exec, noatime, threads=N.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Log file of the background daemon (default /run/rpramfs/<mountpoint>.log).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Check REGION (not mounted). Exit 0 when clean, 1 when it found errors.
    Fsck {
        region: PathBuf,
        /// Also verify the CRC of every data block.
        #[arg(long)]
        scrub: bool,
        /// Fix what can be fixed (dangling entries, link and block counts, orphans).
        #[arg(long)]
        repair: bool,
    },
    /// Describe REGION: format, size, usage, generation, clean or unclean. Works while mounted.
    Info { region: PathBuf },
    /// Write the man pages of rpramfs and each of its commands into DIR, for `make deb`.
    #[command(hide = true)]
    ManPages { dir: PathBuf },
}

fn main() -> ExitCode {
    let argv0 = std::env::args().next().unwrap_or_default();
    let cli = if Path::new(&argv0).file_name().is_some_and(|n| n.to_string_lossy().starts_with("mount.")) {
        match mount_helper_args() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("mount.fuse.rpramfs: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        Cli::parse()
    };
    let result = match cli.cmd {
        Cmd::Mkfs { region, size, label, force } => mkfs(&region, size, &label, force),
        Cmd::Mount { region, mountpoint, foreground, options, log } => mount(&region, &mountpoint, foreground, &options, log),
        Cmd::Fsck { region, scrub, repair } => return run_fsck(&region, scrub, repair),
        Cmd::Info { region } => info_cmd(&region),
        Cmd::ManPages { dir } => clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &dir).map_err(|e| Error::io(dir.display().to_string(), e)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rpramfs: {e}");
            ExitCode::from(1)
        }
    }
}

/// `mount.fuse.rpramfs REGION DIR [-o opts] [-n] [-s] [-v]` as mount(8) calls it.
fn mount_helper_args() -> Result<Cli, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut pos = Vec::new();
    let mut opts = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-o" => {
                i += 1;
                opts.push(args.get(i).cloned().ok_or("-o needs options")?);
            }
            "-n" | "-s" | "-v" | "-f" => {}
            a if a.starts_with("-o") => opts.push(a[2..].to_string()),
            a => pos.push(a.to_string()),
        }
        i += 1;
    }
    let [region, mp] = <[String; 2]>::try_from(pos).map_err(|_| "usage: mount.fuse.rpramfs REGION MOUNTPOINT [-o OPTIONS]".to_string())?;
    Ok(Cli { cmd: Cmd::Mount { region: region.into(), mountpoint: mp.into(), foreground: false, options: opts, log: None } })
}

fn init_logging(to_stderr_plain: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RPRAMFS_LOG").unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if to_stderr_plain {
        b.without_time().with_target(false).init();
    } else {
        b.with_target(false).init();
    }
}

fn mkfs(path: &Path, size: Option<u64>, label: &str, force: bool) -> Result<(), Error> {
    let region = Region::open(path, OpenRegion { create_size: size, ..Default::default() })?;
    if !force {
        if let Ok(i) = fs::inspect(&region) {
            return Err(Error::BadRegion {
                path: path.display().to_string(),
                why: format!(
                    "it already holds an rpramfs file system ({} inodes, generation {}); pass --force to erase it",
                    i.inodes, i.generation
                ),
            });
        }
    }
    let phys = pmem_phys_offset(path);
    Fs::mkfs(&region, &MkfsOptions { label: label.to_string(), phys_offset: phys })?;
    let blocks = region.len() / 4096;
    println!("rpramfs: made a file system on {} ({}, {blocks} blocks of 4 KiB)", path.display(), human(region.len()));
    Ok(())
}

/// The physical start of /dev/pmemN (so a wrong memmap= is named in messages).
fn pmem_phys_offset(path: &Path) -> u64 {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return 0 };
    if !name.starts_with("pmem") {
        return 0;
    }
    std::fs::read_to_string(format!("/sys/block/{name}/device/resource"))
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        .unwrap_or(0)
}

fn mount(path: &Path, mp: &Path, foreground: bool, options: &[String], log: Option<PathBuf>) -> Result<(), Error> {
    let cfg = fuse::parse_mount_options(options).map_err(|why| Error::BadRegion { path: path.display().to_string(), why })?;
    if foreground || std::env::var_os("RPRAMFS_READY_FD").is_some() {
        let mut ready = ready_fd()?;
        init_logging(foreground && ready.is_none());
        match serve_mount(path, mp, &cfg, &mut ready) {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Some(f) = ready.as_mut() {
                    let _ = writeln!(f, "ERR {e}");
                }
                error!("{e}");
                Err(e)
            }
        }
    } else {
        spawn_daemon(path, mp, options, log)
    }
}

/// The readiness pipe the parent `rpramfs mount` passes its daemon as `RPRAMFS_READY_FD`: a
/// descriptor number of 3 or above that is open for writing. Anything else (a typo, -1, one of the
/// standard descriptors, a closed number) is refused with the variable and its value, instead of
/// taking ownership of a descriptor that is not ours.
fn ready_fd() -> Result<Option<std::fs::File>, Error> {
    const VAR: &str = "RPRAMFS_READY_FD";
    let Some(raw) = std::env::var_os(VAR) else {
        return Ok(None);
    };
    let value = raw.to_string_lossy().into_owned();
    let bad = |why: String| Error::Io {
        context: format!("{VAR}={value:?}"),
        source: std::io::Error::other(format!("{why} (rpramfs mount sets it for the daemon it starts; unset it to mount in the foreground)")),
    };
    let fd: i32 = value.trim().parse().map_err(|_| bad("not a file descriptor number".into()))?;
    if fd < 3 {
        return Err(bad(format!("{fd} is not a readiness pipe: it must be a descriptor number of 3 or above")));
    }
    // SAFETY: fcntl with F_GETFD/F_GETFL only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(format!("descriptor {fd} is not open ({})", std::io::Error::last_os_error())));
    }
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 || fl & libc::O_ACCMODE == libc::O_RDONLY {
        return Err(bad(format!("descriptor {fd} is not open for writing")));
    }
    // SAFETY: the parent passed us the write end of a pipe under this number (open and writable, as
    // checked above) and nothing else in this process owns it.
    Ok(Some(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
}

/// The daemon: opens the region, mounts, reports readiness, serves until unmounted.
fn serve_mount(path: &Path, mp: &Path, cfg: &fuse::MountConfig, ready: &mut Option<std::fs::File>) -> Result<(), Error> {
    let region_name = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    mountpoint::prepare(mp)?;
    let region = Region::open(path, OpenRegion::default())?;
    let kind = region.kind();
    let what = format!("mounted at {}", mp.display());
    let (fs, report) = Fs::open(region, &OpenOptions { read_only: cfg.read_only, what })?;
    info!(
        region = %region_name.display(),
        generation = report.generation,
        inodes = report.inodes,
        used = %human(report.used_blocks * 4096),
        "region opened ({})",
        if report.was_clean { "last unmount was clean" } else { "recovering from an unclean shutdown" }
    );
    if let Some(o) = &report.previous_owner {
        if !report.was_clean {
            warn!("previous session: {o}");
        }
    }
    for n in &report.notes {
        info!("{n}");
    }
    for e in &report.errors {
        error!("damage: {e}");
    }
    if kind == RegionKind::BlockDevice {
        info!("block-device region: every commit msyncs the blocks it wrote");
    }
    let fs = Arc::new(fs);
    let session = fuse::mount(fs.clone(), mp, &region_name.display().to_string(), cfg)
        .map_err(|e| Error::io(format!("mounting FUSE at {}", mp.display()), e))?;
    info!(mountpoint = %mp.display(), "serving");
    if let Some(mut f) = ready.take() {
        let _ = writeln!(f, "OK");
    } else {
        println!("rpramfs: {} mounted at {}", path.display(), mp.display());
    }
    fuse::serve(session).map_err(|e| Error::io("FUSE session", e))?;
    info!("unmounted; daemon exits");
    Ok(())
}

/// Starts the daemon in the background and waits until it serves (or says why it cannot).
fn spawn_daemon(path: &Path, mp: &Path, options: &[String], log: Option<PathBuf>) -> Result<(), Error> {
    let log = log.unwrap_or_else(|| {
        let name = mp.display().to_string().trim_matches('/').replace('/', "-");
        PathBuf::from(format!("/run/rpramfs/{}.log", if name.is_empty() { "root".into() } else { name }))
    });
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| Error::io(format!("opening log {}", log.display()), e))?;
    let (rd, wr) = nix::unistd::pipe().map_err(|e| Error::io("pipe", e.into()))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("finding the rpramfs binary", e))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("mount").arg(path).arg(mp);
    for o in options {
        cmd.arg("-o").arg(o);
    }
    use std::os::unix::process::CommandExt;
    cmd.env("RPRAMFS_READY_FD", wr.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone().map_err(|e| Error::io("log", e))?)
        .stderr(logf)
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| Error::io("starting the rpramfs daemon", e))?;
    drop(wr);
    let mut msg = String::new();
    let _ = std::fs::File::from(rd).read_to_string(&mut msg);
    let msg = msg.trim();
    if msg == "OK" {
        println!("rpramfs: {} mounted at {} (daemon pid {}, log {})", path.display(), mp.display(), child.id(), log.display());
        return Ok(());
    }
    let _ = child.wait();
    if let Some(err) = msg.strip_prefix("ERR ") {
        return Err(Error::io(err.to_string(), std::io::Error::other(format!("see {}", log.display()))));
    }
    let tail = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = tail.lines().rev().take(10).collect();
    Err(Error::io(
        format!("the daemon exited before serving; last log lines:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n")),
        std::io::Error::other(log.display().to_string()),
    ))
}

fn run_fsck(path: &Path, scrub: bool, repair: bool) -> ExitCode {
    let region = match Region::open(path, OpenRegion::default()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rpramfs fsck: {e}");
            return ExitCode::from(8);
        }
    };
    let (fs, report) = match Fs::open(region, &OpenOptions { read_only: !repair, what: "rpramfs fsck --repair".into() }) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("rpramfs fsck: {e}");
            return ExitCode::from(if matches!(e, Error::NoFilesystem { .. }) { 8 } else { 1 });
        }
    };
    let r = fsck::check(&fs, &report, scrub, repair);
    for n in &r.notes {
        println!("note: {n}");
    }
    for e in &r.errors {
        println!("error: {e}");
    }
    for f in &r.repaired {
        println!("repaired: {f}");
    }
    if repair {
        if let Err(e) = fs.close() {
            eprintln!("rpramfs fsck: could not record the clean state: {e}");
        }
    }
    println!(
        "{}: generation {}, {} inodes ({} directories), {} data blocks{}: {}",
        path.display(),
        report.generation,
        r.inodes,
        r.directories,
        r.data_blocks,
        if scrub { format!(", {} blocks scrubbed", r.scrubbed_blocks) } else { String::new() },
        if r.clean() { "clean".to_string() } else { format!("{} errors", r.errors.len()) }
    );
    if r.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn info_cmd(path: &Path) -> Result<(), Error> {
    let region = Region::open(path, OpenRegion { inspect_only: true, ..Default::default() })?;
    let i = fs::inspect(&region)?;
    let kind = match region.kind() {
        RegionKind::File => "file",
        RegionKind::BlockDevice => "block device",
        RegionKind::DevDax => "devdax device",
    };
    let ts = |ns: u64| {
        let s = (ns / 1_000_000_000) as i64;
        chrono_like(s)
    };
    println!("region:       {} ({kind}, {})", path.display(), human(region.len()));
    println!("format:       rpramfs version {}, {}-byte blocks", i.sb.version, i.sb.block_size);
    println!("uuid:         {}", i.sb.uuid.iter().map(|b| format!("{b:02x}")).collect::<String>());
    if !i.sb.label_str().is_empty() {
        println!("label:        {}", i.sb.label_str());
    }
    if i.sb.phys_offset != 0 {
        println!("made for:     physical address {:#x}", i.sb.phys_offset);
    }
    println!("created:      {}", ts(i.sb.created_ns));
    println!("generation:   {} (committed {})", i.generation, ts(i.last_commit_ns));
    let pct = if i.pool_blocks > 0 { i.used_blocks as f64 * 100.0 / i.pool_blocks as f64 } else { 0.0 };
    println!("used:         {} ({pct:.1}%)", human(i.used_blocks * 4096));
    println!("free:         {}", human(i.pool_blocks.saturating_sub(i.used_blocks) * 4096));
    println!("files:        {} inodes", i.inodes);
    let state = match (&i.owner, i.clean) {
        (_, true) => "clean (last unmount completed)".to_string(),
        (Some(o), false) if o.contains("; running)") => format!("mounted ({o})"),
        (Some(o), false) => format!("unclean: the last session ended without unmounting ({o}); the next mount recovers"),
        (None, false) => "unclean: the next mount recovers".to_string(),
    };
    println!("state:        {state}");
    for n in &i.report.notes {
        println!("note:         {n}");
    }
    for e in &i.report.errors {
        println!("damage:       {e}");
    }
    Ok(())
}

/// UTC "YYYY-MM-DD HH:MM:SS" without a date crate (civil-from-days, Howard Hinnant's algorithm).
fn chrono_like(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}
