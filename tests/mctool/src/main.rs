//! A small memcached client for the guest scenarios (memcslap is too slow under emulation to
//! load hundreds of MiB): it loads items whose values are derived from (seed, index), reads them
//! all back and compares, and probes availability.
//!
//!   mctool load   [--addr A] --items N --value-size B [--seed S]   pipelined `set … noreply`
//!   mctool verify [--addr A] --items N --value-size B [--seed S] [--acked F]
//!                                                                  multi-get, byte-for-byte check
//!   mctool churn  [--addr A] --items N --value-sizes MIN-MAX [--seed S] [--rate R] --until-file F --out ACKED
//!                 overwrites random items one `set` at a time (each waits for STORED), at most R
//!                 sets/s (0: as fast as answers come), until F appears; ACKED then lists every
//!                 item's newest acknowledged generation ("index generation" lines). Connection
//!                 errors and 500 ms without an answer (a frozen or stopped memcached) are counted,
//!                 and the client connects again.
//! `--value-sizes MIN-MAX` instead of `--value-size` gives item i a size of its own in [MIN, MAX]
//! and a value that names its generation (8 bytes, little endian, then bytes derived from (seed,
//! i, generation)); load writes generation 0. verify then accepts any generation whose bytes
//! match, but with `--acked F` none older than F says was acknowledged: a set memcached answered
//! before a checkpoint froze it must be in the restored memcached (stale=… counts the others).
//!   mctool probe  [--addr A] --interval-ms I --until-file F [--out O]
//!                 one `get` every I ms; when F appears, writes the longest outage to O (or stdout).
//!                 Gaps are measured on the wall clock, so the probe may itself be checkpointed and
//!                 restored on another kernel (whose monotonic clock starts again at boot).
//!   mctool now                                                     the wall clock in ms since 1970
//!                                                                  (busybox date has no %N)
//!   mctool pfns --pid P --out F                                    the PFN of every present page of P's
//!                                                                  private anonymous mappings, into F
//!   mctool pfns-compare BEFORE AFTER                               in_place=P/T: of the T pages in
//!                                                                  BEFORE, P have the same PFN in AFTER
//! Output is one line of `key=value` figures; exit status 0 only when every item matched.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Opts {
    addr: String,
    items: u64,
    value_size: usize,
    seed: u64,
    interval_ms: u64,
    until_file: String,
    out: String,
    /// `--value-sizes MIN-MAX`: mixed sizes, values with generations.
    sizes: Option<(usize, usize)>,
    rate: u64,
    acked: String,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts { addr: "127.0.0.1:11211".into(), items: 0, value_size: 65536, seed: 1, interval_ms: 10, until_file: String::new(), out: String::new(), sizes: None, rate: 0, acked: String::new() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--addr" => o.addr = v()?,
            "--items" => o.items = v()?.parse().map_err(|e| format!("--items: {e}"))?,
            "--value-size" => o.value_size = v()?.parse().map_err(|e| format!("--value-size: {e}"))?,
            "--seed" => o.seed = v()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--interval-ms" => o.interval_ms = v()?.parse().map_err(|e| format!("--interval-ms: {e}"))?,
            "--until-file" => o.until_file = v()?,
            "--out" => o.out = v()?,
            "--value-sizes" => {
                let text = v()?;
                let bad = || format!("--value-sizes: {text:?} is not MIN-MAX with 8 <= MIN <= MAX");
                let (lo, hi) = text.split_once('-').ok_or_else(bad)?;
                let (lo, hi): (usize, usize) = (lo.parse().map_err(|_| bad())?, hi.parse().map_err(|_| bad())?);
                if lo < 8 || lo > hi {
                    return Err(bad());
                }
                o.sizes = Some((lo, hi));
            }
            "--rate" => o.rate = v()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--acked" => o.acked = v()?,
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

fn key(o: &Opts, i: u64) -> String {
    format!("kup-{}-{i}", o.seed)
}

/// The splitmix64 step: sizes and seeds that differ for neighbouring items.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Item `i`'s size.
fn size(o: &Opts, i: u64) -> usize {
    match o.sizes {
        None => o.value_size,
        Some((lo, hi)) => lo + (mix(o.seed ^ mix(i)) % (hi - lo + 1) as u64) as usize,
    }
}

/// Xorshift bytes from a nonzero seed.
fn bytes(mut x: u64, len: usize, v: &mut Vec<u8>) {
    let end = v.len() + len;
    while v.len() < end {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(end);
}

/// The value of item `i` (generation `g` with `--value-sizes`): xorshift bytes seeded by (seed,
/// i), so any corruption shows.
fn value(o: &Opts, i: u64, g: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(size(o, i) + 8);
    if o.sizes.is_none() {
        bytes(o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9) | 1, o.value_size, &mut v);
    } else {
        v.extend_from_slice(&g.to_le_bytes());
        bytes(mix(mix(o.seed ^ mix(i)) ^ g) | 1, size(o, i) - 8, &mut v);
    }
    v
}

/// Whether `data` is a value item `i` can have: the generation it names, if so.
fn generation_of(o: &Opts, i: u64, data: &[u8]) -> Option<u64> {
    let g = match o.sizes {
        None => 0,
        Some(_) => u64::from_le_bytes(data.get(..8)?.try_into().ok()?),
    };
    (data == value(o, i, g)).then_some(g)
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A connection that gives up after 200 ms (connect) and 500 ms (each answer): for clients that
/// must notice a frozen or stopped memcached and connect again.
fn connect_impatient(addr: &str) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect_timeout(&addr.parse().map_err(std::io::Error::other)?, Duration::from_millis(200))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok((s.try_clone()?, BufReader::new(s)))
}

fn load(o: &Opts) -> Result<String, String> {
    let start = Instant::now();
    let mut s = connect(&o.addr).map_err(|e| format!("connect {}: {e}", o.addr))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, s.try_clone().map_err(|e| e.to_string())?);
    let mut total = 0u64;
    for i in 0..o.items {
        let v = value(o, i, 0);
        total += v.len() as u64;
        write!(w, "set {} 0 0 {} noreply\r\n", key(o, i), v.len()).map_err(|e| e.to_string())?;
        w.write_all(&v).map_err(|e| e.to_string())?;
        w.write_all(b"\r\n").map_err(|e| e.to_string())?;
    }
    // A request with a reply: once it arrives, every set before it was processed.
    w.write_all(b"version\r\n").map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("VERSION") {
        return Err(format!("memcached answered {line:?} after the sets (out of memory? see memcached -m)"));
    }
    let mib = total as f64 / 1048576.0;
    Ok(format!("loaded items={} mib={mib:.1} seconds={:.2}", o.items, start.elapsed().as_secs_f64()))
}

