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
