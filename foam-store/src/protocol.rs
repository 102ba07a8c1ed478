//! The CRIU page-server wire protocol as CRIU 3.17 and 4.1 speak it (4.2 changed the header to 32
//! bytes and is refused). Every message starts with a 24-byte little-endian header
//! `{ u32 cmd; u32 nr_pages; u64 vaddr; u64 dst_id }`; the low 16 bits of `cmd` are the command, the
//! high 16 bits the PE_* flags; ADD_F with PE_PRESENT is followed by `nr_pages × 4096` bytes.

pub const HEADER_LEN: usize = 24;
pub const PAGE_SIZE: u64 = 4096;

/// Page flags (CRIU's pagemap.h).
pub const PE_PARENT: u16 = 1;
pub const PE_LAZY: u16 = 2;
pub const PE_PRESENT: u16 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// Legacy: pages with data.
    Add,
    /// Legacy: a hole (pages are in the parent).
    Hole,
    /// Legacy open; no reply.
    Open,
    /// Opens one image stream; the server replies with one byte, has_parent.
    Open2,
    /// Pre-dump asks whether a parent exists; the server replies with a native int32.
    Parent,
    /// Pages (with data when PE_PRESENT), holes (PE_PARENT), or lazy pages without data.
    AddF,
    /// `criu lazy-pages` asks for pages; answered with an ADD_F header and the data.
    Get,
    /// End of session; the server replies with int32 status 0.
    Close,
    /// End of session over `--ps-socket`; replied like Close.
    ForceClose,
}

impl Cmd {
    pub fn from_u16(v: u16) -> Option<Cmd> {
        Some(match v {
            1 => Cmd::Add,
            2 => Cmd::Hole,
            3 => Cmd::Open,
            4 => Cmd::Open2,
            5 => Cmd::Parent,
            6 => Cmd::AddF,
            7 => Cmd::Get,
            0x1023 => Cmd::Close,
            0x1024 => Cmd::ForceClose,
            _ => return None,
        })
    }

    pub fn code(self) -> u16 {
        match self {
            Cmd::Add => 1,
            Cmd::Hole => 2,
            Cmd::Open => 3,
            Cmd::Open2 => 4,
            Cmd::Parent => 5,
            Cmd::AddF => 6,
            Cmd::Get => 7,
            Cmd::Close => 0x1023,
            Cmd::ForceClose => 0x1024,
        }
    }

    /// Bytes of the server's reply to this command.
    pub fn reply_len(self) -> usize {
        match self {
            Cmd::Open2 => 1,
            Cmd::Parent | Cmd::Close | Cmd::ForceClose => 4,
            _ => 0,
        }
    }
}

/// The image a dump command is about: `dst_id = (id << 8) | type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// A task's address space (`pagemap-<pid>.img`), by its pid in the checkpoint.
    Pid(u32),
    /// Shared memory (anonymous shared, memfd, SysV shm) by shmem id; `vaddr` is the offset.
    Shmem(u64),
}

impl Target {
    pub fn decode(dst_id: u64) -> Result<Target, ProtocolError> {
        let id = dst_id >> 8;
        match dst_id & 0xff {
            1 | 10 | 11 | 16 | 17 => u32::try_from(id).map(Target::Pid).map_err(|_| ProtocolError::BadTarget(dst_id)),
            2 | 27 | 28 | 29 | 32 | 33 | 34 => Ok(Target::Shmem(id)),
            _ => Err(ProtocolError::BadTarget(dst_id)),
        }
    }

    pub fn encode(self) -> u64 {
        match self {
            Target::Pid(p) => ((p as u64) << 8) | 1,
            Target::Shmem(id) => (id << 8) | 2,
        }
    }

    /// The FOAM file name stem and CRIU's pagemap name suffix: `<pid>` or `shmem-<id>`.
    pub fn stem(self) -> String {
        match self {
            Target::Pid(p) => p.to_string(),
            Target::Shmem(id) => format!("shmem-{id}"),
        }
    }

