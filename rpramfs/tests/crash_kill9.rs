//! 100 rounds of kill -9 of the rpramfs daemon under a write-heavy workload: every fsync'd byte
//! must be there after the next mount, and fsck must be clean after every crash.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{daemon_pid, pattern, run};


#[derive(Default)]
struct Acked {
    files: Vec<(String, u32, usize)>,
    log_len: usize,
}

fn log_record(n: usize) -> Vec<u8> {
    format!("record {n:08} {}\n", "x".repeat(n % 97)).into_bytes()
}

fn expected_log(upto_records: usize) -> Vec<u8> {
    (0..upto_records).flat_map(log_record).collect()
}

fn writer(mp: &Path, round: u64, acked: &Mutex<Acked>, log_records: &Mutex<usize>, stop: &AtomicBool) {
    let mut rng = round * 7919 + 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let name = format!("r{round:03}-{i:04}");
        let len = (next() % 300_000) as usize + 1;
        let data = pattern(round * 100_000 + i, len);
        let ok = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(mp.join(&name))?;
            f.write_all(&data)?;
            f.sync_all()?;
            Ok(())
        })();
        if ok.is_err() {
            return;
        }
        acked.lock().unwrap().files.push((name, crc32fast::hash(&data), len));
        // Append one record to the shared log and fsync it.
        let mut n = log_records.lock().unwrap();
        let rec = log_record(*n);
        let off: usize = expected_log(*n).len();
        let ok = (|| -> std::io::Result<()> {
            let f = OpenOptions::new().create(true).write(true).open(mp.join("log"))?;
            f.write_all_at(&rec, off as u64)?;
            f.sync_data()?;
            Ok(())
        })();
        if ok.is_err() {
            return;
        }
        *n += 1;
        acked.lock().unwrap().log_len = off + rec.len();
    }
}

fn verify(mp: &Path, acked: &Acked, records: usize) {
    for (name, crc, len) in &acked.files {
        let data = fs::read(mp.join(name)).unwrap_or_else(|e| panic!("acknowledged file {name} unreadable: {e}"));
        assert_eq!(data.len(), *len, "{name}: length");
        assert_eq!(crc32fast::hash(&data), *crc, "{name}: content");
    }
    if records > 0 {
        let log = fs::read(mp.join("log")).unwrap();
        let want = expected_log(records);
        assert!(log.len() >= want.len(), "log lost fsync'd records: {} < {}", log.len(), want.len());
        assert!(log[..want.len()] == want[..], "log content differs");
    }
}

#[test]
fn kill9_rounds_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("region.img");
    let mp = dir.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let (rc, out) = run(&["mkfs", region.to_str().unwrap(), "--size", "256M"]);
    assert_eq!(rc, 0, "{out}");
    let acked = Arc::new(Mutex::new(Acked::default()));
    let records = Arc::new(Mutex::new(0usize));
    let log = dir.path().join("daemon.log");
    let rounds = std::env::var("RPRAMFS_CRASH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(100u64);
    let mut total_files = 0;
    for round in 0..rounds {
        let (rc, out) = run(&["mount", region.to_str().unwrap(), mp.to_str().unwrap(), "--log", log.to_str().unwrap()]);
        assert_eq!(rc, 0, "round {round}: mount failed: {out}");
        let pid = daemon_pid(&out);
        // Everything acknowledged so far is here after the previous crash.
        verify(&mp, &acked.lock().unwrap(), *records.lock().unwrap());
        // Old files are deleted now and then, so the region keeps turning over.
        if round % 10 == 9 {
            let mut a = acked.lock().unwrap();
            let half = a.files.len() / 2;
            let keep = a.files.split_off(half);
            for (name, _, _) in a.files.drain(..) {
                fs::remove_file(mp.join(name)).unwrap();
            }
            a.files = keep;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let (mp, acked, records, stop) = (mp.clone(), acked.clone(), records.clone(), stop.clone());
            std::thread::spawn(move || writer(&mp, round, &acked, &records, &stop))
        };
        std::thread::sleep(Duration::from_millis(20 + (round * 37) % 80));
        // SAFETY: sending a signal to the daemon we started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        // Reap it if it is our grandchild's zombie: wait until the pid is gone or a zombie.
        for _ in 0..100 {
            let st = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if st.is_empty() || st.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (rc, out) = run(&["fsck", region.to_str().unwrap()]);
        assert_eq!(rc, 0, "round {round}: fsck after kill -9 not clean:\n{out}");
        total_files = acked.lock().unwrap().files.len();
    }
    let (rc, out) = run(&["mount", region.to_str().unwrap(), mp.to_str().unwrap(), "--log", log.to_str().unwrap()]);
    assert_eq!(rc, 0, "{out}");
    verify(&mp, &acked.lock().unwrap(), *records.lock().unwrap());
    eprintln!(
        "{rounds} kill -9 rounds: {total_files} acknowledged files and {} fsync'd log records verified",
        *records.lock().unwrap()
    );
    assert!(total_files > rounds as usize, "the workload wrote too little ({total_files} files)");
    assert!(*records.lock().unwrap() > rounds as usize);
    let st = Command::new("umount").arg(&mp).status().unwrap();
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(300));
    let (rc, out) = run(&["fsck", "--scrub", region.to_str().unwrap()]);
    assert_eq!(rc, 0, "{out}");
    let (_, info) = run(&["info", region.to_str().unwrap()]);
    assert!(info.contains("clean (last unmount completed)"), "{info}");
}
