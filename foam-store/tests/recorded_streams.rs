//! The protocol decoder against real CRIU 4.1.1 page-server traffic (fixtures/page-server).

use foam_store::protocol::*;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/page-server/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The subject process's pattern (fixtures/page-server/README.md).
fn pattern_word(region: u64, off: u64) -> u64 {
    let x = 7_042_416u64 ^ region.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ off.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 31)
}

#[test]
fn full_dump_stream() {
    let rx = fixture("dump-4m.rx.bin");
    let msgs = decode_stream(&rx).unwrap();
    assert_eq!(msgs.len(), 21);
    let cmds: Vec<Cmd> = msgs.iter().map(|m| m.header.cmd).collect();
    assert_eq!(cmds[0], Cmd::Open2);
    assert_eq!(Target::decode(msgs[0].header.dst_id).unwrap(), Target::Shmem(10157));
    assert_eq!(cmds[2], Cmd::Open2);
    assert_eq!(Target::decode(msgs[2].header.dst_id).unwrap(), Target::Pid(9603));
    assert_eq!(*cmds.last().unwrap(), Cmd::ForceClose);
    // The task image: 17 ADD_F with data, 1036 pages, ascending and non-overlapping.
    let task: Vec<&Message> = msgs[3..20].iter().collect();
    assert!(task.iter().all(|m| m.header.cmd == Cmd::AddF && m.header.flags & PE_PRESENT != 0));
    assert_eq!(task.iter().map(|m| m.header.nr_pages as u64).sum::<u64>(), 1036);
    for w in task.windows(2) {
        assert!(w[0].header.vaddr + w[0].header.nr_pages as u64 * PAGE_SIZE <= w[1].header.vaddr);
    }
    // The shared region (shmem image, offset 0) carries region 2's pattern.
    let shm = &msgs[1];
    assert_eq!(shm.header.nr_pages, 64);
    for (i, chunk) in rx[shm.data.clone()].chunks(8).enumerate().step_by(97) {
        assert_eq!(u64::from_le_bytes(chunk.try_into().unwrap()), pattern_word(2, i as u64 * 8));
    }
    // The private region: 0x7f3f4f600000 + 4 MiB, pages 512..527 never sent.
    let base = 0x7f3f_4f60_0000u64;
    let mut pages = 0;
    for m in &task {
        let (start, end) = (m.header.vaddr, m.header.vaddr + m.header.nr_pages as u64 * PAGE_SIZE);
        if start >= base && end <= base + (4 << 20) {
            assert!(end <= base + 512 * PAGE_SIZE || start >= base + 528 * PAGE_SIZE, "untouched pages were sent");
            pages += m.header.nr_pages;
            let data = &rx[m.data.clone()];
            let off = start - base;
            assert_eq!(u64::from_le_bytes(data[..8].try_into().unwrap()), pattern_word(1, off));
        }
    }
    assert_eq!(pages, 1008);
    // Replies: OPEN2 → 0 (no parent) twice, FORCE_CLOSE → int32 0.
    assert_eq!(fixture("dump-4m.tx.bin"), vec![0, 0, 0, 0, 0, 0]);
    let expected_reply: usize = msgs.iter().map(|m| m.header.cmd.reply_len()).sum();
    assert_eq!(expected_reply, 6);
}

#[test]
fn lazy_pages_get_requests_use_bare_pids() {
    let rx = fixture("lazy-1m.rx.bin");
    let msgs = decode_stream(&rx).unwrap();
    assert!(!msgs.is_empty());
    let gets: Vec<&Message> = msgs.iter().filter(|m| m.header.cmd == Cmd::Get).collect();
    assert!(!gets.is_empty());
    // GET's dst_id is the bare pid: the low byte is not a type tag (shifting it would give nonsense).
    let pid = gets[0].header.dst_id;
    assert!(gets.iter().all(|m| m.header.dst_id == pid && m.data.is_empty()));
}

// ---- The receiver and the GET server fed with the same recordings ------------------------------

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};

use foam_store::foam::{FileMode, FoamFile};
use foam_store::lazy_server::{self, LazySpace};
use foam_store::ranges::RangeMap;
use foam_store::receiver::Receiver;
use foam_store::spaces::Spaces;
use foam_store::Error;

