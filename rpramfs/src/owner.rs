//! The owner record (block 1): which process has the region open, so that a second opener is told
//! who holds it, and a mount after a crash or a kexec can say whose session it recovers from.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::Result;
use crate::layout::{ByteOffset, OWNER_BLOCK};
use crate::region::Region;

const OWNER_MAGIC: &[u8; 8] = b"RPOWNER1";

/// The holder as recorded in the region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub boot_id: String,
    pub what: String,
    pub since_unix: u64,
}

impl Owner {
    pub fn current(what: &str) -> Owner {
        Owner {
            pid: std::process::id(),
            boot_id: boot_id(),
            what: what.to_string(),
            since_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let text = format!("pid={}\nboot={}\nsince={}\nwhat={}\n", self.pid, self.boot_id, self.since_unix, self.what);
        let mut out = Vec::with_capacity(16 + text.len());
        out.extend_from_slice(OWNER_MAGIC);
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(text.as_bytes()).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
        out
    }

    fn decode(buf: &[u8]) -> Option<Owner> {
        if buf.len() < 16 || &buf[..8] != OWNER_MAGIC {
            return None;
        }
        let len = u32::from_le_bytes(buf[8..12].try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(buf[12..16].try_into().ok()?);
        let text = buf.get(16..16 + len)?;
        if crc32fast::hash(text) != crc {
            return None;
        }
        let text = std::str::from_utf8(text).ok()?;
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::to_string);
        Some(Owner {
            pid: field("pid=")?.parse().ok()?,
            boot_id: field("boot=")?,
            since_unix: field("since=")?.parse().ok()?,
            what: field("what=").unwrap_or_default(),
        })
    }

    /// Whether the recorded process runs (a zombie, killed but not reaped, does not).
    pub fn is_alive(&self) -> bool {
        self.boot_id == boot_id()
            && std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
                .unwrap_or(false)
    }

    /// Who holds (or held) the region, for messages.
    pub fn describe(&self) -> String {
        let this_boot = self.boot_id == boot_id();
        let alive = self.is_alive();
        let state = if !this_boot {
            "before the last reboot/kexec"
        } else if alive {
            "running"
        } else {
            "no longer running"
        };
        format!("rpramfs pid {} ({}; {state})", self.pid, self.what)
    }
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Reads the owner record without the lock (used when someone else holds it): a plain read, or
/// for a devdax device, which has no read(2), through a read-only mapping.
pub fn read_owner(file: &File) -> Option<Owner> {
    let mut buf = vec![0u8; 4096];
    let off = OWNER_BLOCK.offset().0;
    file.read_exact_at(&mut buf, off).ok().or_else(|| crate::region::read_mapped(file, off, &mut buf).ok())?;
    Owner::decode(&buf)
}

pub fn read(region: &Region) -> Option<Owner> {
    let mut buf = vec![0u8; 4096];
    region.read_into(OWNER_BLOCK.offset(), &mut buf).ok()?;
    Owner::decode(&buf)
}

pub fn write(region: &Region, owner: Option<&Owner>) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    if let Some(o) = owner {
        let enc = o.encode();
        let n = enc.len().min(buf.len());
        buf[..n].copy_from_slice(&enc[..n]);
    }
    region.write(ByteOffset(OWNER_BLOCK.offset().0), &buf)?;
    region.fence();
    region.flush(&[(OWNER_BLOCK.offset().0, 4096)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let o = Owner::current("mounted at /kup");
        let mut enc = o.encode();
        assert_eq!(Owner::decode(&enc), Some(o));
        enc[20] ^= 1;
        assert_eq!(Owner::decode(&enc), None);
    }
}