fn verify(o: &Opts) -> Result<String, String> {
    let start = Instant::now();
    let s = connect(&o.addr).map_err(|e| format!("connect {}: {e}", o.addr))?;
    let mut r = BufReader::with_capacity(1 << 20, s.try_clone().map_err(|e| e.to_string())?);
    let mut w = s;
    let acked = if o.acked.is_empty() { Default::default() } else { read_pairs(&o.acked)? };
    let (mut ok, mut missing, mut wrong, mut stale) = (0u64, 0u64, 0u64, 0u64);
    let mut first_bad = String::new();
    const BATCH: u64 = 32;
    let mut i = 0;
    while i < o.items {
        let n = BATCH.min(o.items - i);
        let keys: Vec<String> = (i..i + n).map(|j| key(o, j)).collect();
        write!(w, "get {}\r\n", keys.join(" ")).map_err(|e| e.to_string())?;
        let mut seen = std::collections::HashMap::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("memcached closed the connection".into());
            }
            let line = line.trim_end();
            if line == "END" {
                break;
            }
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() < 4 || parts[0] != "VALUE" {
                return Err(format!("unexpected reply {line:?}"));
            }
            let len: usize = parts[3].parse().map_err(|_| format!("bad length in {line:?}"))?;
            let mut data = vec![0u8; len + 2];
            r.read_exact(&mut data).map_err(|e| e.to_string())?;
            data.truncate(len);
            seen.insert(parts[1].to_string(), data);
        }
        for (j, k) in (i..i + n).zip(&keys) {
            match seen.get(k) {
                None => {
                    missing += 1;
                    if first_bad.is_empty() {
                        first_bad = format!("{k} missing");
                    }
                }
                Some(v) => match generation_of(o, j, v) {
                    None => {
                        wrong += 1;
                        if first_bad.is_empty() {
                            first_bad = format!("{k} has a wrong value");
                        }
                    }
                    Some(g) if g < acked.get(&j).copied().unwrap_or(0) => {
                        stale += 1;
                        if first_bad.is_empty() {
                            first_bad = format!("{k} has generation {g}, but {} was acknowledged", acked[&j]);
                        }
                    }
                    Some(_) => ok += 1,
                },
            }
        }
        i += n;
    }
    let stale_part = if o.acked.is_empty() { String::new() } else { format!(" stale={stale} acked={}", acked.len()) };
    let line = format!("verified keys={ok}/{} missing={missing} wrong={wrong}{stale_part} seconds={:.2}", o.items, start.elapsed().as_secs_f64());
    if ok == o.items {
        Ok(line)
    } else {
        Err(format!("{line} first={first_bad}"))
    }
}

