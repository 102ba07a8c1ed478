//! kup's small records on disk (the checkpoint manifest, the update record): one header line
//! `<kind> <version> <length> <crc32>` and then `length` bytes of JSON. A torn or flipped record is
//! refused rather than half-read, people can still read it (`tail -n +2`), and it is replaced
//! atomically (write, fsync, rename, fsync the directory).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::Error;

pub fn encode<T: serde::Serialize>(kind: &str, version: u32, value: &T) -> Vec<u8> {
    let body = serde_json::to_vec_pretty(value).expect("records serialize");
    let mut out = format!("{kind} {version} {} {:08x}\n", body.len(), crc32fast::hash(&body)).into_bytes();
    out.extend_from_slice(&body);
    out
}

pub fn decode<T: serde::de::DeserializeOwned>(kind: &str, max_version: u32, bytes: &[u8], path: &Path) -> Result<T, Error> {
    let bad = |why: String| Error::BadManifest { path: path.into(), why };
    let nl = bytes.iter().position(|&b| b == b'\n').ok_or_else(|| bad(format!("no header line (truncated or not a {kind} file)")))?;
    let head = std::str::from_utf8(&bytes[..nl]).map_err(|_| bad("header is not text".into()))?;
    let parts: Vec<&str> = head.split(' ').collect();
    let [magic, version, len, crc] = parts[..] else { return Err(bad(format!("header {head:?} has the wrong shape"))) };
    if magic != kind {
        return Err(bad(format!("header {head:?} is not a {kind} header")));
    }
    let version: u32 = version.parse().map_err(|_| bad(format!("version {version:?}")))?;
    if version > max_version {
        return Err(bad(format!("format version {version} is newer than this kup understands ({max_version}); use a newer kup")));
    }
    let len: usize = len.parse().map_err(|_| bad(format!("length {len:?}")))?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| bad(format!("crc {crc:?}")))?;
    let body = &bytes[nl + 1..];
    if body.len() != len {
        return Err(bad(format!("truncated: {} of {len} bytes", body.len())));
    }
    if crc32fast::hash(body) != crc {
        return Err(bad(format!("CRC mismatch (stored {crc:08x}, computed {:08x}): the file was damaged", crc32fast::hash(body))));
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("unreadable content: {e}")))
}

pub fn load<T: serde::de::DeserializeOwned>(kind: &str, max_version: u32, path: &Path) -> Result<T, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(kind, max_version, &bytes, path)
}

/// Replaces `path` atomically and durably with `bytes` (mode 0600).
pub fn save(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}