/// A socket stand-in: reads the recorded client bytes, collects what the server answers.
struct Duplex {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Duplex {
    fn new(input: Vec<u8>) -> Duplex {
        Duplex { input: Cursor::new(input), output: Vec::new() }
    }
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl foam_store::receiver::Session for Duplex {}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn spaces(dir: &std::path::Path) -> Spaces {
    Spaces::create(dir, FileMode::probe(dir).unwrap(), foam_store::foam::DirectWrites::IfOffered).unwrap()
}

#[test]
fn receiver_stores_a_real_dump_and_answers_like_criu_expects() {
    let dir = tempfile::tempdir().unwrap();
    let sp = spaces(dir.path());
    let none = BTreeMap::new();
    let mut sock = Duplex::new(fixture("dump-4m.rx.bin"));
    let report = Receiver::new(&sp, &none, false).serve(&mut sock).unwrap();
    assert_eq!(sock.output, fixture("dump-4m.tx.bin"));
    assert_eq!(report.pages_data, 1036 + 64);
    assert_eq!(report.pages_parent, 0);
    let task = &report.targets[&Target::Pid(9603)];
    assert_eq!(task.ranges.pages(), 1036);
    // Read back through FOAM (CRCs checked): the private region's pattern, the hole absent.
    let base = 0x7f3f_4f60_0000u64;
    let f = sp.get_or_create(Target::Pid(9603)).unwrap();
    let mut page = vec![0u8; 4096];
    for p in (0..1024u64).filter(|p| !(512..528).contains(p)).step_by(37) {
        f.read_pages(base + p * PAGE_SIZE, &mut page).unwrap();
        assert_eq!(u64::from_le_bytes(page[8..16].try_into().unwrap()), pattern_word(1, p * PAGE_SIZE + 8));
    }
    assert!(task.ranges.covered(base + 512 * PAGE_SIZE, base + 528 * PAGE_SIZE).is_empty());
    let shm = sp.get_or_create(Target::Shmem(10157)).unwrap();
    shm.read_pages(63 * PAGE_SIZE, &mut page).unwrap();
    assert_eq!(u64::from_le_bytes(page[..8].try_into().unwrap()), pattern_word(2, 63 * PAGE_SIZE));
}

#[test]
fn receiver_replies_has_parent_as_configured_and_stops_at_a_cut_session() {
    // The recorded has_parent=1 exchange: both OPEN2 replies 1, FORCE_CLOSE 0.
    let dir = tempfile::tempdir().unwrap();
    let sp = spaces(dir.path());
    let none = BTreeMap::new();
    let mut sock = Duplex::new(fixture("dump-has-parent.rx.bin"));
    Receiver::new(&sp, &none, true).serve(&mut sock).unwrap();
    assert_eq!(sock.output, fixture("dump-has-parent.tx.bin"));
    // The pre-dump that CRIU aborted: PARENT answered with an int32, then EOF mid-session.
    let mut sock = Duplex::new(fixture("pre-dump.rx.bin"));
    let e = Receiver::new(&sp, &none, false).serve(&mut sock).unwrap_err();
    assert!(matches!(e, Error::SessionCut), "{e}");
    assert_eq!(sock.output, fixture("pre-dump.tx.bin"));
}

fn msg(cmd: Cmd, flags: u16, nr_pages: u32, vaddr: u64, target: Target, fill: Option<u8>) -> Vec<u8> {
    let mut v = Header { cmd, flags, nr_pages, vaddr, dst_id: target.encode() }.encode().to_vec();
    if let Some(b) = fill {
        v.extend(std::iter::repeat_n(b, nr_pages as usize * 4096));
    }
    v
}

#[test]
fn a_final_dump_with_its_parent_elsewhere_records_unchanged_pages_as_unsent() {
    // PPP: no earlier pass. Tasks get "a parent exists", shared memory does not.
    let dir = tempfile::tempdir().unwrap();
    let sp = spaces(dir.path());
    let (t, shm) = (Target::Pid(77), Target::Shmem(5));
    let p = PAGE_SIZE;
    let mut s = msg(Cmd::Open2, 0, 0, 0, t, None);
    s.extend(msg(Cmd::AddF, PE_PARENT, 6, 0x10 * p, t, None));
    s.extend(msg(Cmd::AddF, PE_PRESENT, 1, 0x16 * p, t, Some(0xDD)));
    s.extend(msg(Cmd::AddF, PE_PARENT, 3, 0x17 * p, t, None));
    s.extend(msg(Cmd::Open2, 0, 0, 0, shm, None));
    s.extend(msg(Cmd::AddF, PE_PRESENT, 2, 0, shm, Some(0xEE)));
    s.extend(msg(Cmd::Close, 0, 0, 0, t, None));
    let none = BTreeMap::new();
    let mut sock = Duplex::new(s);
    let r = Receiver::new(&sp, &none, false).parent_elsewhere().serve(&mut sock).unwrap();
    assert_eq!(sock.output, vec![1, 0, 0, 0, 0, 0]);
    assert_eq!((r.pages_data, r.pages_parent), (3, 9));
    let task = &r.targets[&t];
    let spans = |m: &RangeMap| m.to_vec().iter().map(|r| (r.start / p, r.end / p)).collect::<Vec<_>>();
    assert_eq!(spans(&task.unsent), vec![(0x10, 0x16), (0x17, 0x1a)]);
    assert_eq!(spans(&task.ranges), vec![(0x16, 0x17)]);
    assert!(r.targets[&shm].unsent.is_empty());
}

#[test]
fn an_incremental_pass_overwrites_in_place_and_keeps_parent_pages() {
    let dir = tempfile::tempdir().unwrap();
    let sp = spaces(dir.path());
    let t = Target::Pid(77);
    let p = PAGE_SIZE;
    // Pass 1: 8 lazy-capable pages of 0xAA and 2 non-lazy pages of 0xBB.
    let mut s1 = msg(Cmd::Open2, 0, 0, 0, t, None);
    s1.extend(msg(Cmd::AddF, PE_PRESENT | PE_LAZY, 8, 0x10 * p, t, Some(0xAA)));
    s1.extend(msg(Cmd::AddF, PE_PRESENT, 2, 0x40 * p, t, Some(0xBB)));
    s1.extend(msg(Cmd::Close, 0, 0, 0, t, None));
    let none = BTreeMap::new();
    let r1 = Receiver::new(&sp, &none, false).serve(&mut Duplex::new(s1)).unwrap();
    // Pass 2: pages 0x12..0x14 dirty (0xCC), the rest of the first run and the second run unchanged.
    let mut s2 = msg(Cmd::Open2, 0, 0, 0, t, None);
    s2.extend(msg(Cmd::AddF, PE_PARENT, 2, 0x10 * p, t, None));
    s2.extend(msg(Cmd::AddF, PE_PRESENT | PE_LAZY, 2, 0x12 * p, t, Some(0xCC)));
    s2.extend(msg(Cmd::AddF, PE_PARENT, 4, 0x14 * p, t, None));
    s2.extend(msg(Cmd::AddF, PE_PARENT, 2, 0x40 * p, t, None));
    s2.extend(msg(Cmd::ForceClose, 0, 0, 0, t, None));
    let prev: BTreeMap<Target, RangeMap> = r1.targets.iter().map(|(t, r)| (*t, r.ranges.clone())).collect();
    let mut sock = Duplex::new(s2);
    let r2 = Receiver::new(&sp, &prev, true).serve(&mut sock).unwrap();
    assert_eq!(sock.output, vec![1, 0, 0, 0, 0]);
    assert_eq!((r2.pages_data, r2.pages_parent), (2, 8));
    // Lazy flags survive from pass 1 for the parent pages.
    let ranges = r2.targets[&t].ranges.to_vec();
    assert_eq!(ranges.len(), 2);
    assert_eq!((ranges[0].start, ranges[0].end, ranges[0].lazy()), (0x10 * p, 0x18 * p, true));
    assert_eq!((ranges[1].start, ranges[1].end, ranges[1].lazy()), (0x40 * p, 0x42 * p, false));
    let f = sp.get_or_create(t).unwrap();
    let mut buf = vec![0u8; 8 * 4096];
    f.read_pages(0x10 * p, &mut buf).unwrap();
    let want: Vec<u8> = [[0xAA; 2 * 4096], [0xCC; 2 * 4096], [0xAA; 2 * 4096], [0xAA; 2 * 4096]].concat();
    assert_eq!(buf, want);
    // A hole for pages no pass stored is refused.
    let mut bad = msg(Cmd::Open2, 0, 0, 0, t, None);
    bad.extend(msg(Cmd::AddF, PE_PARENT, 1, 0x90 * p, t, None));
    let e = Receiver::new(&sp, &prev, true).serve(&mut Duplex::new(bad)).unwrap_err();
    assert!(matches!(e, Error::ParentMissing { vaddr, .. } if vaddr == 0x90 * p), "{e}");
}

/// A page whose bytes name its address space and page number.
fn marked_page(space: u8, page: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (page.wrapping_mul(31) ^ i ^ (space as u64 * 101)) as u8).collect()
}

#[test]
fn many_runs_in_flight_land_in_order_at_their_addresses() {
    // 48 MiB across two address spaces in interleaved, discontiguous pieces: more than the
    // receiver keeps in flight, so the session waits on the writer many times.
    let dir = tempfile::tempdir().unwrap();
    let sp = spaces(dir.path());
    let (a, b) = (Target::Pid(11), Target::Shmem(12));
    let mut s = Vec::new();
    let mut sent = Vec::new();
    for round in 0..24u64 {
        for (t, mark) in [(a, 1u8), (b, 2u8)] {
            // 256 pages at a gap of 64 from the previous piece, so runs end at every piece.
            let first = round * 320;
            s.extend(msg(Cmd::Open2, 0, 0, 0, t, None));
            s.extend(Header { cmd: Cmd::AddF, flags: PE_PRESENT, nr_pages: 256, vaddr: first * PAGE_SIZE, dst_id: t.encode() }.encode());
            for pg in first..first + 256 {
                s.extend(marked_page(mark, pg));
            }
            sent.push((t, mark, first));
        }
    }
    s.extend(msg(Cmd::Close, 0, 0, 0, a, None));
    let none = BTreeMap::new();
    let mut sock = Duplex::new(s);
    let r = Receiver::new(&sp, &none, false).serve(&mut sock).unwrap();
    assert_eq!(r.pages_data, 24 * 2 * 256);
    assert_eq!(*sock.output.last().unwrap(), 0);
    let mut page = vec![0u8; 4096];
    for (t, mark, first) in sent {
        let f = sp.get_or_create(t).unwrap();
        for pg in [first, first + 1, first + 128, first + 255] {
            f.read_pages(pg * PAGE_SIZE, &mut page).unwrap();
            assert!(page == marked_page(mark, pg), "{t:?} page {pg}");
        }
        assert!(r.targets[&t].ranges.covered((first + 256) * PAGE_SIZE, (first + 320) * PAGE_SIZE).is_empty());
    }
}

#[test]
fn a_failing_store_write_is_reported_with_its_file_and_gets_no_closing_reply() {
    let dir = tempfile::tempdir().unwrap();
    let sp = spaces(dir.path());
    let t = Target::Pid(13);
    // The data file's name is taken by a directory: the writer thread cannot open it.
    std::fs::create_dir(dir.path().join("13.foam")).unwrap();
    std::fs::create_dir(dir.path().join("13.foam.0")).unwrap();
    let mut s = msg(Cmd::Open2, 0, 0, 0, t, None);
    for i in 0..12u64 {
        s.extend(msg(Cmd::AddF, PE_PRESENT, 256, i * 512 * PAGE_SIZE, t, Some(i as u8)));
    }
    s.extend(msg(Cmd::Close, 0, 0, 0, t, None));
    let none = BTreeMap::new();
    let mut sock = Duplex::new(s);
    let e = Receiver::new(&sp, &none, false).serve(&mut sock).unwrap_err();
    match &e {
        Error::Io { path, .. } => assert!(path.file_name().unwrap().to_str().unwrap().starts_with("13.foam"), "{e}"),
        other => panic!("expected the store's I/O error, got {other}"),
    }
    // Only the OPEN2 reply went out: CRIU never hears that the dump was stored.
    assert_eq!(sock.output, vec![0]);
}

/// The recorded lazy-pages session: FOAM holds what CRIU's images served, and our answers to the
/// recorded GETs must be byte-identical to the recorded replies.
fn lazy_fixture(dir: &std::path::Path) -> (BTreeMap<u32, LazySpace>, Vec<u8>, Vec<u8>) {
    let rx = fixture("lazy-1m.rx.bin");
    let tx = fixture("lazy-1m.tx.bin");
    // The replies, then the int32 answer to FORCE_CLOSE.
    assert_eq!(tx[tx.len() - 4..], [0, 0, 0, 0]);
    let replies = decode_stream(&tx[..tx.len() - 4]).unwrap();
    let pid = replies[0].header.dst_id as u32;
    let file = FoamFile::create(dir, &pid.to_string(), FileMode::probe(dir).unwrap()).unwrap();
    let mut lazy = RangeMap::new();
    for r in &replies {
        file.write_pages(r.header.vaddr, &tx[r.data.clone()]).unwrap();
        lazy.insert(r.header.vaddr, r.header.vaddr + r.header.nr_pages as u64 * PAGE_SIZE, PE_PRESENT | PE_LAZY);
    }
    let mut spaces = BTreeMap::new();
    spaces.insert(pid, LazySpace { file: std::sync::Arc::new(file), lazy });
    (spaces, rx, tx)
}

#[test]
fn get_server_answers_recorded_requests_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (spaces, rx, tx) = lazy_fixture(dir.path());
    let mut sock = Duplex::new(rx);
    let report = lazy_server::serve(&mut sock, &spaces, None).unwrap();
    assert_eq!(sock.output.len(), tx.len());
    assert!(sock.output == tx, "replies differ from what CRIU's own images served");
    assert_eq!(report.requests as usize, decode_stream(&tx[..tx.len() - 4]).unwrap().len());
}

