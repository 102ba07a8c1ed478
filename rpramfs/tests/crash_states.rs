//! Crash states: every store the region API performs is logged; for short workloads, every
//! prefix of the store log (and every prefix plus half of the next store, a torn write) must
//! mount, pass fsck, and equal the state before or after the operation in progress, with as many
//! free blocks as that state.
//!
//! Direct writes are replayed too: the workloads lease blocks, fill them as kup's page server
//! does (here through the region's logged store API, so the fills sit in the log between the
//! daemon's own stores) and commit them. A lease and its fills change nothing a mount can see:
//! up to the commit, and in a crash between lease and commit, the file is as before the lease
//! and the leased blocks are free again.

use std::collections::{BTreeMap, HashMap};

use rpramfs::fs::lease::{CommitRequest, LeaseRequest};
use rpramfs::fs::{Creator, Fs, MkfsOptions, OpenOptions, SetAttr};
use rpramfs::layout::BlockNo;
use rpramfs::region::{Region, Store};

const ROOT: u64 = 1;
const WHO: Creator = Creator { uid: 0, gid: 0 };
/// The file handle the direct writes lease on.
const FH: u64 = 1;

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
    /// Lease `n` blocks for file pages `page..` (direct write).
    Lease(&'static str, u64, usize),
    /// Fill the lease at `page`, one store per block, as the direct writer does.
    Fill(&'static str, u64),
    /// Commit the first `k` blocks of the lease at `page` with their CRCs (the rest is freed).
    Commit(&'static str, u64, usize),
    /// The same as `k` one-page extents at every other page from `page` on (scattered pages in
    /// one transaction).
    CommitScattered(&'static str, u64, usize),
    /// A commit whose first CRC does not match the filled block: refused with EIO.
    CommitBadCrc(&'static str, u64, usize),
}

impl Op {
    fn is_direct(self) -> bool {
        matches!(self, Op::Lease(..) | Op::Fill(..) | Op::Commit(..) | Op::CommitScattered(..) | Op::CommitBadCrc(..))
    }

    /// Whether a mount can see the operation's effect: a lease, its fills and a refused commit
    /// leave the file system as it was.
    fn changes_state(self) -> bool {
        !matches!(self, Op::Lease(..) | Op::Fill(..) | Op::CommitBadCrc(..))
    }
}

/// Outstanding leases of the workload: (file, first page) → lease id, leased blocks.
type Leases = HashMap<(&'static str, u64), (u64, Vec<u32>)>;

/// What a direct write stores at `page` (distinct from what [`data`] writes there).
fn lease_data(page: u64, blocks: usize) -> Vec<u8> {
    data(7919 + page, blocks * 4096)
}

fn lease_crcs(page: u64, k: usize) -> Vec<u32> {
    lease_data(page, k).chunks(4096).map(crc32fast::hash).collect()
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

fn apply(fs: &Fs, op: Op, leases: &mut Leases) {
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
        Op::Lease(p, page, n) => {
            let answer = fs.lease(FH, ino(p), &LeaseRequest { n }).unwrap();
            let blocks: Vec<u32> = answer.blocks().expect("a lease answers its blocks").collect();
            assert_eq!(blocks.len(), n);
            leases.insert((p, page), (answer.id.get(), blocks));
        }
        Op::Fill(p, page) => {
            let (_, blocks) = &leases[&(p, page)];
            for (b, bytes) in blocks.iter().zip(lease_data(page, blocks.len()).chunks(4096)) {
                fs.region().write(BlockNo(*b).offset(), bytes).unwrap();
            }
        }
        Op::Commit(p, page, k) => {
            let (id, _) = leases.remove(&(p, page)).unwrap();
            fs.commit_lease(FH, ino(p), &CommitRequest { id, extents: vec![(page * 4096, k)], crcs: lease_crcs(page, k) }).unwrap();
        }
        Op::CommitScattered(p, page, k) => {
            let (id, _) = leases.remove(&(p, page)).unwrap();
            let extents = (0..k as u64).map(|i| ((page + 2 * i) * 4096, 1)).collect();
            fs.commit_lease(FH, ino(p), &CommitRequest { id, extents, crcs: lease_crcs(page, k) }).unwrap();
        }
        Op::CommitBadCrc(p, page, k) => {
            let (id, _) = leases.remove(&(p, page)).unwrap();
            let mut crcs = lease_crcs(page, k);
            crcs[0] ^= 1;
            let e = fs.commit_lease(FH, ino(p), &CommitRequest { id, extents: vec![(page * 4096, k)], crcs }).unwrap_err();
            assert_eq!(e.errno(), libc::EIO);
        }
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

/// Mounts a copy of `image`; checks that the mount and fsck are clean; returns the tree and the
/// number of free blocks the mount walk found.
fn mount_and_check(image: &[u8], what: &dyn Fn() -> String) -> (BTreeMap<String, String>, u64) {
    let r = Region::memfd_from(image).unwrap();
    let (fs, report) = Fs::open(r, &OpenOptions::default()).unwrap_or_else(|e| panic!("{}: mount failed: {e}", what()));
    assert!(report.errors.is_empty(), "{}: {:?}", what(), report.errors);
    let f = rpramfs::fsck::check(&fs, &report, true, false);
    assert!(f.clean(), "{}: fsck: {:?}", what(), f.errors);
    (dump(&fs), report.free_blocks)
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

    // Each state: the tree and the free blocks a mount of it finds.
    let mut states = vec![mount_and_check(&base, &|| format!("{ops:?}: base"))];
    let mut stores: Vec<Store> = Vec::new();
    let mut bounds = vec![0usize];
    let mut leases = Leases::new();
    for &op in ops {
        apply(&fs, op, &mut leases);
        stores.extend(fs.region().take_store_log());
        bounds.push(stores.len());
        let tree = dump(&fs);
        if op.changes_state() {
            let free = mount_and_check(&fs.region().snapshot(), &|| format!("{ops:?}: after {op:?}")).1;
            states.push((tree, free));
        } else {
            // Not measured but required: the same tree and the same free blocks as before.
            let before = states.last().unwrap().clone();
            assert_eq!(tree, before.0, "{ops:?}: {op:?} changed the tree");
            states.push(before);
        }
    }

    // The daemon's own count agrees: what it holds free, plus what is still leased, is what the
    // next mount finds free (a commit of k < n and a refused commit gave their blocks back).
    let still_leased: usize = leases.values().map(|(_, b)| b.len()).sum();
    let u = fs.usage();
    assert_eq!(u.free_blocks + still_leased as u64, states.last().unwrap().1, "{ops:?}: the daemon's free count");

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
            let got = mount_and_check(&image, &|| format!("{ops:?}: {what} {k}/{} (op {j})", stores.len()));
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
        // Direct writes (lease, fill, commit), "a" holding 20,000 bytes (pages 0..4) at the start.
        // Fresh pages of a new file written the normal way first; all of the lease committed.
        vec![Creat("b"), Write("b", 0, 10_000), Lease("b", 3, 4), Fill("b", 3), Commit("b", 3, 4)],
        // Two of five leased blocks committed, three freed; a normal write may then reuse them.
        vec![Creat("b"), Write("b", 0, 10_000), Lease("b", 3, 5), Fill("b", 3), Commit("b", 3, 2), Write("b", 0, 30_000)],
        // Overwriting existing pages, and the last partial page with the file growing.
        vec![Lease("a", 1, 3), Fill("a", 1), Commit("a", 1, 3)],
        // Scattered pages of one lease, over data and past the end, in one transaction.
        vec![Lease("a", 1, 5), Fill("a", 1), CommitScattered("a", 1, 4)],
        vec![Lease("a", 4, 2), Fill("a", 4), Commit("a", 4, 2)],
        // The daemon's own stores between lease, fills and commit.
        vec![Lease("a", 8, 2), Write("a", 0, 5000), Fill("a", 8), Truncate("a", 3000), Commit("a", 8, 2)],
        // A crash between lease and commit: the file as before, the leased blocks free.
        vec![Lease("a", 2, 4), Fill("a", 2)],
        vec![Creat("b"), Write("b", 0, 5000), Lease("b", 0, 3), Fill("b", 0)],
        // A commit whose CRC does not match is refused and changes nothing; the next one works.
        vec![Lease("a", 0, 2), Fill("a", 0), CommitBadCrc("a", 0, 2), Lease("a", 0, 2), Fill("a", 0), Commit("a", 0, 1)],
    ];
    let (mut total, mut direct, mut direct_workloads) = (0, 0, 0);
    let t0 = std::time::Instant::now();
    for w in &workloads {
        let n = check_workload(w);
        total += n;
        if w.iter().any(|op| op.is_direct()) {
            direct += n;
            direct_workloads += 1;
        }
    }
    eprintln!(
        "{} workloads, {total} crash states mounted, fsck'd and compared, of which {direct} from {direct_workloads} direct-write workloads ({:.1} s)",
        workloads.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(total > 200);
    assert!(direct > 100);
}
