//! The few CRIU image files kup reads or writes itself (formats in docs/design.md and
//! research/criu-page-server.md §5): `pagemap-*.img` and `pages-*.img` synthesized from FOAM for
//! restore, the dump statistics (`stats-dump`) for the frozen time, and the mappings of `mm-*.img`
//! whose content CRIU's restorer reads itself.
//!
//! Images are a magic header followed by protobuf records, each prefixed with its u32 length. Only
//! varint fields are involved, so a dozen lines of encoding beat a protobuf code generator.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::foam::FoamFile;
use crate::protocol::{Target, PAGE_SIZE, PE_LAZY, PE_PRESENT};
use crate::ranges::RangeMap;
use crate::Error;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const STATS_MAGIC: u32 = 0x5709_3306;
const PSTREE_MAGIC: u32 = 0x5027_3030;
const MM_MAGIC: u32 = 0x5749_2820;
/// The inventory alone has no common magic before its own.
const INVENTORY_MAGIC: u32 = 0x5831_3116;
/// CRIU's CRTOOLS_IMAGES_V1_1.
const IMAGES_V1_1: u64 = 2;
/// CRIU's PRE_DUMP_SPLICE.
const PRE_DUMP_SPLICE: u64 = 1;
/// A pagemap entry's page count is a u32 in CRIU ≤ 4.1.
const MAX_ENTRY_PAGES: u64 = 1 << 30;
const COPY_CHUNK: usize = 1 << 20;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, (field as u64) << 3);
    put_varint(out, v);
}

fn put_record(out: &mut Vec<u8>, msg: &[u8]) {
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg);
}

/// Fields of one protobuf message: (field number, varint value or bytes).
fn fields(mut b: &[u8]) -> Option<Vec<(u32, Field<'_>)>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let field = (key >> 3) as u32;
        match key & 7 {
            0 => out.push((field, Field::Varint(varint(&mut b)?))),
            2 => {
                let len = varint(&mut b)? as usize;
                if b.len() < len {
                    return None;
                }
                out.push((field, Field::Bytes(&b[..len])));
                b = &b[len..];
            }
            5 => {
                b = b.get(4..)?;
            }
            1 => {
                b = b.get(8..)?;
            }
            _ => return None,
        }
    }
    Some(out)
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// What one synthesized pagemap holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynthStats {
    /// Pages copied into `pages-*.img`.
    pub pages_copied: u64,
    /// Pages marked PE_LAZY, left for the lazy-pages server.
    pub pages_lazy: u64,
}

/// Writes `pagemap-<stem>.img` and `pages-<pages_id>.img` into `dir` for one address space.
/// With `lazy`, private anonymous ranges of tasks are marked PE_LAZY and left out of the pages
/// file; everything else is copied from FOAM, page CRCs checked.
pub fn write_restore_images(dir: &Path, target: Target, pages_id: u32, foam: Option<&FoamFile>, ranges: &RangeMap, lazy: bool) -> Result<SynthStats, Error> {
    let mut stats = SynthStats::default();
    let mut map = Vec::new();
    map.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    map.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    let mut head = Vec::new();
    put_field(&mut head, 1, pages_id as u64);
    put_record(&mut map, &head);

    let pages_path = dir.join(format!("pages-{pages_id}.img"));
    let mut pages = BufWriter::with_capacity(COPY_CHUNK, create_private(&pages_path)?);
    let mut chunk = vec![0u8; COPY_CHUNK];
    for r in ranges.iter() {
        let as_lazy = lazy && r.lazy() && matches!(target, Target::Pid(_));
        let mut at = r.start;
        while at < r.end {
            let n = ((r.end - at) / PAGE_SIZE).min(MAX_ENTRY_PAGES);
            let mut e = Vec::new();
            put_field(&mut e, 1, at);
            put_field(&mut e, 2, n);
            put_field(&mut e, 4, if as_lazy { PE_LAZY } else { PE_PRESENT } as u64);
            put_record(&mut map, &e);
            at += n * PAGE_SIZE;
        }
        if as_lazy {
            stats.pages_lazy += r.pages();
            continue;
        }
        let foam = foam.ok_or_else(|| Error::Unsupported(format!("no FOAM file for {}", target.stem())))?;
        let mut at = r.start;
        while at < r.end {
            let len = ((r.end - at) as usize).min(COPY_CHUNK);
            foam.read_pages(at, &mut chunk[..len])?;
            pages.write_all(&chunk[..len]).map_err(|e| Error::io(&pages_path, e))?;
            at += len as u64;
        }
        stats.pages_copied += r.pages();
    }
    pages.into_inner().map_err(|e| Error::io(&pages_path, e.into_error()))?.sync_all().map_err(|e| Error::io(&pages_path, e))?;
    let map_path = dir.join(format!("pagemap-{}.img", target.stem()));
    let mut f = create_private(&map_path)?;
    f.write_all(&map).and_then(|_| f.sync_all()).map_err(|e| Error::io(&map_path, e))?;
    Ok(stats)
}

