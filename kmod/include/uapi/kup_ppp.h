/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * kup PPP (persistent physical pages): the user ABI of ppp.ko.
 *
 * The one definition of the interface between the module and kup: the Rust
 * side (ppp-abi) is checked against this file by a test that compiles it.
 *
 * Old kernel: the apps' private anonymous pages that lie in the arena get a
 * reference while the apps are frozen (PIN); kup writes their PFNs into the
 * checkpoint. New kernel: the same arena is hot-added with those PFNs held
 * back (ATTACH), and MAP puts them into holes of the restored process.
 */
#ifndef _UAPI_KUP_PPP_H
#define _UAPI_KUP_PPP_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define PPP_ABI_VERSION		3
/* The misc device, root only (mode 0600). */
#define PPP_DEVICE_NAME		"kup_ppp"
/* The name of the arena's memory in /proc/iomem once hot-added. */
#define PPP_RESOURCE_NAME	"System RAM (kup ppp)"

/* ppp_info.state */
#define PPP_STATE_ATTACHED	(1U << 0)	/* the arena is hot-added */
#define PPP_STATE_PROVISIONAL	(1U << 1)	/* pins taken while the app ran, */
						/* not yet confirmed */

struct ppp_info {
	__u32 abi_version;	/* PPP_ABI_VERSION */
	__u32 state;		/* PPP_STATE_* */
	__u64 arena_start;	/* physical address, bytes; 0 if not attached */
	__u64 arena_size;	/* bytes */
	__u64 block_size;	/* the kernel's memory block size, bytes */
	__u64 held_pages;	/* preserved pages held back, not yet mapped */
	__u64 pinned_pages;	/* pages with a checkpoint's reference */
	__u64 guarded_pages;	/* mapped pages kept intact until RELEASE */
	__u64 pin_tag;		/* the tag of those references; 0 if none */
};

/* Hot-adds the arena; the PFNs in held[] are kept off the page allocator. */
struct ppp_attach {
	__u64 arena_start;	/* aligned to block_size */
	__u64 arena_size;	/* a multiple of block_size */
	__u64 held;		/* user pointer to __u64 pfn[nr_held], ascending */
	__u64 nr_held;
};

/* ppp_page.why */
#define PPP_KEPT		0	/* stays in place (pfn is valid) */
#define PPP_NOT_PRESENT		1	/* no page at this address */
#define PPP_NOT_ARENA		2	/* the page lies outside the arena */
#define PPP_NOT_ANON		3	/* not a private anonymous page */
#define PPP_SHARED		4	/* mapped more than once (COW-shared) */
#define PPP_PINNED		5	/* already pinned */
#define PPP_BAD_CRC		6	/* MAP: the page's CRC does not match */
#define PPP_NOT_HELD		7	/* MAP: the PFN is not held back */
#define PPP_NOT_HOLE		8	/* MAP: the address cannot take the page */
#define PPP_EXIT_WRITE		9	/* the kernel writes it when the process exits */
#define PPP_RESTORER_READS	10	/* kup: CRIU's restorer reads it (vDSO, AIO ring) */

/* One page of a PIN or MAP request. */
struct ppp_page {
	__u64 pfn;		/* PIN: out, 0 unless kept; MAP: in */
	__u32 crc;		/* CRC-32 (IEEE 802.3) of the page */
	__u32 why;		/* PPP_KEPT or the reason it is not */
};

/* ppp_pin.flags */
#define PPP_PIN_CRC		(1U << 0)	/* compute each kept page's crc */
/*
 * The process may run: pins taken before the freeze, so that the frozen
 * window pays only for the pages written since. They are provisional: they
 * are dropped when the file that took them is closed, unless CONFIRM makes
 * them part of the checkpoint while every process they came from is stopped.
 */
#define PPP_PIN_RUNNING		(1U << 1)
/*
 * A page this tag pinned already is kept (PPP_KEPT, with its pfn and crc)
 * without another reference: the frozen pass over the pages written since
 * the provisional pins.
 */
#define PPP_PIN_REPIN		(1U << 2)

/*
 * Takes a reference on the present pages of [start, start + nr_pages pages)
 * of process pid, which must be stopped under ptrace (being checkpointed)
 * unless PPP_PIN_RUNNING. Kept pages stay referenced until UNPIN with the
 * same tag, or until kexec.
 */
struct ppp_pin {
	__u32 pid;
	__u32 flags;		/* PPP_PIN_* */
	__u64 tag;		/* nonzero; one tag at a time */
	__u64 start;		/* page-aligned virtual address */
	__u64 nr_pages;
	__u64 pages;		/* user pointer to struct ppp_page[nr_pages] */
	__u64 nr_kept;		/* out */
};

/* ppp_map.flags */
#define PPP_MAP_VERIFY		(1U << 0)	/* check each page's crc first */
/*
 * Keep the checkpoint's pages intact until RELEASE: each page is mapped
 * read-only and shared, with a reference of the module's, so that the
 * process's first write to it copies it. A fallback to the old kernel then
 * finds every page as it was at checkpoint.
 */
#define PPP_MAP_GUARD		(1U << 1)

/*
 * Maps held-back pages into holes of [start, start + nr_pages pages) of
 * process pid as its own private anonymous pages (no copy); a page still
 * pinned by a checkpoint of this boot is mapped as a copy. An address that
 * is already populated (written during the restore, e.g. a thread's rseq
 * area) gets the page's content copied into it instead. With PPP_MAP_VERIFY
 * nothing is mapped unless every page's CRC matches.
 */
