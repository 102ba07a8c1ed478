//! FOAM checkpoint images: one sparse file per address space where file offset == virtual address.
//! Not implemented yet; see shared/DESIGN.md §3.
