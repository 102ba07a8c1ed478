//! Crash states: every store the region API performs is logged; for short workloads, every
//! prefix of the store log (and every prefix plus half of the next store, a torn write) must
//! mount, pass fsck, and equal the state before or after the operation in progress.

use std::collections::BTreeMap;

use rpramfs::fs::{Creator, Fs, MkfsOptions, OpenOptions, SetAttr};
use rpramfs::region::{Region, Store};

const ROOT: u64 = 1;
const WHO: Creator = Creator { uid: 0, gid: 0 };

#[derive(Clone, Copy, Debug)]
enum Op {
    Creat(&'static str),
    Write(&'static str, u64, usize),
    PwriteHigh(&'static str),
    Truncate(&'static str, u64),
    Punch(&'static str, u64, u64),
    Link(&'static str, &'static str),
    Rename(&'static str, &'static str),
    Unlink(&'static str),
    Fsync,
}

fn resolve(fs: &Fs, path: &str) -> (u64, Vec<u8>) {
    let mut parts: Vec<&str> = path.split('/').collect();
    let name = parts.pop().unwrap();
    let mut dir = ROOT;
    for p in parts {
        dir = fs.lookup(dir, p.as_bytes()).unwrap().ino;
    }
    (dir, name.as_bytes().to_vec())
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u64 * 31 + seed * 17) % 251) as u8).collect()
}

fn apply(fs: &Fs, op: Op) {
    let ino = |p: &str| {
        let (d, n) = resolve(fs, p);
        fs.lookup(d, &n).unwrap().ino
    };
    match op {
        Op::Creat(p) => {
            let (d, n) = resolve(fs, p);
            fs.create(d, &n, libc::S_IFREG | 0o644, 0, WHO, None).unwrap();
        }
        Op::Write(p, off, len) => {
            fs.write_file(ino(p), off, &data(off, len)).unwrap();
        }
        Op::PwriteHigh(p) => {
            fs.write_file(ino(p), 1 << 47, b"at two to the forty-seventh").unwrap();
        }
        Op::Truncate(p, size) => {
            fs.setattr(ino(p), SetAttr { size: Some(size), ..Default::default() }).unwrap();
        }
        Op::Punch(p, off, len) => fs.fallocate(ino(p), off, len, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE).unwrap(),
        Op::Link(a, b) => {
            let (d, n) = resolve(fs, b);
            fs.link(ino(a), d, &n).unwrap();
        }
        Op::Rename(a, b) => {
            let (da, na) = resolve(fs, a);
            let (db, nb) = resolve(fs, b);
            fs.rename(da, &na, db, &nb, 0).unwrap();
        }
        Op::Unlink(p) => {
            let (d, n) = resolve(fs, p);
            fs.remove(d, &n, false).unwrap();
        }
        Op::Fsync => {} // every operation is already durable when it returns
    }
}

/// A logical picture of the whole tree: path → type, size, links, and the data segments.
fn dump(fs: &Fs) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(ROOT, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let mut off = 0;
        loop {
            let ents = fs.readdir(dir, off, 64).unwrap();
            if ents.is_empty() {
                break;
            }
            off = ents.last().unwrap().next;
            for e in ents {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let path = format!("{prefix}/{}", String::from_utf8_lossy(&e.name));
                let a = fs.getattr(e.ino).unwrap().inode;
                let mut desc = format!("mode={:o} nlink={} size={}", a.mode, a.nlink, a.size);
                if a.is_dir() {
                    stack.push((e.ino, path.clone()));
                } else {
                    // Data segments via SEEK_DATA / SEEK_HOLE, each with its CRC.
                    let mut pos = 0;
                    while let Ok(start) = fs.seek(e.ino, pos, libc::SEEK_DATA) {
                        let end = fs.seek(e.ino, start, libc::SEEK_HOLE).unwrap();
                        let bytes = fs.read_file(e.ino, start, (end - start) as u32).unwrap();
                        desc += &format!(" [{start}..{end} crc {:08x}]", crc32fast::hash(&bytes));
                        pos = end;
                    }
                }
                out.insert(path, desc);
            }
        }
    }
    out
}

fn apply_store(img: &mut [u8], s: &Store, torn: bool) {
    if let Store::Write { offset, bytes } = s {
        let n = if torn { bytes.len() / 2 } else { bytes.len() };
        img[*offset as usize..*offset as usize + n].copy_from_slice(&bytes[..n]);
    }
}

fn check_workload(ops: &[Op]) -> usize {
    let region = Region::memfd(4 << 20, true).unwrap();
    Fs::mkfs(&region, &MkfsOptions::default()).unwrap();
    let (fs, _) = Fs::open(region, &OpenOptions::default()).unwrap();
    // The starting state: a file with data and a directory.
    fs.create(ROOT, b"a", libc::S_IFREG | 0o644, 0, WHO, None).unwrap();
    let a = fs.lookup(ROOT, b"a").unwrap().ino;
    fs.write_file(a, 0, &data(0, 20_000)).unwrap();
    fs.create(ROOT, b"d", libc::S_IFDIR | 0o755, 0, WHO, None).unwrap();
    fs.region().take_store_log();
    let base = fs.region().snapshot();

    let mut states = vec![dump(&fs)];
    let mut stores: Vec<Store> = Vec::new();
    let mut bounds = vec![0usize];
    for &op in ops {
        apply(&fs, op);
        stores.extend(fs.region().take_store_log());
        bounds.push(stores.len());
        states.push(dump(&fs));
    }

    let mut img = base.clone();
    let mut checked = 0;
    for k in 0..=stores.len() {
        if k > 0 {
            apply_store(&mut img, &stores[k - 1], false);
        }
        let j = bounds.iter().rposition(|&b| b <= k).unwrap().min(ops.len().saturating_sub(1));
        let allowed = [&states[j], &states[(j + 1).min(states.len() - 1)]];
        let mut variants = vec![(img.clone(), "prefix")];
        if let Some(s @ Store::Write { bytes, .. }) = stores.get(k) {
            if bytes.len() > 8 {
                let mut torn = img.clone();
                apply_store(&mut torn, s, true);
                variants.push((torn, "prefix + torn store"));
            }
        }
        for (image, what) in variants {
            let r = Region::memfd_from(&image).unwrap();
            let (fs2, report) = Fs::open(r, &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{ops:?}: {what} {k}/{}: mount failed: {e}", stores.len()));
            assert!(report.errors.is_empty(), "{ops:?}: {what} {k}: {:?}", report.errors);
            let f = rpramfs::fsck::check(&fs2, &report, true, false);
            assert!(f.clean(), "{ops:?}: {what} {k}: fsck: {:?}", f.errors);
            let got = dump(&fs2);
            assert!(
                allowed.iter().any(|s| **s == got),
                "{ops:?}: {what} {k}/{} (op {j}): state is neither before nor after the operation:\n got {got:#?}\n before {:#?}\n after {:#?}",
                stores.len(),
                allowed[0],
                allowed[1]
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn every_store_prefix_is_a_consistent_state() {
    use Op::*;
    let workloads: Vec<Vec<Op>> = vec![
        vec![Creat("b"), Write("b", 0, 10_000), Fsync],
        vec![PwriteHigh("a"), Fsync],
        vec![Write("a", 100, 5000), Truncate("a", 3000)],
        vec![Punch("a", 4096, 4196), Fsync],
        vec![Link("a", "d/a2"), Unlink("a")],
        vec![Rename("a", "d/b")],
        vec![Creat("b"), Write("b", 0, 100), Rename("b", "a")],
        vec![Unlink("a"), Fsync],
        vec![Truncate("a", 0), Write("a", 0, 9000)],
        vec![Creat("x"), Link("x", "y"), Rename("y", "d/z")],
        vec![Write("a", 18_000, 70_000), PwriteHigh("a"), Truncate("a", 5)],
    ];
    let mut total = 0;
    for w in &workloads {
        total += check_workload(w);
    }
    eprintln!("{} workloads, {total} crash states mounted, fsck'd and compared", workloads.len());
    assert!(total > 200);
}
