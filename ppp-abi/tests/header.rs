//! Every number of the Rust ABI against kmod/include/uapi/kup_ppp.h, as a C compiler sees it.

use std::process::Command;

use ppp_abi::*;

/// Compiles and runs a C program that prints `name value` for each expression.
fn c_values(exprs: &[(&str, &str)]) -> Vec<(String, u64)> {
    let dir = std::env::temp_dir().join(format!("ppp-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut src = format!("#include <stddef.h>\n#include <stdio.h>\n#include \"{HEADER}\"\nint main(void) {{\n");
    for (name, e) in exprs {
        src += &format!("\tprintf(\"{name} %llu\\n\", (unsigned long long)({e}));\n");
    }
    src += "\treturn 0;\n}\n";
    std::fs::write(dir.join("abi.c"), src).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc).args(["-std=gnu11", "-Wall", "-Werror", "-o"]).arg(dir.join("abi")).arg(dir.join("abi.c")).output().unwrap_or_else(|e| panic!("{cc}: {e}"));
    assert!(out.status.success(), "compiling against {HEADER}: {}", String::from_utf8_lossy(&out.stderr));
    let run = Command::new(dir.join("abi")).output().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (n, v) = l.rsplit_once(' ').unwrap();
            (n.to_string(), v.parse().unwrap())
        })
        .collect()
}

macro_rules! layout {
    ($v:ident, $rs:ty, $c:literal, [$($field:ident),*]) => {
        $v.push((concat!("sizeof ", $c), format!("sizeof(struct {})", $c), size_of::<$rs>() as u64));
        $( $v.push((concat!($c, ".", stringify!($field)), format!("offsetof(struct {}, {})", $c, stringify!($field)), std::mem::offset_of!($rs, $field) as u64)); )*
    };
}

#[test]
fn the_rust_abi_matches_the_header() {
    let mut want: Vec<(&str, String, u64)> = vec![];
    layout!(want, Info, "ppp_info", [abi_version, state, arena_start, arena_size, block_size, held_pages, pinned_pages, guarded_pages, pin_tag]);
    layout!(want, Attach, "ppp_attach", [arena_start, arena_size, held, nr_held]);
    layout!(want, Page, "ppp_page", [pfn, crc, why]);
    layout!(want, Pin, "ppp_pin", [pid, flags, tag, start, nr_pages, pages, nr_kept]);
    layout!(want, Map, "ppp_map", [pid, flags, start, nr_pages, pages, nr_mapped, nr_copied, nr_guarded, failed, failed_why, pad]);
    layout!(want, ExitWrites, "ppp_exit_writes", [pid, nr, addrs]);
    layout!(want, Confirm, "ppp_confirm", [tag, pids, drop, nr_drop, nr_pids, pad]);
    layout!(want, Written, "ppp_written", [pid, pad, start, nr_pages, bitmap, nr_written]);
    layout!(want, ListHead, "ppp_list_head", [magic, version, arena_start, arena_size, nr_pages, nr_runs, pid, crc]);
    layout!(want, ListRun, "ppp_list_run", [vaddr, pfn, nr_pages, flags]);
    for (n, e, v) in [
        ("PPP_LIST_MAGIC", "PPP_LIST_MAGIC", LIST_MAGIC as u64),
        ("PPP_LIST_VERSION", "PPP_LIST_VERSION", LIST_VERSION as u64),
        ("PPP_LIST_GONE", "PPP_LIST_GONE", LIST_GONE as u64),
        ("PPP_ABI_VERSION", "PPP_ABI_VERSION", ABI_VERSION as u64),
        ("PPP_STATE_ATTACHED", "PPP_STATE_ATTACHED", STATE_ATTACHED as u64),
        ("PPP_STATE_PROVISIONAL", "PPP_STATE_PROVISIONAL", STATE_PROVISIONAL as u64),
        ("PPP_PIN_CRC", "PPP_PIN_CRC", PIN_CRC as u64),
        ("PPP_PIN_RUNNING", "PPP_PIN_RUNNING", PIN_RUNNING as u64),
        ("PPP_PIN_REPIN", "PPP_PIN_REPIN", PIN_REPIN as u64),
        ("PPP_MAP_VERIFY", "PPP_MAP_VERIFY", MAP_VERIFY as u64),
        ("PPP_MAP_GUARD", "PPP_MAP_GUARD", MAP_GUARD as u64),
        ("PPP_IOC_MAGIC", "PPP_IOC_MAGIC", IOC_MAGIC as u64),
        ("PPP_IOC_INFO", "PPP_IOC_INFO", IOC_INFO),
        ("PPP_IOC_ATTACH", "PPP_IOC_ATTACH", IOC_ATTACH),
        ("PPP_IOC_PIN", "PPP_IOC_PIN", IOC_PIN),
        ("PPP_IOC_UNPIN", "PPP_IOC_UNPIN", IOC_UNPIN),
        ("PPP_IOC_MAP", "PPP_IOC_MAP", IOC_MAP),
        ("PPP_IOC_RELEASE", "PPP_IOC_RELEASE", IOC_RELEASE),
        ("PPP_IOC_EXIT_WRITES", "PPP_IOC_EXIT_WRITES", IOC_EXIT_WRITES),
        ("PPP_IOC_CONFIRM", "PPP_IOC_CONFIRM", IOC_CONFIRM),
        ("PPP_IOC_WRITTEN", "PPP_IOC_WRITTEN", IOC_WRITTEN),
        ("PPP_WRITTEN_MAX_PAGES", "PPP_WRITTEN_MAX_PAGES", WRITTEN_MAX_PAGES),
    ] {
        want.push((n, e.to_string(), v));
    }
    for w in Why::ALL {
        want.push((w.c_name(), w.c_name().to_string(), w as u64));
    }
    let exprs: Vec<(&str, &str)> = want.iter().map(|(n, e, _)| (*n, e.as_str())).collect();
    let got = c_values(&exprs);
    assert_eq!(got.len(), want.len());
    let mismatches: Vec<String> = want.iter().zip(&got).filter(|((_, _, v), (_, c))| v != c).map(|((n, _, v), (_, c))| format!("{n}: Rust {v}, C {c}")).collect();
    assert!(mismatches.is_empty(), "ppp-abi disagrees with {HEADER}:\n{}", mismatches.join("\n"));
}

#[test]
fn the_strings_match_the_header() {
    let h = std::fs::read_to_string(HEADER).unwrap();
    for (c, rs) in [("PPP_DEVICE_NAME", DEVICE_NAME), ("PPP_RESOURCE_NAME", RESOURCE_NAME)] {
        let line = h.lines().find(|l| l.starts_with(&format!("#define {c}"))).unwrap_or_else(|| panic!("no {c} in the header"));
        assert!(line.contains(&format!("\"{rs}\"")), "{c}: the header says {line:?}, Rust {rs:?}");
    }
}