    pub fn from_stem(s: &str) -> Option<Target> {
        match s.strip_prefix("shmem-") {
            Some(id) => id.parse().ok().map(Target::Shmem),
            None => s.parse().ok().map(Target::Pid),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub cmd: Cmd,
    pub flags: u16,
    pub nr_pages: u32,
    pub vaddr: u64,
    pub dst_id: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("unknown page-server command {0:#x} (raw cmd {1:#010x}); CRIU 4.2 and later use a different header and are not supported")]
    UnknownCommand(u16, u32),
    #[error("page-server target {0:#x} is neither a pid (type 1) nor shared memory (type 2)")]
    BadTarget(u64),
    #[error("page-server message at byte {offset} is cut short: {needed} bytes needed, {have} left")]
    Truncated { offset: usize, needed: usize, have: usize },
    #[error("page-server message at byte {offset}: vaddr {vaddr:#x} is not page-aligned")]
    Unaligned { offset: usize, vaddr: u64 },
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
        let raw = u32::from_le_bytes(b[0..4].try_into().unwrap());
        let code = (raw & 0xffff) as u16;
        let cmd = Cmd::from_u16(code).ok_or(ProtocolError::UnknownCommand(code, raw))?;
        Ok(Header {
            cmd,
            flags: (raw >> 16) as u16,
            nr_pages: u32::from_le_bytes(b[4..8].try_into().unwrap()),
            vaddr: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            dst_id: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&((self.cmd.code() as u32) | ((self.flags as u32) << 16)).to_le_bytes());
        b[4..8].copy_from_slice(&self.nr_pages.to_le_bytes());
        b[8..16].copy_from_slice(&self.vaddr.to_le_bytes());
        b[16..24].copy_from_slice(&self.dst_id.to_le_bytes());
        b
    }

    /// Bytes of page data that follow this header.
    pub fn payload_len(&self) -> u64 {
        let with_data = match self.cmd {
            Cmd::Add => true,
            Cmd::AddF => self.flags & PE_PRESENT != 0,
            _ => false,
        };
        if with_data {
            self.nr_pages as u64 * PAGE_SIZE
        } else {
            0
        }
    }

    /// The header of the server's answer to a GET: ADD_F | PE_PRESENT for `nr_pages` pages.
    pub fn get_reply(get: &Header, nr_pages: u32) -> Header {
        Header { cmd: Cmd::AddF, flags: PE_PRESENT, nr_pages, vaddr: get.vaddr, dst_id: get.dst_id }
    }
}

/// One decoded message of a recorded client stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub offset: usize,
    pub header: Header,
    /// Byte range of the page data in the stream.
    pub data: std::ops::Range<usize>,
}

/// Decodes a whole client→server byte stream (tests, recordings).
pub fn decode_stream(bytes: &[u8]) -> Result<Vec<Message>, ProtocolError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < bytes.len() {
        let have = bytes.len() - off;
        if have < HEADER_LEN {
            return Err(ProtocolError::Truncated { offset: off, needed: HEADER_LEN, have });
        }
        let header = Header::parse(bytes[off..off + HEADER_LEN].try_into().unwrap())?;
        if header.vaddr % PAGE_SIZE != 0 {
            return Err(ProtocolError::Unaligned { offset: off, vaddr: header.vaddr });
        }
        let start = off + HEADER_LEN;
        let len = header.payload_len() as usize;
        if bytes.len() - start < len {
            return Err(ProtocolError::Truncated { offset: off, needed: HEADER_LEN + len, have });
        }
        out.push(Message { offset: off, header, data: start..start + len });
        off = start + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_known_encodings() {
        let h = Header { cmd: Cmd::AddF, flags: PE_LAZY | PE_PRESENT, nr_pages: 254, vaddr: 0x7f3f_4f60_0000, dst_id: Target::Pid(9603).encode() };
        let b = h.encode();
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 0x0006_0006);
        assert_eq!(Header::parse(&b).unwrap(), h);
        assert_eq!(h.payload_len(), 254 * 4096);
        assert_eq!(Target::decode(0x258301).unwrap(), Target::Pid(9603));
        assert_eq!(Target::decode(0x27ad02).unwrap(), Target::Shmem(10157));
        assert!(Target::decode(0x12_3405).is_err());
        let hole = Header { cmd: Cmd::AddF, flags: PE_PARENT, nr_pages: 10, vaddr: 0, dst_id: 0x101 };
        assert_eq!(hole.payload_len(), 0);
        let lazy_only = Header { cmd: Cmd::AddF, flags: PE_LAZY, nr_pages: 10, vaddr: 0, dst_id: 0x101 };
        assert_eq!(lazy_only.payload_len(), 0);
        assert_eq!(Cmd::Open2.reply_len(), 1);
        assert_eq!(Cmd::ForceClose.reply_len(), 4);
    }

    #[test]
    fn unknown_command_names_criu_42() {
        let mut b = [0u8; HEADER_LEN];
        b[0] = 0x99;
        let e = Header::parse(&b).unwrap_err();
        assert!(e.to_string().contains("CRIU 4.2"), "{e}");
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let h = Header { cmd: Cmd::AddF, flags: PE_PRESENT, nr_pages: 2, vaddr: 0x1000, dst_id: 0x101 }.encode();
        let mut s = h.to_vec();
        s.extend_from_slice(&[0u8; 4096]);
        assert_eq!(decode_stream(&s).unwrap_err(), ProtocolError::Truncated { offset: 0, needed: 24 + 8192, have: 24 + 4096 });
        assert!(matches!(decode_stream(&s[..10]), Err(ProtocolError::Truncated { .. })));
    }
}