/// Writes the `inventory.img` of a parent images directory that is no real pre-dump: all a final
/// `criu dump --track-mem --prev-images-dir` reads of it is `dump_uptime` (µs since boot, as
/// /proc/uptime), to tell a pid that was reused since (a process started after it) from the same
/// process. With its parent's pages kept elsewhere (PPP), kup points the final dump at this.
pub fn write_parent_inventory(dir: &Path, dump_uptime_us: u64) -> Result<(), Error> {
    let mut img = INVENTORY_MAGIC.to_le_bytes().to_vec();
    let mut e = Vec::new();
    put_field(&mut e, 1, IMAGES_V1_1);
    put_field(&mut e, 8, dump_uptime_us);
    put_field(&mut e, 9, PRE_DUMP_SPLICE);
    put_record(&mut img, &e);
    let path = dir.join("inventory.img");
    let mut f = create_private(&path)?;
    f.write_all(&img).and_then(|_| f.sync_all()).map_err(|e| Error::io(&path, e))
}

fn create_private(path: &Path) -> Result<File, Error> {
    std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path).map_err(|e| Error::io(path, e))
}

fn not_understood(path: &Path, what: &str) -> Error {
    Error::Unsupported(format!("{} is not a CRIU {what} image this kup understands", path.display()))
}

/// The records of a CRIU image file after its two magic words, `outer` and `magic`; `what` names
/// the image in errors.
fn read_records(path: &Path, outer: u32, magic: u32, what: &str) -> Result<Vec<Vec<u8>>, Error> {
    let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let word = |i: usize| b.get(i..i + 4).map(|w| u32::from_le_bytes(w.try_into().unwrap()));
    if word(0) != Some(outer) || word(4) != Some(magic) {
        return Err(not_understood(path, what));
    }
    let mut out = Vec::new();
    let mut at = 8;
    while at < b.len() {
        let len = word(at).ok_or_else(|| not_understood(path, what))? as usize;
        out.push(b.get(at + 4..at + 4 + len).ok_or_else(|| not_understood(path, what))?.to_vec());
        at += 4 + len;
    }
    Ok(out)
}

/// The tasks of a dump (`pstree.img`): each process's pid and the ids of its threads.
pub fn read_pstree(dir: &Path) -> Result<Vec<(u32, Vec<u32>)>, Error> {
    let path = dir.join("pstree.img");
    let bad = || not_understood(&path, "process tree");
    let mut out = Vec::new();
    for entry in read_records(&path, IMG_COMMON_MAGIC, PSTREE_MAGIC, "process tree")? {
        let (mut pid, mut threads) = (0u32, Vec::new());
        for (f, v) in fields(&entry).ok_or_else(bad)? {
            match (f, v) {
                (1, Field::Varint(v)) => pid = v as u32,
                (5, Field::Varint(v)) => threads.push(v as u32),
                // A packed repeated field.
                (5, Field::Bytes(mut packed)) => {
                    while !packed.is_empty() {
                        let mut v = 0u64;
                        let mut shift = 0;
                        loop {
                            let (&byte, rest) = packed.split_first().ok_or_else(bad)?;
                            packed = rest;
                            v |= ((byte & 0x7f) as u64) << shift;
                            shift += 7;
                            if byte < 0x80 {
                                break;
                            }
                        }
                        threads.push(v as u32);
                    }
                }
                _ => {}
            }
        }
        out.push((pid, threads));
    }
    Ok(out)
}

