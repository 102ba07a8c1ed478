//! `kup`: instant kernel updates that keep running applications and their memory.
//!
//! This binary drives CRIU (the checkpoint engine) and owns the memory path: checkpoints go into
//! FOAM files (foam-store) over CRIU's page-server protocol and come back on demand.

mod checkpoint;
mod commit;
mod converge;
mod criu;
mod error;
mod faults;
mod fill;
// Each binary uses its own side of the wire.
#[allow(dead_code)]
mod hook_wire;
mod inspect;
mod kernels;
mod kexec;
mod messages;
mod machine;
mod ppp;
mod ppp_dev;
mod procs;
mod record;
mod report;
mod restore;
mod resume;
mod staging;
mod throttle;
mod os;
mod update;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kup", version, about = "Instant kernel updates that keep running applications and their memory")]
struct Cli {
    /// The CRIU binary (default: $KUP_CRIU, then `criu` on PATH, then /opt/kup/criu/bin/criu)
    #[arg(long, global = true)]
    criu: Option<PathBuf>,
    /// Print results as JSON on stdout
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Checkpoint running apps into a store: pre-dumps while they run, a final dump frozen
    Checkpoint {
        /// A process (with its children) to checkpoint; repeat for several apps
        #[arg(long = "pid", required = true)]
        pids: Vec<u32>,
        /// The store directory (e.g. /kup on rpramfs)
        #[arg(long)]
        store: PathBuf,
        /// Passes at most: up to N-1 pre-dumps while the app runs, then the final dump. The
        /// pre-dumps stop early when few pages are left or the dirty set stops shrinking
        #[arg(long, default_value_t = 4)]
        iterations: u32,
        /// When the dirty set stops shrinking: `off` (go to the final dump) or the share in percent
        /// of its CPU use the app keeps during one more pre-dump (cgroup v2 cpu.max; docs/operator-guide.md)
        #[arg(long, default_value = "30")]
        throttle: converge::ThrottleArg,
        /// Keep the apps running after the final dump (default: CRIU stops them)
        #[arg(long)]
        leave_running: bool,
        /// Name of the checkpoint (default: the first app's command name)
        #[arg(long)]
        name: Option<String>,
        /// An extra CRIU option for every pass and for restore (repeatable), e.g. --criu-opt=--ext-unix-sk
        #[arg(long = "criu-opt", allow_hyphen_values = true)]
        criu_opts: Vec<String>,
        /// Keep the apps' pages in the PPP arena where they are (ppp.ko; docs/ppp.md)
        #[arg(long)]
        ppp: bool,
        /// PPP: take no page CRCs (restore then cannot check the kept pages; docs/ppp.md)
        #[arg(long)]
        no_page_crc: bool,
    },
    /// Restore the apps of a checkpoint (the newest complete one by default)
    Restore {
        /// The store directory holding the checkpoint
        #[arg(long)]
        store: PathBuf,
        /// The checkpoint: its id (`0002-second`) or its name (`second`: the newest complete one
        /// of that name); `kup inspect` lists them
        #[arg(long)]
        checkpoint: Option<String>,
        /// Restore lazily: the app runs at once and its memory follows on demand (default)
        #[arg(long, conflicts_with = "eager")]
        lazy: bool,
        /// Restore eagerly: all memory is in place before the app runs
        #[arg(long)]
        eager: bool,
        /// Directory for CRIU's logs and sockets
        #[arg(long, default_value = "/run/kup")]
        work_dir: PathBuf,
        /// Seconds CRIU may take for each restore step (and lazy-pages for fetching everything)
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Update the kernel: checkpoint the apps, switch with kexec, resume them on the new kernel
    Update {
        /// The new kernel image (bzImage). Default: the newest /boot/vmlinuz-* (Debian's version
        /// order), with its /boot/initrd.img-*; it must be newer than the running kernel
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// The new kernel's initrd (default: none with --kernel, /boot/initrd.img-<release> without)
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// The new kernel's command line (default: the running one); must keep the region's memmap=
        #[arg(long)]
        append: Option<String>,
        /// `ram` (rpramfs on --region mounted at --mountpoint) or a directory
        #[arg(long)]
        store: String,
        /// A process (with its children) to update; repeat for several apps
        #[arg(long = "pid", required = true)]
        pids: Vec<u32>,
        /// Passes at most (see `kup checkpoint --help`)
        #[arg(long, default_value_t = 4)]
        iterations: u32,
        /// When the dirty set stops shrinking: `off` or the share in percent of its CPU use the app keeps during one more pre-dump
        #[arg(long, default_value = "30")]
        throttle: converge::ThrottleArg,
        /// A command that exits 0 when the apps are healthy (default: their tasks run and their listening ports accept)
        #[arg(long)]
        health_check: Option<String>,
        /// Check everything and print the plan; stop nothing
        #[arg(long)]
        dry_run: bool,
        /// The running kernel's image, for fallback (default /boot/vmlinuz-$(uname -r))
        #[arg(long)]
        old_kernel: Option<PathBuf>,
        /// The running kernel's initrd, for fallback (default /boot/initrd.img-$(uname -r) if it exists)
        #[arg(long)]
        old_initrd: Option<PathBuf>,
        /// The command line to boot the running kernel with on fallback (default: the running one)
        #[arg(long)]
        old_append: Option<String>,
        /// Keep the apps' pages in the PPP arena where they are across the switch, or refuse (ppp.ko;
        /// docs/ppp.md). Default: PPP where the arena and the module are there and its checks pass
        #[arg(long, conflicts_with = "no_ppp")]
        ppp: bool,
        /// Copy every page through the store (FOAM) even where PPP is possible
        #[arg(long)]
        no_ppp: bool,
        /// PPP: take no page CRCs (restore then cannot check the kept pages; docs/ppp.md)
        #[arg(long)]
        no_page_crc: bool,
        #[command(flatten)]
        ram: RamStore,
    },
    /// After a kernel switch (run at boot): restore the checkpointed apps, check them, record the timeline
    Resume {
        /// `ram` or a directory
        #[arg(long, default_value = "ram")]
        store: String,
        /// Restore eagerly (default lazy)
        #[arg(long)]
        eager: bool,
        /// Seconds CRIU may take for each restore step (and a lazy restore for fetching everything)
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[command(flatten)]
        ram: RamStore,
    },
    /// The last update and its timeline
    Status {
        /// `ram` or a directory
        #[arg(long, default_value = "ram")]
        store: String,
        #[command(flatten)]
        ram: RamStore,
    },
    /// PPP's arena and module: `status`, or `attach` at boot (before the apps start)
    Ppp {
        #[command(subcommand)]
        what: PppCmd,
    },
    /// Print CRIU's statistics of a dump directory (stats-dump) as JSON, e.g. the frozen time of a
    /// plain `criu dump` to compare with kup's
    #[command(hide = true)]
    CriuStats { dir: PathBuf },
    /// Write the man pages of kup and each of its commands (from these definitions) into DIR, for
    /// `make deb`
    #[command(hide = true)]
    ManPages { dir: PathBuf },

    /// List the checkpoints in a store; --verify checks every page's CRC
    Inspect {
        /// The store directory
        store: PathBuf,
        /// Read every page and check its CRC (and CRIU's images), naming each damaged page
        #[arg(long)]
        verify: bool,
    },
}

#[derive(Subcommand)]
enum PppCmd {
    /// The arena of the command line, the module and what it holds
    Status,
    /// Hot-add the command line's arena as movable memory, so that the apps' pages land there
    /// (at boot, after `kup resume`, before the apps start)
    Attach {
        /// The store whose update record is checked: a PPP update still to resume is refused
        #[arg(long, default_value = "/kup")]
        store: PathBuf,
        /// Do nothing when the command line reserves no arena (for boot scripts)
        #[arg(long)]
        if_reserved: bool,
    },
    /// Pin a process's pages as a checkpoint would, then unpin them (the module refuses a
    /// process that CRIU does not hold stopped); with --running, pin it provisionally as the
    /// passes before the freeze do, then try to confirm those pins (refused while it runs; the
    /// module drops them as kup exits)
    #[command(hide = true)]
    Pin {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        running: bool,
    },
}

/// Where `--store ram` lives.
#[derive(clap::Args)]
struct RamStore {
    /// The reserved region: memmap=SIZE!OFFSET shows it as /dev/pmem0, or as /dev/dax0.0 once
    /// made a devdax namespace (faster). Default: /dev/dax0.0 if it exists, else /dev/pmem0
    #[arg(long)]
    region: Option<PathBuf>,
    /// Where rpramfs is mounted
    #[arg(long, default_value = "/kup")]
    mountpoint: PathBuf,
}

impl RamStore {
    /// (store directory, region when the store is rpramfs on a region)
    fn resolve(&self, store: &str) -> (PathBuf, Option<PathBuf>) {
        if store == "ram" {
            let region = self.region.clone().unwrap_or_else(|| {
                ["/dev/dax0.0", "/dev/pmem0"].iter().map(PathBuf::from).find(|p| p.exists()).unwrap_or_else(|| PathBuf::from("/dev/pmem0"))
            });
            (self.mountpoint.clone(), Some(region))
        } else {
            (PathBuf::from(store), None)
        }
    }
}

/// `KUP_DIRECT_WRITES=0` sends pages through FUSE instead of straight into rpramfs's region.
/// (Operators' settings are read here, in the binary; the libraries take them as parameters.)
fn direct_writes() -> foam_store::foam::DirectWrites {
    match std::env::var("KUP_DIRECT_WRITES").as_deref() {
        Ok("0") => foam_store::foam::DirectWrites::Off,
        _ => foam_store::foam::DirectWrites::IfOffered,
    }
}

fn main() {
    os::default_sigpipe();
    // `KUP_CRC32=folding|table` forces a CRC32 implementation; else pagecrc times both.
    if let Some(imp) = std::env::var("KUP_CRC32").ok().as_deref().and_then(pagecrc::Implementation::from_name) {
        pagecrc::set_implementation(imp);
    }
    let cli = Cli::parse();

    let result = match &cli.cmd {
        Cmd::Checkpoint { pids, store, iterations, throttle, leave_running, name, criu_opts, ppp, no_page_crc } => criu::Criu::locate(cli.criu.as_deref()).and_then(|c| {
            let a = checkpoint::Args { pids: pids.clone(), store: store.clone(), iterations: *iterations, leave_running: *leave_running, name: name.clone(), json: cli.json, criu_options: criu_opts.clone(), ppp: *ppp, ppp_crc: !*no_page_crc, throttle: throttle.0 };
            checkpoint::run(&c, &a).map(|_| ())
        }),
        Cmd::Restore { store, checkpoint, lazy: _, eager, work_dir, timeout } => criu::Criu::locate(cli.criu.as_deref()).and_then(|c| {
            let mode = if *eager { restore::Mode::Eager } else { restore::Mode::Lazy };
            let a = restore::Args { store: store.clone(), checkpoint: checkpoint.clone(), mode, json: cli.json, work_root: work_dir.clone(), timeout: std::time::Duration::from_secs(*timeout), keep_ppp_pages: false };
            restore::run(&c, &a).map(|_| ())
        }),
        Cmd::Inspect { store, verify } => inspect::run(store, *verify, cli.json),
        Cmd::Update { kernel, initrd, append, store, pids, iterations, throttle, health_check, dry_run, old_kernel, old_initrd, old_append, ppp, no_ppp, no_page_crc, ram } => criu::Criu::locate(cli.criu.as_deref()).and_then(|c| {
            let (store, region) = ram.resolve(store);
            let a = update::Args {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                append: append.clone(),
                store,
                region,
                pids: pids.clone(),
                iterations: *iterations,
                throttle: throttle.0,
                health_check: health_check.clone(),
                dry_run: *dry_run,
                old_kernel: old_kernel.clone(),
                old_initrd: old_initrd.clone(),
                old_append: old_append.clone(),
                json: cli.json,
                ppp: match (*ppp, *no_ppp) {
                    (true, _) => update::PppMode::On,
                    (_, true) => update::PppMode::Off,
                    _ => update::PppMode::Auto,
                },
                ppp_crc: !*no_page_crc,
            };
            update::run(&c, &a)
        }),
        Cmd::Resume { store, eager, timeout, ram } => criu::Criu::locate(cli.criu.as_deref()).and_then(|c| {
            let (store, region) = ram.resolve(store);
            let mode = if *eager { restore::Mode::Eager } else { restore::Mode::Lazy };
            resume::run(&c, &resume::Args { store, region, mode, timeout: std::time::Duration::from_secs(*timeout) })
        }),
        Cmd::Status { store, ram } => resume::status(&ram.resolve(store).0, cli.json),
        Cmd::Ppp { what: PppCmd::Status } => ppp::status(cli.json),
        Cmd::Ppp { what: PppCmd::Attach { store, if_reserved } } => ppp::attach_at_boot(store, *if_reserved),
        Cmd::Ppp { what: PppCmd::Pin { pid, running } } => ppp::pin_for_test(*pid, *running),
        Cmd::ManPages { dir } => clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), dir).map_err(|e| format!("{}: {e}", dir.display()).into()),
        Cmd::CriuStats { dir } => foam_store::criu_images::read_dump_stats(dir).map_err(Into::into).map(|s| report::print_json(&serde_json::json!(s))),
    };
    if let Err(e) = result {
        crate::messages::error(format_args!("{e}"));
        std::process::exit(1);
    }
}