/// Random overwrites, one `set` at a time, until the until-file appears.
fn churn(o: &Opts) -> Result<String, String> {
    if o.sizes.is_none() || o.items == 0 || o.until_file.is_empty() || o.out.is_empty() {
        return Err("churn needs --items N, --value-sizes MIN-MAX, --until-file F and --out ACKED".into());
    }
    let start = Instant::now();
    let mut gens = vec![0u64; o.items as usize];
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let (mut sets, mut errors, mut x) = (0u64, 0u64, mix(o.seed) | 1);
    while !std::path::Path::new(&o.until_file).exists() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = x % o.items;
        let g = gens[i as usize] + 1;
        let v = value(o, i, g);
        sets += 1;
        let stored = (|| -> std::io::Result<bool> {
            let (w, r) = match &mut conn {
                Some(c) => c,
                None => conn.insert(connect_impatient(&o.addr)?),
            };
            let mut req = format!("set {} 0 0 {}\r\n", key(o, i), v.len()).into_bytes();
            req.extend_from_slice(&v);
            req.extend_from_slice(b"\r\n");
            w.write_all(&req)?;
            let mut line = String::new();
            r.read_line(&mut line)?;
            Ok(line == "STORED\r\n")
        })();
        match stored {
            Ok(true) => gens[i as usize] = g,
            _ => {
                errors += 1;
                conn = None;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if o.rate > 0 {
            let due = Duration::from_secs_f64(sets as f64 / o.rate as f64);
            std::thread::sleep(due.saturating_sub(start.elapsed()));
        }
    }
    let text: String = gens.iter().enumerate().filter(|(_, g)| **g > 0).map(|(i, g)| format!("{i} {g}\n")).collect();
    std::fs::write(&o.out, text).map_err(|e| format!("{}: {e}", o.out))?;
    let secs = start.elapsed().as_secs_f64();
    Ok(format!("churn sets={sets} errors={errors} rate={:.0} seconds={secs:.1}", sets as f64 / secs))
}

/// One `get` every interval; the longest stretch without a successful answer is the outage.
fn probe(o: &Opts) -> Result<String, String> {
    use std::time::SystemTime;
    let interval = Duration::from_millis(o.interval_ms);
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let start = SystemTime::now();
    let since = |t: SystemTime| t.duration_since(start).unwrap_or_default();
    let mut last_ok = start;
    let (mut longest, mut longest_at, mut probes, mut failures) = (Duration::ZERO, 0.0, 0u64, 0u64);
    while o.until_file.is_empty() || !std::path::Path::new(&o.until_file).exists() {
        let t = SystemTime::now();
        probes += 1;
        let ok = (|| -> std::io::Result<()> {
            let (w, r) = match &mut conn {
                Some(c) => c,
                None => conn.insert(connect_impatient(&o.addr)?),
            };
            w.write_all(b"get kup-probe\r\n")?;
            let mut line = String::new();
            r.read_line(&mut line)?;
            match line.split(' ').next() {
                Some("END\r\n") => Ok(()),
                Some("VALUE") => {
                    // The value line and END.
                    let mut rest = String::new();
                    r.read_line(&mut rest)?;
                    r.read_line(&mut rest)?;
                    Ok(())
                }
                _ => Err(std::io::Error::other(format!("reply {line:?}"))),
            }
        })();
        match ok {
            Ok(()) => {
                // The outage: the longest time between two answered probes.
                let now = SystemTime::now();
                let gap = now.duration_since(last_ok).unwrap_or_default();
                if gap > longest {
                    longest = gap;
                    longest_at = since(last_ok).as_secs_f64();
                }
                last_ok = now;
            }
            Err(_) => {
                failures += 1;
                conn = None;
            }
        }
        std::thread::sleep(interval.saturating_sub(t.elapsed().unwrap_or_default()));
    }
    let line = format!(
        "probe outage_ms={:.0} outage_start_s={longest_at:.2} probes={probes} failures={failures} seconds={:.1}",
        longest.as_secs_f64() * 1e3,
        since(SystemTime::now()).as_secs_f64()
    );
    if !o.out.is_empty() {
        std::fs::write(&o.out, format!("{line}\n")).map_err(|e| format!("{}: {e}", o.out))?;
    }
    Ok(line)
}

/// (vaddr, pfn) of every present page of the private anonymous mappings of `pid` (pagemap shows
/// PFNs to root only).
fn pfns(pid: &str) -> Result<Vec<(u64, u64)>, String> {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    let pm = std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|e| format!("/proc/{pid}/pagemap: {e}"))?;
    let mut out = vec![];
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let anon = f.len() == 5 || matches!(f.get(5), Some(&"[heap]") | Some(&"[stack]"));
        if f.len() < 5 || !f[1].ends_with('p') || !anon {
            continue;
        }
        let (s, e) = f[0].split_once('-').ok_or("bad maps line")?;
        let (s, e) = (u64::from_str_radix(s, 16).map_err(|e| e.to_string())?, u64::from_str_radix(e, 16).map_err(|e| e.to_string())?);
        let mut buf = vec![0u8; ((e - s) / 4096 * 8) as usize];
        pm.read_exact_at(&mut buf, s / 4096 * 8).map_err(|e| format!("pagemap: {e}"))?;
        for (i, w) in buf.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(w.try_into().unwrap());
            if v >> 63 == 1 && v & ((1 << 55) - 1) != 0 {
                out.push((s + i as u64 * 4096, v & ((1 << 55) - 1)));
            }
        }
    }
    Ok(out)
}