/// CRIU's own account of a dump (`stats-dump`), times in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DumpStats {
    pub freezing_time_us: u64,
    pub frozen_time_us: u64,
    pub memdump_time_us: u64,
    pub memwrite_time_us: u64,
    pub pages_scanned: u64,
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
}

/// Reads `stats-dump` from a CRIU images directory.
pub fn read_dump_stats(dir: &Path) -> Result<DumpStats, Error> {
    let path = dir.join("stats-dump");
    let bad = || not_understood(&path, "stats");
    let records = read_records(&path, IMG_SERVICE_MAGIC, STATS_MAGIC, "stats")?;
    let entry = records.first().ok_or_else(bad)?;
    let mut s = DumpStats::default();
    for (f, v) in fields(entry).ok_or_else(bad)? {
        let (1, Field::Bytes(dump)) = (f, v) else { continue };
        for (f, v) in fields(dump).ok_or_else(bad)? {
            let Field::Varint(v) = v else { continue };
            match f {
                1 => s.freezing_time_us = v,
                2 => s.frozen_time_us = v,
                3 => s.memdump_time_us = v,
                4 => s.memwrite_time_us = v,
                5 => s.pages_scanned = v,
                6 => s.pages_skipped_parent = v,
                7 => s.pages_written = v,
                _ => {}
            }
        }
    }
    Ok(s)
}

/// CRIU's VMA status bits (criu/include/image.h) of mappings whose content CRIU's restorer reads
/// before the app runs: the vDSO (a proxy of the old kernel's, in a process CRIU restored before,
/// whose symbols it parses), its data page, and AIO rings (copied into the new ring).
const VMA_AREA_VDSO: u64 = 1 << 3;
const VMA_AREA_VVAR: u64 = 1 << 12;
const VMA_AREA_AIORING: u64 = 1 << 13;

