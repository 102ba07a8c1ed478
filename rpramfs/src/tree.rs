//! 512-ary radix trees of block pointers, indexed by 4 KiB page number. Height h covers
//! 512^h pages (h = 0: the root points at the only data block; h = 4: 2^48 bytes). Holes are null
//! pointers at any level, so sparse files cost nothing and seeks skip whole empty subtrees.

use zerocopy::{FromBytes, IntoBytes};

use crate::error::Result;
use crate::layout::{pages_covered, BlkPtr, BLOCK_SIZE, FANOUT, MAX_HEIGHT};
use crate::region::Region;
use crate::tx::{read_verified, Block, Tx};

pub type Node = [BlkPtr; FANOUT as usize];

/// A tree root as stored in an inode or a commit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Tree {
    pub ptr: BlkPtr,
    pub height: u8,
}

impl Tree {
    pub const EMPTY: Tree = Tree { ptr: BlkPtr::NULL, height: 0 };
    pub fn is_empty(&self) -> bool {
        self.ptr.is_null()
    }
}

pub fn read_node(region: &Region, ptr: BlkPtr) -> Result<Node> {
    let mut buf: Block = [0; BLOCK_SIZE];
    read_verified(region, ptr, &mut buf, &|| "radix tree node".to_string())?;
    Ok(Node::read_from_bytes(&buf).expect("a node is exactly one block"))
}

fn write_node(tx: &mut Tx<'_>, old: BlkPtr, node: &Node) -> Result<BlkPtr> {
    if node.iter().all(|p| p.is_null()) {
        tx.free_block(old.block());
        return Ok(BlkPtr::NULL);
    }
    let mut buf: Block = [0; BLOCK_SIZE];
    buf.copy_from_slice(node.as_bytes());
    tx.rewrite(old, &buf)
}

/// Visits the mapped pages in `first..=last` in order, skipping holes. On a damaged node,
/// `reached` tells the first page whose data could not be vouched for.
pub fn for_each_mapped(
    region: &Region,
    tree: Tree,
    first: u64,
    last: u64,
    reached: &mut u64,
    f: &mut dyn FnMut(u64, BlkPtr) -> Result<()>,
) -> Result<()> {
    let last = last.min(pages_covered(tree.height) - 1);
    if tree.is_empty() || first > last {
        return Ok(());
    }
    visit(region, tree.ptr, tree.height, 0, first, last, reached, f)
}

#[allow(clippy::too_many_arguments)]
fn visit(
    region: &Region,
    ptr: BlkPtr,
    height: u8,
    base: u64,
    first: u64,
    last: u64,
    reached: &mut u64,
    f: &mut dyn FnMut(u64, BlkPtr) -> Result<()>,
) -> Result<()> {
    *reached = (*reached).max(base.max(first));
    if height == 0 {
        return f(base, ptr);
    }
    let node = read_node(region, ptr)?;
    let span = pages_covered(height - 1);
    let lo = ((first.max(base) - base) / span) as usize;
    let hi = ((last - base) / span).min(FANOUT - 1) as usize;
    for (i, child) in node.iter().enumerate().take(hi + 1).skip(lo) {
        if child.is_null() {
            continue;
        }
        let cbase = base + i as u64 * span;
        visit(region, *child, height - 1, cbase, first.max(cbase), last.min(cbase + span - 1), reached, f)?;
    }
    Ok(())
}

/// The pointer of one page (NULL for a hole).
pub fn lookup(region: &Region, tree: Tree, page: u64) -> Result<BlkPtr> {
    let mut found = BlkPtr::NULL;
    let mut reached = 0;
    for_each_mapped(region, tree, page, page, &mut reached, &mut |_, p| {
        found = p;
        Ok(())
    })?;
    Ok(found)
}

/// Grows the tree until it covers `page`.
pub fn grow(tx: &mut Tx<'_>, tree: &mut Tree, page: u64) -> Result<()> {
    while pages_covered(tree.height) <= page {
        assert!(tree.height < MAX_HEIGHT, "callers bound pages to MAX_FILE_SIZE");
        if !tree.is_empty() {
            let mut node: Node = [BlkPtr::NULL; FANOUT as usize];
            node[0] = tree.ptr;
            tree.ptr = write_node(tx, BlkPtr::NULL, &node)?;
        }
        tree.height += 1;
    }
    Ok(())
}