#[test]
fn get_server_refuses_damaged_and_unknown_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (spaces, rx, _) = lazy_fixture(dir.path());
    let pid = *spaces.keys().next().unwrap();
    let first_get = decode_stream(&rx).unwrap().into_iter().find(|m| m.header.cmd == Cmd::Get).unwrap().header;
    // A GET for a page outside the lazy ranges.
    let outside = Header { vaddr: 0x1000, ..first_get }.encode().to_vec();
    let e = lazy_server::serve(&mut Duplex::new(outside), &spaces, None).unwrap_err();
    assert!(matches!(e, Error::UnknownPage { vaddr: 0x1000, .. }), "{e}");
    // A GET for zero pages.
    let zero = Header { nr_pages: 0, ..first_get }.encode().to_vec();
    assert!(lazy_server::serve(&mut Duplex::new(zero), &spaces, None).is_err());
    // One flipped byte in the FOAM data: the page is named and nothing of it is sent.
    use std::os::unix::fs::FileExt;
    let (name, off) = match FileMode::probe(dir.path()).unwrap() {
        FileMode::Single => (format!("{pid}.foam"), first_get.vaddr),
        FileMode::Split { segment_bits } => (format!("{pid}.foam.{:x}", first_get.vaddr >> segment_bits), first_get.vaddr & ((1 << segment_bits) - 1)),
    };
    let f = std::fs::OpenOptions::new().write(true).open(dir.path().join(name)).unwrap();
    f.write_all_at(&[0x5a], off + 7).unwrap();
    let mut sock = Duplex::new(Header { nr_pages: 1, ..first_get }.encode().to_vec());
    let e = lazy_server::serve(&mut sock, &spaces, None).unwrap_err();
    assert!(matches!(e, Error::BadPage { vaddr: v, .. } if v == first_get.vaddr), "{e}");
    assert!(e.to_string().contains(&pid.to_string()));
    assert!(sock.output.is_empty(), "a damaged page must not be sent");
}
