//! Output helpers: human-readable sizes and times, JSON, the progress bar.

use std::io::IsTerminal;
use std::time::Duration;

pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A byte-counting progress bar on an interactive terminal; hidden otherwise (pipes, `--json`,
/// and serial consoles, where redrawing costs more than it shows).
pub fn progress_bar(len: u64, json: bool, prefix: String) -> indicatif::ProgressBar {
    if json || !interactive_stderr() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::with_draw_target(Some(len.max(1)), indicatif::ProgressDrawTarget::stderr_with_hz(4));
    pb.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}

/// The container of several apps' bars; hidden where single bars would be.
pub fn multi_progress(json: bool) -> indicatif::MultiProgress {
    if json || !interactive_stderr() {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    } else {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4))
    }
}

fn interactive_stderr() -> bool {
    if !std::io::stderr().is_terminal() {
        return false;
    }
    let tty = std::fs::read_link("/proc/self/fd/2").unwrap_or_default();
    let tty = tty.to_string_lossy();
    !(tty == "/dev/console" || tty.starts_with("/dev/ttyS") || std::env::var("TERM").is_ok_and(|t| t == "dumb" || t == "linux" && tty.starts_with("/dev/console")))
}

pub fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