/// Rewrites every page in `first..=last` (holes included) with what `f(tx, page, old)` returns
/// (NULL makes a hole). Nodes left empty are freed.
pub fn update_pages(
    tx: &mut Tx<'_>,
    tree: &mut Tree,
    first: u64,
    last: u64,
    f: &mut dyn FnMut(&mut Tx<'_>, u64, BlkPtr) -> Result<BlkPtr>,
) -> Result<()> {
    update_ranges(tx, tree, &[(first, last)], f)
}

/// As [`update_pages`] for every page of several ranges `(first, last)` (inclusive, ascending,
/// not overlapping), in ascending page order, in one walk down the tree: pages scattered over a
/// file cost a visit of the nodes above them, not a walk from the root each.
pub fn update_ranges(
    tx: &mut Tx<'_>,
    tree: &mut Tree,
    ranges: &[(u64, u64)],
    f: &mut dyn FnMut(&mut Tx<'_>, u64, BlkPtr) -> Result<BlkPtr>,
) -> Result<()> {
    let Some(&(_, last)) = ranges.last() else { return Ok(()) };
    debug_assert!(ranges.iter().all(|r| r.0 <= r.1) && ranges.windows(2).all(|w| w[0].1 < w[1].0), "ranges {ranges:?}");
    grow(tx, tree, last)?;
    tree.ptr = update(tx, tree.ptr, tree.height, 0, ranges, f)?;
    if tree.ptr.is_null() {
        tree.height = 0;
    }
    Ok(())
}

/// The node at `ptr` of `height` covering pages from `base` on, with `ranges` (inside it) updated.
fn update(
    tx: &mut Tx<'_>,
    ptr: BlkPtr,
    height: u8,
    base: u64,
    ranges: &[(u64, u64)],
    f: &mut dyn FnMut(&mut Tx<'_>, u64, BlkPtr) -> Result<BlkPtr>,
) -> Result<BlkPtr> {
    if height == 0 {
        return f(tx, base, ptr);
    }
    let mut node: Node = if ptr.is_null() { [BlkPtr::NULL; FANOUT as usize] } else { read_node(tx.region, ptr)? };
    let span = pages_covered(height - 1);
    let mut rest = ranges.to_vec();
    let mut r = 0;
    while r < rest.len() {
        // The child holding the next range's first page, and the ranges (or parts) inside it.
        let i = ((rest[r].0 - base) / span) as usize;
        let (cbase, cend) = (base + i as u64 * span, base + i as u64 * span + span - 1);
        let j = r + rest[r..].iter().take_while(|x| x.0 <= cend).count();
        let inside: Vec<(u64, u64)> = rest[r..j].iter().map(|&(a, b)| (a, b.min(cend))).collect();
        node[i] = update(tx, node[i], height - 1, cbase, &inside, f)?;
        if rest[j - 1].1 > cend {
            // The last of them goes on in the next child.
            rest[j - 1].0 = cend + 1;
            r = j - 1;
        } else {
            r = j;
        }
    }
    if ptr.is_null() && node.iter().all(|p| p.is_null()) {
        return Ok(BlkPtr::NULL);
    }
    write_node(tx, ptr, &node)
}

/// Turns pages `first..=last` into holes, freeing whole subtrees without visiting their pages.
/// Returns the number of data blocks freed.
pub fn punch(tx: &mut Tx<'_>, tree: &mut Tree, first: u64, last: u64) -> Result<u64> {
    let last = last.min(pages_covered(tree.height) - 1);
    if tree.is_empty() || first > last {
        return Ok(0);
    }
    let mut freed = 0;
    tree.ptr = punch_in(tx, tree.ptr, tree.height, 0, first, last, &mut freed)?;
    if tree.ptr.is_null() {
        tree.height = 0;
    }
    Ok(freed)
}

fn punch_in(tx: &mut Tx<'_>, ptr: BlkPtr, height: u8, base: u64, first: u64, last: u64, freed: &mut u64) -> Result<BlkPtr> {
    if ptr.is_null() {
        return Ok(ptr);
    }
    let span_all = pages_covered(height);
    if first <= base && last >= base + span_all - 1 {
        *freed += free_subtree(tx, ptr, height)?;
        return Ok(BlkPtr::NULL);
    }
    let mut node = read_node(tx.region, ptr)?;
    let span = pages_covered(height - 1);
    let lo = ((first - base) / span) as usize;
    let hi = ((last - base) / span) as usize;
    let mut changed = false;
    for (i, child) in node.iter_mut().enumerate().take(hi + 1).skip(lo) {
        if child.is_null() {
            continue;
        }
        let cbase = base + i as u64 * span;
        *child = punch_in(tx, *child, height - 1, cbase, first.max(cbase), last.min(cbase + span - 1), freed)?;
        changed = true;
    }
    if !changed {
        return Ok(ptr);
    }
    write_node(tx, ptr, &node)
}

/// Frees every block of a subtree; returns how many were data blocks. A damaged node cannot be
/// followed: its children are left to the next mount walk, which will not find them either.
pub fn free_subtree(tx: &mut Tx<'_>, ptr: BlkPtr, height: u8) -> Result<u64> {
    if ptr.is_null() {
        return Ok(0);
    }
    let mut data = 0;
    if height == 0 {
        data = 1;
    } else if let Ok(node) = read_node(tx.region, ptr) {
        for child in node.iter().filter(|c| !c.is_null()) {
            data += free_subtree(tx, *child, height - 1)?;
        }
    }
    tx.free_block(ptr.block());
    Ok(data)
}

/// First mapped page at or after `from`, if any.
pub fn next_mapped(region: &Region, tree: Tree, from: u64) -> Result<Option<u64>> {
    if tree.is_empty() || from >= pages_covered(tree.height) {
        return Ok(None);
    }
    seek(region, tree.ptr, tree.height, 0, from, true)
}

/// First hole at or after `from` (possibly past the tree's coverage).
pub fn next_hole(region: &Region, tree: Tree, from: u64) -> Result<u64> {
    if tree.is_empty() || from >= pages_covered(tree.height) {
        return Ok(from);
    }
    Ok(seek(region, tree.ptr, tree.height, 0, from, false)?.unwrap_or(pages_covered(tree.height)))
}

/// Finds the first page ≥ from that is mapped (`want_data`) or a hole (`!want_data`).
fn seek(region: &Region, ptr: BlkPtr, height: u8, base: u64, from: u64, want_data: bool) -> Result<Option<u64>> {
    if ptr.is_null() {
        return Ok(if want_data { None } else { Some(from.max(base)) });
    }
    if height == 0 {
        return Ok(if want_data { Some(base) } else { None });
    }
    let node = read_node(region, ptr)?;
    let span = pages_covered(height - 1);
    let lo = ((from.max(base) - base) / span) as usize;
    for (i, child) in node.iter().enumerate().skip(lo) {
        let cbase = base + i as u64 * span;
        if let Some(p) = seek(region, *child, height - 1, cbase, from.max(cbase), want_data)? {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// What the mount walk and fsck see.
pub enum Visit {
    /// An interior node (verified or not).
    Node { ptr: BlkPtr, ok: bool },
    /// A data block pointer at `page` (not read).
    Data { page: u64, ptr: BlkPtr },
    /// A child pointer of a damaged node, which is not followed.
    Unverified { ptr: BlkPtr },
}

/// Walks the whole tree, reporting every block pointer once.
pub fn walk(region: &Region, tree: Tree, f: &mut dyn FnMut(Visit)) {
    if !tree.is_empty() {
        walk_in(region, tree.ptr, tree.height, 0, f);
    }
}

fn walk_in(region: &Region, ptr: BlkPtr, height: u8, base: u64, f: &mut dyn FnMut(Visit)) {
    if height == 0 {
        f(Visit::Data { page: base, ptr });
        return;
    }
    match read_node(region, ptr) {
        Ok(node) => {
            f(Visit::Node { ptr, ok: true });
            let span = pages_covered(height - 1);
            for (i, child) in node.iter().enumerate().filter(|(_, c)| !c.is_null()) {
                walk_in(region, *child, height - 1, base + i as u64 * span, f);
            }
        }
        Err(_) => {
            f(Visit::Node { ptr, ok: false });
            let mut buf: Block = [0; BLOCK_SIZE];
            if region.read_into(ptr.block().offset(), &mut buf).is_ok() {
                let node = Node::read_from_bytes(&buf).expect("one block");
                for child in node.iter().filter(|c| !c.is_null()) {
                    f(Visit::Unverified { ptr: *child });
                }
            }
        }
    }
}
