//! FOAM checkpoint images: one sparse file per address space where file offset == virtual
//! address, written page by page across incremental passes and read back on demand (see
//! docs/design.md). CRIU is the checkpoint engine; its page-server protocol is where kup takes
//! over the memory.
//!
//! What exists so far: [`protocol`], the page-server wire format of CRIU 3.17–4.1 (decoding and
//! encoding of headers, replies and whole recorded streams).

pub mod protocol;