struct ppp_map {
	__u32 pid;
	__u32 flags;		/* PPP_MAP_* */
	__u64 start;		/* page-aligned virtual address */
	__u64 nr_pages;
	__u64 pages;		/* user pointer to struct ppp_page[nr_pages] */
	__u64 nr_mapped;	/* out: put in place */
	__u64 nr_copied;	/* out: mapped as copies (pinned on this boot, or */
				/* into an address the restore had populated) */
	__u64 nr_guarded;	/* out: PPP_MAP_GUARD: pages guarded */
	__u64 failed;		/* out: index of the first page not mapped */
	__u32 failed_why;	/* out: PPP_* reason for that page */
	__u32 pad;
};

/*
 * The PFN list kup keeps in the checkpoint for each process: a head, then
 * nr_runs runs (pages at consecutive addresses in consecutive frames) in
 * ascending vaddr order, then one __u32 CRC-32 per page of the runs without
 * PPP_LIST_GONE, in the same order (nr_pages counts those pages).
 * Little-endian, as written on the old kernel and read on the new one. The
 * module never reads it: kup hands its PFNs to ATTACH and its pages to MAP.
 * kup writes one list while the process runs and, while it is frozen, a
 * second one of the changes: its runs replace the first list's pages at
 * their addresses, and its PPP_LIST_GONE runs (pfn 0) only remove them.
 */
#define PPP_LIST_MAGIC		0x4c505050	/* "PPPL" */
#define PPP_LIST_VERSION	3
#define PPP_LIST_GONE		1	/* ppp_list_run.flags: no pages here */

struct ppp_list_head {
	__u32 magic;		/* PPP_LIST_MAGIC */
	__u32 version;		/* PPP_LIST_VERSION */
	__u64 arena_start;	/* the arena the PFNs lie in */
	__u64 arena_size;
	__u64 nr_pages;
	__u64 nr_runs;
	__u32 pid;		/* the process, as CRIU restores it */
	__u32 crc;		/* CRC-32 of everything after the head */
};

struct ppp_list_run {
	__u64 vaddr;		/* of the first page */
	__u64 pfn;		/* of the first page */
	__u32 nr_pages;
	__u32 flags;		/* 0 or PPP_LIST_GONE */
};

#define PPP_IOC_MAGIC		0xB7
#define PPP_IOC_INFO		_IOR(PPP_IOC_MAGIC, 0, struct ppp_info)
#define PPP_IOC_ATTACH		_IOW(PPP_IOC_MAGIC, 1, struct ppp_attach)
#define PPP_IOC_PIN		_IOWR(PPP_IOC_MAGIC, 2, struct ppp_pin)
#define PPP_IOC_UNPIN		_IOW(PPP_IOC_MAGIC, 3, __u64)
#define PPP_IOC_MAP		_IOWR(PPP_IOC_MAGIC, 4, struct ppp_map)
/*
 * The checkpoint's pages are no longer needed (the restored apps are
 * healthy): every page still held back goes to the page allocator, and the
 * guard references of PPP_MAP_GUARD and the pins are dropped.
 */
#define PPP_IOC_RELEASE		_IO(PPP_IOC_MAGIC, 5)
/* 6 was CHECKSUM (ABI 1): PPP_PIN_RUNNING took its place. */

/*
 * The page addresses the kernel writes into when the threads of process pid
 * (stopped under ptrace) exit: clear_child_tid words and robust futex lists.
 * Such pages cannot stay in place (the checkpointed process is killed after
 * its pages were pinned). More than nr: ENOSPC, nr then says how many.
 */
struct ppp_exit_writes {
	__u32 pid;
	__u32 nr;		/* in: room at addrs; out: how many */
	__u64 addrs;		/* user pointer to __u64[nr], ascending */
};
#define PPP_IOC_EXIT_WRITES	_IOWR(PPP_IOC_MAGIC, 7, struct ppp_exit_writes)

/*
 * Ends the provisional state of the pins of the processes pids[], each of
 * which was pinned with PPP_PIN_RUNNING and must now be stopped under
 * ptrace; the pins of drop[] are let go (pages unmapped or moved since).
 * Once no process is provisional, the tag's pins are the checkpoint's.
 */
struct ppp_confirm {
	__u64 tag;
	__u64 pids;		/* user pointer to __u32 pid[nr_pids] */
	__u64 drop;		/* user pointer to __u64 pfn[nr_drop] */
	__u64 nr_drop;
	__u32 nr_pids;
	__u32 pad;
};
#define PPP_IOC_CONFIRM		_IOW(PPP_IOC_MAGIC, 8, struct ppp_confirm)

/*
 * WRITTEN: which pages of [start, start + nr_pages) of a process's private
 * mappings were written since their soft-dirty bits were last reset
 * (/proc/PID/clear_refs, or a WRITTEN before), as a bitmap (bit i of word
 * i / 64: page i); their bits are reset. The process may run: each page table
 * entry is read and reset under its lock, so that no write goes unseen (a read
 * of /proc/PID/pagemap followed by clear_refs misses the pages first written in
 * between). A transparent huge page written since counts as written and keeps
 * its bit. -EOPNOTSUPP for a process whose memory another MMU mirrors (an MMU
 * notifier is registered).
 */
struct ppp_written {
	__u32 pid;
	__u32 pad;
	__u64 start;		/* page-aligned virtual address */
	__u64 nr_pages;		/* at most PPP_WRITTEN_MAX_PAGES */
	__u64 bitmap;		/* user pointer to __u64[(nr_pages + 63) / 64] */
	__u64 nr_written;	/* out: bits set */
};
#define PPP_WRITTEN_MAX_PAGES	(1ULL << 28)
#define PPP_IOC_WRITTEN		_IOWR(PPP_IOC_MAGIC, 9, struct ppp_written)

#endif /* _UAPI_KUP_PPP_H */