/// [start, end) of the mappings in `dir`'s `mm-<pid>.img` whose pages CRIU's restorer reads
/// itself, so they must be in the images (PPP cannot put them back later), in address order.
pub fn restorer_read_vmas(dir: &Path, pid: u32) -> Result<Vec<(u64, u64)>, Error> {
    let path = dir.join(format!("mm-{pid}.img"));
    let bad = || not_understood(&path, "mm");
    let records = read_records(&path, IMG_COMMON_MAGIC, MM_MAGIC, "mm")?;
    let entry = records.first().ok_or_else(bad)?;
    let mut out = vec![];
    // mm_entry's field 14: repeated vma_entry {start = 1, end = 2, status = 7}.
    for (f, v) in fields(entry).ok_or_else(bad)? {
        let (14, Field::Bytes(vma)) = (f, v) else { continue };
        let (mut start, mut end, mut status) = (None, None, 0);
        for (f, v) in fields(vma).ok_or_else(bad)? {
            match (f, v) {
                (1, Field::Varint(v)) => start = Some(v),
                (2, Field::Varint(v)) => end = Some(v),
                (7, Field::Varint(v)) => status = v,
                _ => {}
            }
        }
        let (Some(start), Some(end)) = (start, end) else { return Err(bad()) };
        if status & (VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_AREA_AIORING) != 0 {
            out.push((start, end));
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::foam::FileMode;

    #[test]
    fn pagemap_bytes_match_criu_layout() {
        let dir = tempfile::tempdir().unwrap();
        let foam = FoamFile::create(dir.path(), "9", FileMode::Single).unwrap();
        foam.write_pages(0x1000, &vec![3u8; 3 * 4096]).unwrap();
        let mut ranges = RangeMap::new();
        ranges.insert(0x1000, 0x2000, PE_PRESENT);
        ranges.insert(0x2000, 0x4000, PE_PRESENT | PE_LAZY);
        let st = write_restore_images(dir.path(), Target::Pid(9), 65537, Some(&foam), &ranges, true).unwrap();
        assert_eq!(st, SynthStats { pages_copied: 1, pages_lazy: 2 });
        let map = std::fs::read(dir.path().join("pagemap-9.img")).unwrap();
        // Header and PagemapHead { pages_id: 65537 } as the research brief shows them.
        assert_eq!(&map[..16], &[0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56, 4, 0, 0, 0, 0x08, 0x81, 0x80, 0x04]);
        // Entry 1: vaddr 0x1000, 1 page, PE_PRESENT; entry 2: 0x2000, 2 pages, PE_LAZY.
        assert_eq!(&map[16..], &[7, 0, 0, 0, 0x08, 0x80, 0x20, 0x10, 1, 0x20, 4, 7, 0, 0, 0, 0x08, 0x80, 0x40, 0x10, 2, 0x20, 2]);
        assert_eq!(std::fs::read(dir.path().join("pages-65537.img")).unwrap(), vec![3u8; 4096]);
        // Eager: everything is copied.
        let st = write_restore_images(dir.path(), Target::Pid(9), 1, Some(&foam), &ranges, false).unwrap();
        assert_eq!(st, SynthStats { pages_copied: 3, pages_lazy: 0 });
    }

    #[test]
    fn a_parent_inventory_is_laid_out_as_criu_writes_one() {
        // tests/fixtures/criu-images/inventory.img: from `criu dump` (4.1.1) of a sleeping process.
        let real = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/criu-images/inventory.img")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_parent_inventory(dir.path(), 123_456_789).unwrap();
        let ours = std::fs::read(dir.path().join("inventory.img")).unwrap();
        assert_eq!(ours[..4], real[..4], "magic");
        let record = |img: &[u8]| -> Vec<(u32, u64)> {
            let len = u32::from_le_bytes(img[4..8].try_into().unwrap()) as usize;
            assert_eq!(img.len(), 8 + len, "one record");
            fields(&img[8..]).unwrap().into_iter().filter_map(|(n, f)| if let Field::Varint(v) = f { Some((n, v)) } else { None }).collect()
        };
        let real = record(&real);
        assert_eq!(real.iter().find(|(n, _)| *n == 1), Some(&(1, IMAGES_V1_1)), "img_version");
        assert_eq!(record(&ours), vec![(1, IMAGES_V1_1), (8, 123_456_789), (9, PRE_DUMP_SPLICE)]);
    }

    #[test]
    fn reads_a_real_stats_dump() {
        // From `criu dump` (4.1.1) of a sleeping process: frozen 13.968 ms, 57 pages scanned, 30 written.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/criu-images");
        let s = read_dump_stats(&dir).unwrap();
        assert_eq!((s.frozen_time_us, s.memdump_time_us, s.memwrite_time_us), (13968, 356, 112));
        assert_eq!((s.pages_scanned, s.pages_skipped_parent, s.pages_written), (57, 0, 30));
    }

    #[test]
    fn finds_the_mappings_criu_restores_from_their_content() {
        // From `criu dump` (4.1.1, Linux 6.18) of `sleep`, pid 23858, whose /proc/PID/maps said:
        // 7f09ef939000-7f09ef93d000 [vvar], 7f09ef93d000-7f09ef93f000 [vvar_vclock],
        // 7f09ef93f000-7f09ef941000 [vdso].
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/criu-images");
        let got = restorer_read_vmas(&dir, 23858).unwrap();
        // CRIU takes [vvar] and [vvar_vclock] as one vvar area.
        assert_eq!(got, vec![(0x7f09_ef93_9000, 0x7f09_ef93_f000), (0x7f09_ef93_f000, 0x7f09_ef94_1000)], "{got:x?}");
        let err = restorer_read_vmas(&dir, 1).unwrap_err().to_string();
        assert!(err.contains("mm-1.img"), "{err}");
        let bad = tempfile::tempdir().unwrap();
        std::fs::write(bad.path().join("mm-7.img"), [0x19, 0x43, 0x56, 0x54, 0, 0, 0, 0]).unwrap();
        let err = restorer_read_vmas(bad.path(), 7).unwrap_err().to_string();
        assert!(err.contains("not a CRIU mm image"), "{err}");
    }

    #[test]
    fn reads_a_real_process_tree() {
        // From `criu dump` (4.1.1) of memsubject, pid 26177, one thread.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/criu-images");
        assert_eq!(read_pstree(&dir).unwrap(), vec![(26177, vec![26177])]);
    }
}