/// "a b" lines (PFN lists, acknowledged generations).
fn read_pairs(path: &str) -> Result<std::collections::BTreeMap<u64, u64>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    text.lines().map(|l| l.split_once(' ').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))).ok_or(format!("{path}: bad line {l:?}"))).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("now") => Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0).to_string()),
        Some("pfns") if args.len() == 6 && args[2] == "--pid" && args[4] == "--out" => pfns(&args[3]).and_then(|v| {
            let text: String = v.iter().map(|(a, p)| format!("{a} {p}\n")).collect();
            std::fs::write(&args[5], text).map_err(|e| format!("{}: {e}", args[5]))?;
            Ok(format!("pages={}", v.len()))
        }),
        Some("pfns-compare") if args.len() == 4 => read_pairs(&args[2]).and_then(|before| {
            let after = read_pairs(&args[3])?;
            let same = before.iter().filter(|(a, p)| after.get(a) == Some(p)).count();
            Ok(format!("in_place={same}/{}", before.len()))
        }),
        Some(cmd @ ("load" | "verify" | "probe" | "churn")) => parse(&args[2..]).and_then(|o| match cmd {
            "load" => load(&o),
            "verify" => verify(&o),
            "churn" => churn(&o),
            _ => probe(&o),
        }),
        _ => Err("usage: mctool now | load|verify|probe|churn [--addr A] [--items N] [--value-size B | --value-sizes MIN-MAX] [--seed S] [--interval-ms I] [--until-file F] [--out F] [--rate R] [--acked F]".into()),
    };
    match result {
        Ok(line) => println!("{line}"),
        Err(e) => {
            println!("mctool: {e}");
            std::process::exit(1);
        }
    }
}
