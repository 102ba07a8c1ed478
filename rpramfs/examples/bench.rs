//! rpramfs benchmark: the same workloads on rpramfs (the release daemon, region in /dev/shm) and on
//! tmpfs, measured in one run; prints figures and ratios (no pass/fail).
//!
//! Run with `make bench` (or `cargo run --release -p rpramfs --example bench`).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn rpramfs_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("rpramfs")
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

struct Fig {
    name: &'static str,
    rp: f64,
    tmp: f64,
    unit: &'static str,
}

fn seq_write(dir: &Path, size: u64) -> Duration {
    let buf = vec![0xa5u8; 1 << 20];
    let t = Instant::now();
    let mut f = File::create(dir.join("seq")).unwrap();
    for _ in 0..size >> 20 {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    t.elapsed()
}

fn seq_read(dir: &Path) -> (Duration, u64) {
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut f = File::open(dir.join("seq")).unwrap();
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf).unwrap();
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    (t.elapsed(), n)
}

fn random_4k(dir: &Path, ops: u64) -> Duration {
    let f = OpenOptions::new().create(true).read(true).write(true).open(dir.join("rand")).unwrap();
    let span = 256u64 << 20;
    f.set_len(span).unwrap();
    let buf = vec![0x3cu8; 4096];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let t = Instant::now();
    for _ in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.write_all_at(&buf, (x % (span / 4096)) * 4096).unwrap();
    }
    f.sync_all().unwrap();
    t.elapsed()
}

fn create_files(dir: &Path, n: u32) -> Duration {
    let d = dir.join("files");
    fs::create_dir(&d).unwrap();
    let t = Instant::now();
    for i in 0..n {
        fs::write(d.join(format!("f{i:05}")), b"small file\n").unwrap();
    }
    t.elapsed()
}

fn daemon_rss(mp: &Path) -> (u64, u64) {
    let out = sh(Command::new("pgrep").args(["-f", &format!("rpramfs mount .* {}", mp.display())]));
    let pid = out.lines().next().unwrap().trim();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |k: &str| status.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse::<u64>().unwrap();
    (kb("RssAnon:"), kb("RssFile:") + kb("RssShmem:"))
}

fn mount(bin: &Path, region: &Path, mp: &Path) -> Duration {
    let t = Instant::now();
    sh(Command::new(bin).arg("mount").arg(region).arg(mp).arg("--log").arg("/tmp/rpramfs-bench.log"));
    t.elapsed()
}

fn umount(mp: &Path) {
    sh(Command::new("umount").arg(mp));
    std::thread::sleep(Duration::from_millis(500));
}

fn main() {
    let bin = rpramfs_bin();
    let size: u64 = std::env::var("BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024) << 20;
    let work = PathBuf::from("/dev/shm/rpramfs-bench");
    if work.exists() {
        let _ = Command::new("umount").arg(work.join("mnt")).status();
        let _ = Command::new("umount").arg(work.join("tmpfs")).status();
        let _ = fs::remove_dir_all(&work);
    }
    let (mp, tmp, region) = (work.join("mnt"), work.join("tmpfs"), work.join("region.img"));
    fs::create_dir_all(&mp).unwrap();
    fs::create_dir_all(&tmp).unwrap();
    sh(Command::new("mount").args(["-t", "tmpfs", "-o", "size=6g", "tmpfs"]).arg(&tmp));
    sh(Command::new(&bin).arg("mkfs").arg(&region).args(["--size", &format!("{}", size * 2 + (512 << 20))]));
    mount(&bin, &region, &mp);

    let mut figs = Vec::new();
    let w_rp = seq_write(&mp, size);
    let w_tmp = seq_write(&tmp, size);
    figs.push(Fig { name: "sequential write, 1 MiB writes + fsync", rp: mbps(size, w_rp), tmp: mbps(size, w_tmp), unit: "MB/s" });
    drop_caches();
    let (r_rp, n) = seq_read(&mp);
    assert_eq!(n, size);
    let (r_tmp, _) = seq_read(&tmp);
    figs.push(Fig { name: "sequential read (cold page cache)", rp: mbps(size, r_rp), tmp: mbps(size, r_tmp), unit: "MB/s" });
    let (h_rp, _) = seq_read(&mp);
    let (h_tmp, _) = seq_read(&tmp);
    figs.push(Fig { name: "sequential re-read (page cache)", rp: mbps(size, h_rp), tmp: mbps(size, h_tmp), unit: "MB/s" });
    let ops = 20_000;
    let rw_rp = random_4k(&mp, ops);
    let rw_tmp = random_4k(&tmp, ops);
    figs.push(Fig { name: "4 KiB random writes", rp: ops as f64 / rw_rp.as_secs_f64(), tmp: ops as f64 / rw_tmp.as_secs_f64(), unit: "ops/s" });
    let c_rp = create_files(&mp, 10_000);
    let c_tmp = create_files(&tmp, 10_000);
    figs.push(Fig { name: "create 10,000 files", rp: c_rp.as_secs_f64(), tmp: c_tmp.as_secs_f64(), unit: "s" });

    println!("rpramfs benchmark ({} MiB file; region in /dev/shm; {} CPUs)", size >> 20, std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    println!("{:<42} {:>16} {:>16} {:>16}", "workload", "rpramfs", "tmpfs", "rpramfs/tmpfs");
    for f in &figs {
        println!("{:<42} {:>10.1} {:<5} {:>10.1} {:<5} {:>15.2}x", f.name, f.rp, f.unit, f.tmp, f.unit, f.rp / f.tmp);
    }
    let _ = Command::new("umount").arg(&tmp).status();

    // Mount time and daemon memory: an empty 4 GiB region against the same region half full.
    umount(&mp);
    fs::remove_file(&region).unwrap();
    let big = 4u64 << 30;
    sh(Command::new(&bin).arg("mkfs").arg(&region).args(["--size", &big.to_string()]));
    let t_empty = mount(&bin, &region, &mp);
    let (anon_empty, file_empty) = daemon_rss(&mp);
    let buf = vec![0x11u8; 1 << 20];
    let mut f = File::create(mp.join("half")).unwrap();
    for _ in 0..((big / 2) >> 20) {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    umount(&mp);
    let t_half = mount(&bin, &region, &mp);
    let (anon_half, file_half) = daemon_rss(&mp);
    println!("mount of a 4 GiB region: empty {:.3} s, half full {:.3} s (includes the walk that rebuilds the allocator)", t_empty.as_secs_f64(), t_half.as_secs_f64());
    println!(
        "daemon RSS after mount: empty {} KiB anonymous + {} KiB region mapping; half full {} KiB anonymous + {} KiB region mapping",
        anon_empty, file_empty, anon_half, file_half
    );
    umount(&mp);
    let _ = fs::remove_dir_all(&work);
}
