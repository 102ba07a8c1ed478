// SPDX-License-Identifier: GPL-2.0
/*
 * ppp.ko - persistent physical pages for kup.
 *
 * An arena reserved on every boot with memmap=SIZE$START is hot-added as
 * driver-managed, movable memory, so that applications' pages land there.
 * At checkpoint, with the applications stopped by CRIU, their private
 * anonymous pages in the arena get a reference (PIN) and kup records their
 * PFNs. Pins taken while they still run are kept current by WRITTEN, which
 * reports and resets the soft-dirty bits of the pages written since, race-free
 * under the page-table locks. The arena survives kexec untouched:
 * kexec_file_load never places segments in driver-managed memory and the new
 * kernel boots with the same memmap=. On the new kernel the arena is hot-added again with the recorded
 * PFNs held back from the page allocator (ATTACH), and MAP inserts them into
 * holes of the restored process with migrate_vma, as ordinary anonymous
 * pages: nothing is copied.
 *
 * Until the restored applications are healthy (RELEASE), the mapped pages
 * stay as they were at checkpoint: mapped read-only and shared (GUARD), so a
 * write copies them, and a fallback to the old kernel finds them unchanged.
 *
 * Safety: the arena must be a reserved range that is not System RAM (so a
 * kernel booted without the memmap= reservation is refused); only held-back
 * PFNs are ever mapped, each at most once, into private anonymous VMAs (a
 * page the restore populated is replaced without copying data), and pages
 * still pinned on this boot only as copies; pins become a checkpoint's only
 * while the processes are stopped under ptrace (pins taken while they ran
 * are provisional until CONFIRM, and dropped with the file that took them
 * otherwise); the device is root only.
 * The user ABI is include/uapi/kup_ppp.h. Built and run on Linux 6.1 and
 * 6.12 (Debian bookworm and its 6.12 kernels); the few differences are in
 * ppp_gup() and ppp_mapcount() (Kbuild names them) and hold_online().
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/crc32.h>
/* The futex.h of 6.12 uses mutex_init() without including it. */
#include <linux/mutex.h>
#include <linux/futex.h>
#include <linux/highmem.h>
#include <linux/ioport.h>
#include <linux/memory.h>
#include <linux/memory_hotplug.h>
#include <linux/migrate.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmap_lock.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/rseq.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#include <asm/tlbflush.h>

#include "include/uapi/kup_ppp.h"

/* Pages handled per step (the arrays of one step live on the heap). */
#define PPP_BATCH	512

static DEFINE_MUTEX(ppp_lock);

/* The arena, once attached. */
static unsigned long arena_pfn;
static unsigned long arena_pages;
/* One bit per arena page: held back for MAP (new kernel). */
static unsigned long *held;
static unsigned long nr_held;

/* One bit per arena page: referenced by PIN (old kernel). */
static unsigned long *pinned;
static unsigned long nr_pins;
/* One bit per arena page: mapped, and kept intact until RELEASE (new kernel). */
static unsigned long *guarded;
static unsigned long nr_guarded;
static u64 pin_tag;
/*
 * Pins taken while the processes ran (PPP_PIN_RUNNING): the file that took
 * them, which drops them when closed unless CONFIRM came first, and the
 * processes they came from, which CONFIRM finds stopped.
 */
static struct file *prov_file;
static pid_t *prov_pids;
static unsigned int nr_prov_pids, max_prov_pids;

static bool in_arena(unsigned long pfn)
{
	return pfn >= arena_pfn && pfn - arena_pfn < arena_pages;
}

static bool is_held(unsigned long pfn)
{
	return held && in_arena(pfn) && test_bit(pfn - arena_pfn, held);
}

static bool is_pinned(unsigned long pfn)
{
	return pinned && in_arena(pfn) && test_bit(pfn - arena_pfn, pinned);
}

static u32 page_crc(struct page *page)
{
	void *kaddr = kmap_local_page(page);
	u32 crc = ~crc32_le(~0U, kaddr, PAGE_SIZE);

	kunmap_local(kaddr);
	return crc;
}

/* A held-back page keeps its single reference and is marked reserved. */
static void hold_online(struct page *page)
{
	/* Hot-added pages start out PageOffline from 6.12 on, not reserved. */
	if (PageOffline(page)) {
		__ClearPageOffline(page);
		SetPageReserved(page);
	}
	/* Managed memory, or overcommit would refuse the restored mappings. */
	adjust_managed_page_count(page, 1);
}

/* Called for each chunk of the arena as it comes online. */
static void ppp_online_page(struct page *page, unsigned int order)
{
	unsigned long pfn = page_to_pfn(page);
	unsigned long i, n = 1UL << order;

	if (!held || !in_arena(pfn) ||
	    find_next_bit(held, arena_pages, pfn - arena_pfn) >=
	    pfn - arena_pfn + n) {
		generic_online_page(page, order);
		return;
	}
	for (i = 0; i < n; i++) {
		if (is_held(pfn + i))
			hold_online(pfn_to_page(pfn + i));
		else
			generic_online_page(pfn_to_page(pfn + i), 0);
	}
}

static long ppp_info(void __user *arg)
{
	struct ppp_info info = {
		.abi_version = PPP_ABI_VERSION,
		.block_size = memory_block_size_bytes(),
	};

	mutex_lock(&ppp_lock);
	if (arena_pages) {
		info.state |= PPP_STATE_ATTACHED;
		info.arena_start = PFN_PHYS(arena_pfn);
		info.arena_size = PFN_PHYS(arena_pages);
	}
	info.held_pages = nr_held;
	info.pinned_pages = nr_pins;
	info.guarded_pages = nr_guarded;
	info.pin_tag = pin_tag;
	if (prov_file)
		info.state |= PPP_STATE_PROVISIONAL;
	mutex_unlock(&ppp_lock);
	return copy_to_user(arg, &info, sizeof(info)) ? -EFAULT : 0;
}

/* Marks the ascending PFNs of the user array in the held bitmap. */
static int load_held(u64 __user *upfn, u64 nr, unsigned long *bits,
		     unsigned long base, unsigned long pages)
{
	u64 *buf, i, j, last = 0;
	int ret = 0;

	buf = kmalloc_array(PPP_BATCH, sizeof(*buf), GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	for (i = 0; i < nr && !ret; i += PPP_BATCH) {
		u64 n = min_t(u64, PPP_BATCH, nr - i);

		if (copy_from_user(buf, upfn + i, n * sizeof(*buf))) {
			ret = -EFAULT;
			break;
		}
		for (j = 0; j < n; j++) {
			if (buf[j] < base || buf[j] - base >= pages ||
			    (i + j && buf[j] <= last)) {
				pr_err("held PFN %#llx is outside the arena or out of order\n",
				       buf[j]);
				ret = -EINVAL;
				break;
			}
			last = buf[j];
			__set_bit(buf[j] - base, bits);
		}
	}
	kfree(buf);
	return ret;
}

static long ppp_attach(void __user *arg)
{
	struct ppp_attach req;
	unsigned long bs = memory_block_size_bytes();
	unsigned long *bits, *pins = NULL, *guards = NULL;
	u64 pa;
	int ret, nid;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (!req.arena_size || req.arena_start % bs || req.arena_size % bs ||
	    req.arena_start + req.arena_size < req.arena_start)
		return -EINVAL;
	/*
	 * Without memmap=SIZE$START the range is ordinary RAM that the page
	 * allocator already hands out: never touch it.
	 */
	if (region_intersects(req.arena_start, req.arena_size,
			      IORESOURCE_SYSTEM_RAM, IORES_DESC_NONE) !=
	    REGION_DISJOINT) {
		pr_err("[%#llx, %#llx) is System RAM: boot with memmap=%#llx$%#llx\n",
		       req.arena_start, req.arena_start + req.arena_size,
		       req.arena_size, req.arena_start);
		return -EADDRINUSE;
	}
	if (region_intersects(req.arena_start, req.arena_size, IORESOURCE_MEM,
			      IORES_DESC_RESERVED) != REGION_INTERSECTS) {
		pr_err("[%#llx, %#llx) is not wholly a memmap= reservation\n",
		       req.arena_start, req.arena_start + req.arena_size);
		return -ENXIO;
	}

	mutex_lock(&ppp_lock);
	ret = -EBUSY;
	if (arena_pages)
		goto unlock;
	ret = -ENOMEM;
	bits = vzalloc(BITS_TO_LONGS(PHYS_PFN(req.arena_size)) *
		       sizeof(long));
	pins = vzalloc(BITS_TO_LONGS(PHYS_PFN(req.arena_size)) *
		       sizeof(long));
	guards = vzalloc(BITS_TO_LONGS(PHYS_PFN(req.arena_size)) *
			 sizeof(long));
	if (!bits || !pins || !guards)
		goto free_bits;
	ret = load_held(u64_to_user_ptr(req.held), req.nr_held, bits,
			PHYS_PFN(req.arena_start), PHYS_PFN(req.arena_size));
	if (ret)
		goto free_bits;

	held = bits;
	pinned = pins;
	guarded = guards;
	nr_held = req.nr_held;
	arena_pfn = PHYS_PFN(req.arena_start);
	arena_pages = PHYS_PFN(req.arena_size);
	ret = set_online_page_callback(ppp_online_page);
	if (ret) {
		pr_err("the online-page callback is taken (virtio-mem or a balloon driver?)\n");
		goto reset;
	}
	for (pa = req.arena_start; pa < req.arena_start + req.arena_size;
	     pa += bs) {
		nid = memory_add_physaddr_to_nid(pa);
		/* Never MHP_MEMMAP_ON_MEMORY: the memmap would overwrite pages. */
		ret = add_memory_driver_managed(nid, pa, bs, PPP_RESOURCE_NAME,
						MHP_NONE);
		if (ret) {
			pr_err("hot-adding [%#llx, %#llx) failed: %d\n", pa,
			       pa + bs, ret);
			break;
		}
	}
	if (ret) {
		if (pa > req.arena_start)
			remove_memory(req.arena_start, pa - req.arena_start);
		restore_online_page_callback(ppp_online_page);
		goto reset;
	}
	/* Memory was added: the callback and this module stay for good. */
	__module_get(THIS_MODULE);
	pr_info("arena [%#llx, %#llx) added, %llu pages held back\n",
		req.arena_start, req.arena_start + req.arena_size, req.nr_held);
	mutex_unlock(&ppp_lock);
	return 0;

reset:
	held = NULL;
	pinned = NULL;
	guarded = NULL;
	nr_held = 0;
	arena_pfn = 0;
	arena_pages = 0;
free_bits:
	vfree(guards);
	vfree(pins);
	vfree(bits);
unlock:
	mutex_unlock(&ppp_lock);
	return ret;
}

/*
 * The task of pid, with a reference. With must_be_stopped, every thread of it
 * must be stopped under ptrace, as CRIU keeps the tasks it checkpoints.
 */
static struct task_struct *find_task(pid_t pid, bool must_be_stopped,
				     int *err)
{
	struct task_struct *task, *t;
	bool stopped = true;

	rcu_read_lock();
	task = pid_task(find_vpid(pid), PIDTYPE_PID);
	if (task) {
		get_task_struct(task);
		for_each_thread(task, t)
			if (!task_is_traced(t))
				stopped = false;
	}
	rcu_read_unlock();
	if (!task) {
		*err = -ESRCH;
		return NULL;
	}
	if (must_be_stopped && !stopped) {
		put_task_struct(task);
		*err = -EPERM;
		return NULL;
	}
	return task;
}

/* The task of pid (as find_task()) and its mm, both with a reference. */
static struct mm_struct *find_mm(pid_t pid, bool must_be_stopped,
				 struct task_struct **task, int *err)
{
	struct mm_struct *mm;

	*task = find_task(pid, must_be_stopped, err);
	if (!*task)
		return NULL;
	mm = get_task_mm(*task);
	if (!mm) {
		put_task_struct(*task);
		*err = -ESRCH;
	}
	return mm;
}

/* A nonempty, page-aligned range of user addresses. */
static bool user_range_ok(u64 start, u64 nr_pages)
{
	return PAGE_ALIGNED(start) && nr_pages &&
	       nr_pages <= TASK_SIZE_MAX >> PAGE_SHIFT;
}

/* References on n pages from addr on (stops at the first it cannot take). */
static long ppp_gup(struct mm_struct *mm, unsigned long addr, unsigned long n,
		    unsigned int flags, struct page **pages)
{
#ifdef PPP_GUP_HAS_VMAS
	return get_user_pages_remote(mm, addr, n, flags, pages, NULL, NULL);
#else
	return get_user_pages_remote(mm, addr, n, flags, pages, NULL);
#endif
}

/*
 * References on the present pages from addr on, up to the first one that is
 * not present; returns how many (vmas[i] is page i's VMA). The caller holds
 * the mmap lock.
 */
static long gup_present(struct mm_struct *mm, unsigned long addr,
			unsigned long n, struct page **pages,
			struct vm_area_struct **vmas)
{
	struct vm_area_struct *vma = NULL;
	long got = ppp_gup(mm, addr, n, FOLL_NOFAULT, pages), i;

	for (i = 0; i < got; i++, addr += PAGE_SIZE) {
		if (!vma || addr >= vma->vm_end)
			vma = vma_lookup(mm, addr);
		vmas[i] = vma;
	}
	return got;
}

/* How many times the page itself is mapped (page_mapcount() of 6.1). */
static int ppp_mapcount(struct page *page)
{
#ifdef PPP_HAS_PAGE_MAPCOUNT
	return page_mapcount(page);
#else
	struct folio *folio = page_folio(page);

	/* folio_mapcount() counts the mappings of all pages of a large folio. */
	if (!folio_test_large(folio))
		return folio_mapcount(folio);
	return atomic_read(&page->_mapcount) + 1 + folio_entire_mapcount(folio);
#endif
}

/*
 * The pages the kernel writes into when the threads of a process exit: each
 * thread's clear_child_tid word and the futex words of its robust list (see
 * mm_release() and exit_robust_list()). A checkpointed process is killed
 * after its pages were pinned, so these pages go the copying way.
 */
struct exit_writes {
	unsigned long *page;
	unsigned int nr, max;
};

/* Returns false when out of memory (then nothing may be kept). */
static bool exit_write(struct exit_writes *ew, unsigned long addr)
{
	unsigned long *grown;

	if (!addr)
		return true;
	if (ew->nr == ew->max) {
		grown = krealloc_array(ew->page, ew->max * 2 + 16,
				       sizeof(*grown), GFP_KERNEL);
		if (!grown)
			return false;
		ew->page = grown;
		ew->max = ew->max * 2 + 16;
	}
	ew->page[ew->nr++] = addr & PAGE_MASK;
	return true;
}

static int cmp_ulong(const void *a, const void *b)
{
	unsigned long x = *(const unsigned long *)a;
	unsigned long y = *(const unsigned long *)b;

	return x < y ? -1 : x > y;
}

static bool is_exit_write(const struct exit_writes *ew, unsigned long addr)
{
	unsigned int i;

	for (i = 0; i < ew->nr; i++)
		if (ew->page[i] == addr)
			return true;
	return false;
}

static unsigned long read_user_ptr(struct task_struct *task,
				   unsigned long addr, bool *ok)
{
	unsigned long v = 0;

	*ok = access_process_vm(task, addr, &v, sizeof(v), 0) == sizeof(v);
	return v;
}

/* Returns false when the lists could not be read (then nothing is kept). */
static bool collect_exit_writes(struct task_struct *task,
				struct exit_writes *ew)
{
	/* The process is stopped: its threads do not come or go. */
	unsigned int max = READ_ONCE(task->signal->nr_threads) + 1;
	unsigned long *heads, *tids;
	struct task_struct *t;
	unsigned int nr = 0, i;
	bool ok = true;

	heads = kmalloc_array(max, sizeof(*heads), GFP_KERNEL);
	tids = kmalloc_array(max, sizeof(*tids), GFP_KERNEL);
	if (!heads || !tids) {
		ok = false;
		goto out;
	}
	rcu_read_lock();
	for_each_thread(task, t) {
		if (nr == max) {
			ok = false;
			break;
		}
		tids[nr] = (unsigned long)t->clear_child_tid;
		heads[nr++] = (unsigned long)t->robust_list;
	}
	rcu_read_unlock();
	for (i = 0; i < nr && ok; i++) {
		struct robust_list_head head;
		unsigned long entry, limit = ROBUST_LIST_LIMIT;

		if (!exit_write(ew, tids[i])) {
			ok = false;
			break;
		}
		if (!heads[i])
			continue;
		if (access_process_vm(task, heads[i], &head, sizeof(head), 0) !=
		    sizeof(head)) {
			ok = false;
			break;
		}
		entry = (unsigned long)head.list.next & ~1UL;
		while (ok && entry && entry != heads[i] && limit--) {
			ok = exit_write(ew, entry + head.futex_offset);
			if (ok)
				entry = read_user_ptr(task, entry, &ok) & ~1UL;
		}
		entry = (unsigned long)head.list_op_pending & ~1UL;
		if (ok && entry)
			ok = exit_write(ew, entry + head.futex_offset);
	}
out:
	kfree(tids);
	kfree(heads);
	return ok;
}

/* Why the page cannot stay in place, or PPP_KEPT. */
static u32 keepable(struct page *page, struct vm_area_struct *vma,
		    unsigned long addr, const struct exit_writes *ew)
{
	if (is_exit_write(ew, addr))
		return PPP_EXIT_WRITE;
	if (!vma || !vma_is_anonymous(vma) || (vma->vm_flags & VM_SHARED) ||
	    !PageAnon(page))
		return PPP_NOT_ANON;
	if (!in_arena(page_to_pfn(page)))
		return PPP_NOT_ARENA;
	if (ppp_mapcount(page) != 1)
		return PPP_SHARED;
	if (test_bit(page_to_pfn(page) - arena_pfn, pinned))
		return PPP_PINNED;
	return PPP_KEPT;
}

/* Records a process pinned while running (CONFIRM finds it stopped). */
static int note_prov_pid(pid_t pid)
{
	pid_t *grown;
	unsigned int i;

	for (i = 0; i < nr_prov_pids; i++)
		if (prov_pids[i] == pid)
			return 0;
	if (nr_prov_pids == max_prov_pids) {
		grown = krealloc_array(prov_pids, max_prov_pids * 2 + 16,
				       sizeof(*grown), GFP_KERNEL);
		if (!grown)
			return -ENOMEM;
		prov_pids = grown;
		max_prov_pids = max_prov_pids * 2 + 16;
	}
	prov_pids[nr_prov_pids++] = pid;
	return 0;
}

/* The pins are no longer provisional (or are gone). */
static void end_provisional(void)
{
	kfree(prov_pids);
	prov_pids = NULL;
	nr_prov_pids = 0;
	max_prov_pids = 0;
	prov_file = NULL;
}

/*
 * PIN. With PPP_PIN_RUNNING the process runs, its pins are provisional and
 * its exit writes are left to the frozen pass (EXIT_WRITES, then REPIN).
 */
static long ppp_pin(struct file *file, void __user *arg)
{
	struct ppp_pin req;
	struct ppp_page *out = NULL;
	struct page **pages = NULL;
	struct vm_area_struct **vmas = NULL;
	struct task_struct *task;
	struct mm_struct *mm;
	struct exit_writes ew = {};
	u64 i, kept = 0;
	bool running, repin;
	long ret = 0;
	int err = 0;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (!req.tag || !user_range_ok(req.start, req.nr_pages) ||
	    (req.flags & ~(PPP_PIN_CRC | PPP_PIN_RUNNING | PPP_PIN_REPIN)))
		return -EINVAL;
	running = req.flags & PPP_PIN_RUNNING;
	repin = req.flags & PPP_PIN_REPIN;
	mm = find_mm(req.pid, !running, &task, &err);
	if (!mm)
		return err;
	if (!running && !collect_exit_writes(task, &ew)) {
		put_task_struct(task);
		mmput(mm);
		kfree(ew.page);
		return -EIO;
	}
	put_task_struct(task);
	out = kvmalloc_array(PPP_BATCH, sizeof(*out), GFP_KERNEL);
	pages = kvmalloc_array(PPP_BATCH, sizeof(*pages), GFP_KERNEL);
	vmas = kvmalloc_array(PPP_BATCH, sizeof(*vmas), GFP_KERNEL);
	if (!out || !pages || !vmas) {
		ret = -ENOMEM;
		goto out;
	}

	mutex_lock(&ppp_lock);
	if (!arena_pages) {
		ret = -ENODEV;
		goto unlock;
	}
	if (pin_tag && pin_tag != req.tag) {
		ret = -EBUSY;
		goto unlock;
	}
	if (prov_file && prov_file != file) {
		ret = -EBUSY;
		goto unlock;
	}
	if (running) {
		/* Only a checkpoint that has not been confirmed yet. */
		if (pin_tag && !prov_file) {
			ret = -EBUSY;
			goto unlock;
		}
		ret = note_prov_pid(req.pid);
		if (ret)
			goto unlock;
		prov_file = file;
		pin_tag = req.tag;
	}
	mmap_read_lock(mm);
	for (i = 0; i < req.nr_pages && !ret; i += PPP_BATCH) {
		u64 n = min_t(u64, PPP_BATCH, req.nr_pages - i), j = 0;

		while (j < n) {
			unsigned long addr = req.start + ((i + j) << PAGE_SHIFT);
			long got = gup_present(mm, addr, n - j, pages + j,
					       vmas + j);
			long k;

			if (got <= 0) {
				/* Not present, or not a page (a PFN mapping). */
				out[j++] = (struct ppp_page){
					.why = PPP_NOT_PRESENT,
				};
				continue;
			}
			for (k = 0; k < got; k++, j++) {
				struct page *page = pages[j];

				out[j] = (struct ppp_page){
					.why = keepable(page, vmas[j],
							addr + (k << PAGE_SHIFT),
							&ew),
				};
				if (out[j].why == PPP_PINNED && repin) {
					/* Pinned before the freeze: kept. */
					out[j].why = PPP_KEPT;
					put_page(page);
					kept++;
					out[j].pfn = page_to_pfn(page);
					if (req.flags & PPP_PIN_CRC)
						out[j].crc = page_crc(page);
					continue;
				}
				if (out[j].why != PPP_KEPT) {
					put_page(page);
					continue;
				}
				/* The reference GUP took stays until UNPIN. */
				__set_bit(page_to_pfn(page) - arena_pfn, pinned);
				nr_pins++;
				kept++;
				pin_tag = req.tag;
				out[j].pfn = page_to_pfn(page);
				if (req.flags & PPP_PIN_CRC)
					out[j].crc = page_crc(page);
			}
		}
		if (!ret && copy_to_user(u64_to_user_ptr(req.pages) +
					 i * sizeof(*out), out,
					 n * sizeof(*out)))
			ret = -EFAULT;
	}
	mmap_read_unlock(mm);
	req.nr_kept = kept;
	if (!ret && copy_to_user(arg, &req, sizeof(req)))
		ret = -EFAULT;
unlock:
	mutex_unlock(&ppp_lock);
out:
	kvfree(vmas);
	kvfree(pages);
	kvfree(out);
	kfree(ew.page);
	mmput(mm);
	return ret;
}

/* Drops the reference of every page marked in bits (an arena bitmap). */
static void put_marked(unsigned long *bits)
{
	unsigned long bit;

	if (!bits)
		return;
	for_each_set_bit(bit, bits, arena_pages) {
		__clear_bit(bit, bits);
		put_page(pfn_to_page(arena_pfn + bit));
	}
}

static long ppp_unpin(void __user *arg)
{
	u64 tag;

	if (copy_from_user(&tag, arg, sizeof(tag)))
		return -EFAULT;
	mutex_lock(&ppp_lock);
	if (!pin_tag || tag != pin_tag) {
		mutex_unlock(&ppp_lock);
		return -ENOENT;
	}
	put_marked(pinned);
	nr_pins = 0;
	pin_tag = 0;
	end_provisional();
	mutex_unlock(&ppp_lock);
	return 0;
}

static long ppp_exit_writes(void __user *arg)
{
	struct ppp_exit_writes req;
	struct exit_writes ew = {};
	struct task_struct *task;
	unsigned int i, j, nr = 0;
	long ret = 0;
	int err = 0;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	task = find_task(req.pid, true, &err);
	if (!task)
		return err;
	if (!collect_exit_writes(task, &ew)) {
		ret = -EIO;
		goto out;
	}
	/* Ascending, each page once. */
	sort(ew.page, ew.nr, sizeof(*ew.page), cmp_ulong, NULL);
	for (i = 0; i < ew.nr; i = j) {
		for (j = i + 1; j < ew.nr && ew.page[j] == ew.page[i]; j++)
			;
		if (nr < req.nr &&
		    put_user((u64)ew.page[i],
			     (u64 __user *)u64_to_user_ptr(req.addrs) + nr)) {
			ret = -EFAULT;
			goto out;
		}
		nr++;
	}
	if (nr > req.nr)
		ret = -ENOSPC;
	req.nr = nr;
	if (copy_to_user(arg, &req, sizeof(req)))
		ret = -EFAULT;
out:
	kfree(ew.page);
	put_task_struct(task);
	return ret;
}

static long ppp_confirm(void __user *arg)
{
	struct ppp_confirm req;
	pid_t *pids = NULL;
	u64 *drop = NULL;
	unsigned int i, j;
	long ret = 0;
	u64 k;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	mutex_lock(&ppp_lock);
	if (!pin_tag || req.tag != pin_tag) {
		ret = -ENOENT;
		goto unlock;
	}
	if (req.nr_drop > nr_pins || req.nr_pids > nr_prov_pids) {
		ret = -EINVAL;
		goto unlock;
	}
	pids = kmalloc_array(max_t(u32, req.nr_pids, 1), sizeof(*pids),
			     GFP_KERNEL);
	drop = kvmalloc_array(max_t(u64, req.nr_drop, 1), sizeof(*drop),
			      GFP_KERNEL);
	if (!pids || !drop) {
		ret = -ENOMEM;
		goto unlock;
	}
	if (copy_from_user(pids, u64_to_user_ptr(req.pids),
			   req.nr_pids * sizeof(*pids)) ||
	    copy_from_user(drop, u64_to_user_ptr(req.drop),
			   req.nr_drop * sizeof(*drop))) {
		ret = -EFAULT;
		goto unlock;
	}
	/* Each must have been pinned while running, and be stopped now. */
	for (i = 0; i < req.nr_pids; i++) {
		struct task_struct *task;
		int err = 0;

		for (j = 0; j < nr_prov_pids && prov_pids[j] != pids[i]; j++)
			;
		if (j == nr_prov_pids) {
			ret = -EINVAL;
			goto unlock;
		}
		task = find_task(pids[i], true, &err);
		if (!task) {
			ret = err;
			goto unlock;
		}
		put_task_struct(task);
	}
	/* All or nothing: every PFN must be pinned, each named once. */
	for (k = 0; k < req.nr_drop; k++) {
		if (!is_pinned(drop[k]))
			break;
		__clear_bit(drop[k] - arena_pfn, pinned);
	}
	if (k < req.nr_drop) {
		while (k--)
			__set_bit(drop[k] - arena_pfn, pinned);
		ret = -EINVAL;
		goto unlock;
	}
	for (k = 0; k < req.nr_drop; k++)
		put_page(pfn_to_page(drop[k]));
	nr_pins -= req.nr_drop;
	for (i = 0; i < req.nr_pids; i++) {
		for (j = 0; j < nr_prov_pids && prov_pids[j] != pids[i]; j++)
			;
		if (j < nr_prov_pids)
			prov_pids[j] = prov_pids[--nr_prov_pids];
	}
	if (!nr_prov_pids)
		end_provisional();
unlock:
	mutex_unlock(&ppp_lock);
	kvfree(drop);
	kfree(pids);
	return ret;
}

/* A provisional checkpoint ends with the file that took its pins. */
static int ppp_file_release(struct inode *inode, struct file *file)
{
	mutex_lock(&ppp_lock);
	if (prov_file == file) {
		put_marked(pinned);
		nr_pins = 0;
		pin_tag = 0;
		end_provisional();
	}
	mutex_unlock(&ppp_lock);
	return 0;
}

/* What became of one page in map_run(). */
enum map_result { MAP_INSERTED, MAP_REPLACED, MAP_POPULATED, MAP_FAILED };

static void unhold(unsigned long pfn)
{
	__clear_bit(pfn - arena_pfn, held);
	nr_held--;
}

/*
 * Inserts the pages use[0..n) into the holes of [addr, addr + n pages) of one
 * anonymous VMA; res[i] says what became of page i. use[i] is the held-back
 * page pg[i].pfn itself, or a fresh copy of a page still pinned by a
 * checkpoint of this very boot.
 */
static void map_run(struct vm_area_struct *vma, unsigned long addr,
		    const struct ppp_page *pg, struct page **use,
		    unsigned long n, unsigned long *src, unsigned long *dst,
		    u8 *res)
{
	struct migrate_vma mig = {
		.vma = vma,
		.start = addr,
		.end = addr + (n << PAGE_SHIFT),
		.src = src,
		.dst = dst,
		.flags = MIGRATE_VMA_SELECT_SYSTEM,
	};
	unsigned long i;

	memset(dst, 0, n * sizeof(*dst));
	if (migrate_vma_setup(&mig)) {
		memset(res, MAP_FAILED, n);
		return;
	}
	for (i = 0; i < n; i++) {
		struct page *page = use[i];
		bool hole = !migrate_pfn_to_page(src[i]);

		if (!(src[i] & MIGRATE_PFN_MIGRATE)) {
			res[i] = hole ? MAP_FAILED : MAP_POPULATED;
			continue;
		}
		/*
		 * A hole takes the page; a page the restore populated (e.g.
		 * a thread's rseq area, or a whole transparent huge page
		 * around it) is replaced by it: migrate_vma moves the mapping
		 * without copying data (MIGRATE_SYNC_NO_COPY), so the content
		 * is the preserved one. An extra reference: the finalize step
		 * drops one of every page it was given, moved or not.
		 */
		ClearPageReserved(page);
		get_page(page);
		lock_page(page);
		dst[i] = migrate_pfn(page_to_pfn(page));
		res[i] = hole ? MAP_INSERTED : MAP_REPLACED;
	}
	migrate_vma_pages(&mig);
	for (i = 0; i < n; i++)
		if (dst[i] && !(src[i] & MIGRATE_PFN_MIGRATE))
			res[i] = res[i] == MAP_REPLACED ? MAP_POPULATED :
							  MAP_FAILED;
	migrate_vma_finalize(&mig);
	for (i = 0; i < n; i++) {
		struct page *page = use[i];
		bool copy = page_to_pfn(page) != pg[i].pfn;

		if (res[i] == MAP_INSERTED || res[i] == MAP_REPLACED) {
			/* The mapping's reference is the only one now. */
			put_page(page);
			if (!copy)
				unhold(pg[i].pfn);
		} else if (dst[i] && copy) {
			put_page(page);
		} else if (dst[i]) {
			/* Not moved in: held again (one reference, reserved). */
			SetPageReserved(page);
		}
	}
}

/*
 * Copies a held-back page into the populated address addr, then gives the
 * held page to the page allocator, unless it is to be kept (guard).
 */
static int copy_into(struct mm_struct *mm, unsigned long addr,
		     unsigned long pfn, bool keep)
{
	struct page *dst, *page = pfn_to_page(pfn);
	void *d, *s;
	long got;

	got = ppp_gup(mm, addr, 1, FOLL_WRITE | FOLL_FORCE, &dst);
	if (got != 1)
		return -EFAULT;
	d = kmap_local_page(dst);
	s = kmap_local_page(page);
	copy_page(d, s);
	kunmap_local(s);
	kunmap_local(d);
	put_page(dst);
	if (keep)
		return 0;
	ClearPageReserved(page);
	put_page(page);
	unhold(pfn);
	return 0;
}

/* The PMD entry of addr in mm, if the levels above it are present. */
static pmd_t *find_pmd(struct mm_struct *mm, unsigned long addr)
{
	pgd_t *pgd = pgd_offset(mm, addr);
	p4d_t *p4d;
	pud_t *pud;

	if (pgd_none(*pgd) || pgd_bad(*pgd))
		return NULL;
	p4d = p4d_offset(pgd, addr);
	if (p4d_none(*p4d) || p4d_bad(*p4d))
		return NULL;
	pud = pud_offset(p4d, addr);
	if (pud_none(*pud) || pud_bad(*pud))
		return NULL;
	return pmd_offset(pud, addr);
}

struct guard_walk {
	struct mm_struct *mm;
	unsigned long pfn;
	bool done;
};

/* The page's PTE, under its lock (apply_to_existing_page_range()). */
static int guard_pte(pte_t *pte, unsigned long addr, void *data)
{
	struct guard_walk *g = data;
	struct page *page = pfn_to_page(g->pfn);
	pte_t old = ptep_get(pte);

	if (pte_present(old) && pte_pfn(old) == g->pfn && PageAnon(page)) {
		ptep_set_wrprotect(g->mm, addr, pte);
		ClearPageAnonExclusive(page);
		get_page(page);
		__set_bit(g->pfn - arena_pfn, guarded);
		nr_guarded++;
		g->done = true;
	}
	return 0;
}

/*
 * Keeps the mapped page at addr as it is until RELEASE: its PTE becomes
 * read-only and the page no longer exclusive to the process, and the module
 * takes a reference, so that do_wp_page() copies it on the first write. The
 * process is stopped and never touched the page since it was mapped, so no
 * TLB holds a writable entry for it. Returns whether the page is guarded.
 */
static bool guard_page(struct mm_struct *mm, unsigned long addr,
		       unsigned long pfn)
{
	struct guard_walk g = { .mm = mm, .pfn = pfn };
	pmd_t *pmd = find_pmd(mm, addr);

	/* The walk stops at a huge PMD; with the mmap lock held none appears. */
	if (!pmd || pmd_none(*pmd) || pmd_trans_huge(*pmd) || pmd_bad(*pmd))
		return false;
	apply_to_existing_page_range(mm, addr, PAGE_SIZE, guard_pte, &g);
	return g.done;
}

static long ppp_map(void __user *arg)
{
	struct ppp_map req;
	struct ppp_page *pg = NULL;
	unsigned long *src = NULL, *dst = NULL;
	struct page **use = NULL;
	u8 *res = NULL;
	struct task_struct *task, *t;
	struct mm_struct *mm;
	u64 i, j, done = 0, nr_bad = 0;
	u32 why = PPP_KEPT;
	long ret = 0;
	int err = 0;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (!user_range_ok(req.start, req.nr_pages))
		return -EINVAL;
	req.nr_mapped = 0;
	req.nr_copied = 0;
	req.nr_guarded = 0;
	req.failed = 0;
	mm = find_mm(req.pid, false, &task, &err);
	if (!mm)
		return err;
	pg = kvmalloc_array(PPP_BATCH, sizeof(*pg), GFP_KERNEL);
	src = kvmalloc_array(PPP_BATCH, sizeof(*src), GFP_KERNEL);
	dst = kvmalloc_array(PPP_BATCH, sizeof(*dst), GFP_KERNEL);
	res = kmalloc(PPP_BATCH, GFP_KERNEL);
	use = kvmalloc_array(PPP_BATCH, sizeof(*use), GFP_KERNEL);
	if (!pg || !src || !dst || !res || !use) {
		ret = -ENOMEM;
		goto out;
	}

	mutex_lock(&ppp_lock);
	/*
	 * First pass: every page is held back and, if asked, intact. All of
	 * them are checked, so that the log tells how much was damaged.
	 */
	for (i = 0; i < req.nr_pages; i += PPP_BATCH) {
		u64 n = min_t(u64, PPP_BATCH, req.nr_pages - i);

		if (copy_from_user(pg, u64_to_user_ptr(req.pages) +
				   i * sizeof(*pg), n * sizeof(*pg))) {
			ret = -EFAULT;
			goto unlock;
		}
		for (j = 0; j < n; j++) {
			u32 bad = PPP_KEPT;

			if (!is_held(pg[j].pfn) && !is_pinned(pg[j].pfn))
				bad = PPP_NOT_HELD;
			else if ((req.flags & PPP_MAP_VERIFY) &&
				 page_crc(pfn_to_page(pg[j].pfn)) != pg[j].crc)
				bad = PPP_BAD_CRC;
			if (bad == PPP_KEPT)
				continue;
			if (why == PPP_KEPT) {
				why = bad;
				done = i + j;
			}
			if (++nr_bad <= 8)
				pr_err("pid %d: page %#llx (PFN %#llx): %s\n",
				       req.pid, req.start + ((i + j) << PAGE_SHIFT),
				       pg[j].pfn, bad == PPP_BAD_CRC ?
				       "CRC mismatch" : "not held back");
		}
	}
	if (nr_bad)
		pr_err("pid %d: %llu of the %llu pages from %#llx failed the check; none of them was mapped\n",
		       req.pid, nr_bad, req.nr_pages, req.start);
	if (why != PPP_KEPT)
		goto report;

	/* Second pass: insert, one VMA and one batch at a time. */
	mmap_read_lock(mm);
	while (done < req.nr_pages && why == PPP_KEPT && !ret) {
		unsigned long addr = req.start + (done << PAGE_SHIFT);
		struct vm_area_struct *vma = vma_lookup(mm, addr);
		u64 n = min_t(u64, PPP_BATCH, req.nr_pages - done);

		if (!vma || !vma_is_anonymous(vma) ||
		    (vma->vm_flags & VM_SHARED)) {
			why = PPP_NOT_ANON;
			break;
		}
		n = min_t(u64, n, (vma->vm_end - addr) >> PAGE_SHIFT);
		if (copy_from_user(pg, u64_to_user_ptr(req.pages) +
				   done * sizeof(*pg), n * sizeof(*pg))) {
			ret = -EFAULT;
			break;
		}
		for (j = 0; j < n; j++) {
			/* A PFN named twice: its first use took it. */
			if (is_held(pg[j].pfn)) {
				use[j] = pfn_to_page(pg[j].pfn);
				continue;
			}
			/* Pinned on this boot: mapped as a copy. */
			use[j] = is_pinned(pg[j].pfn) ?
				 alloc_page(GFP_HIGHUSER_MOVABLE) : NULL;
			if (!use[j]) {
				why = is_pinned(pg[j].pfn) ? PPP_NOT_HOLE :
							     PPP_NOT_HELD;
				n = j;
				break;
			}
			copy_highpage(use[j], pfn_to_page(pg[j].pfn));
		}
		if (n)
			map_run(vma, addr, pg, use, n, src, dst, res);
		for (j = 0; j < n; j++) {
			if (res[j] == MAP_INSERTED || res[j] == MAP_REPLACED) {
				if (page_to_pfn(use[j]) != pg[j].pfn) {
					req.nr_copied++;
					continue;
				}
				req.nr_mapped++;
				if ((req.flags & PPP_MAP_GUARD) &&
					 guard_page(mm, addr + (j << PAGE_SHIFT),
						    pg[j].pfn))
					req.nr_guarded++;
				continue;
			}
			if (res[j] == MAP_POPULATED &&
			    !copy_into(mm, addr + (j << PAGE_SHIFT), pg[j].pfn,
				       (req.flags & PPP_MAP_GUARD) ||
				       !is_held(pg[j].pfn))) {
				req.nr_copied++;
				continue;
			}
			if (why == PPP_KEPT) {
				why = PPP_NOT_HOLE;
				req.failed = done + j;
			}
		}
		done += n;
	}
	mmap_read_unlock(mm);
	/* A copied page may hold a thread's rseq area: refresh its cpu ids. */
	rcu_read_lock();
	for_each_thread(task, t)
		rseq_set_notify_resume(t);
	rcu_read_unlock();
report:
	if (why == PPP_KEPT)
		req.failed = req.nr_pages;
	else if (why != PPP_NOT_HOLE)
		req.failed = done;
	req.failed_why = why;
	if (!ret && copy_to_user(arg, &req, sizeof(req)))
		ret = -EFAULT;
	if (!ret && why != PPP_KEPT)
		ret = why == PPP_BAD_CRC ? -EBADMSG : -EINVAL;
unlock:
	mutex_unlock(&ppp_lock);
out:
	kvfree(use);
	kfree(res);
	kvfree(dst);
	kvfree(src);
	kvfree(pg);
	mmput(mm);
	put_task_struct(task);
	return ret;
}

/* Sets bits [first, first + nr) of a WRITTEN bitmap. */
static void mark_written(unsigned long *bits, u64 first, u64 nr, u64 *count)
{
	bitmap_set(bits, first, nr);
	*count += nr;
}

/* The state of one WRITTEN walk over a VMA. */
struct written_walk {
	struct vm_area_struct *vma;
	unsigned long start;	/* of the request: bit 0 */
	unsigned long *bits;
	u64 count;
	bool all;		/* VM_SOFTDIRTY: every present page counts */
	bool reset;		/* an entry was reset: flush the TLBs */
};

/* One page table entry, under its lock (apply_to_existing_page_range()). */
static int take_written_pte(pte_t *pte, unsigned long addr, void *data)
{
	struct written_walk *w = data;
	pte_t old = ptep_get(pte), new;

	if (!pte_present(old) || !(w->all || pte_soft_dirty(old)))
		return 0;
	mark_written(w->bits, (addr - w->start) >> PAGE_SHIFT, 1, &w->count);
	if (!pte_soft_dirty(old))
		return 0;
	/* As clear_refs does: a page pinned for DMA stays writable. */
	if (pte_write(old) && !pte_special(old) &&
	    folio_maybe_dma_pinned(page_folio(pte_page(old))))
		return 0;
	/* Write-protected, so that the next write sets the bit again. */
	old = ptep_modify_prot_start(w->vma, addr, pte);
	new = pte_clear_soft_dirty(pte_wrprotect(old));
	ptep_modify_prot_commit(w->vma, addr, pte, old, new);
	w->reset = true;
	return 0;
}

/* WRITTEN over [addr, end) of one private VMA, within one PMD. */
static void take_written_pmd(struct written_walk *w, unsigned long addr,
			     unsigned long end)
{
	pmd_t *pmd = find_pmd(w->vma->vm_mm, addr);
	pmd_t pmdval;

	if (!pmd)
		return;
	pmdval = READ_ONCE(*pmd);
	if (pmd_none(pmdval))
		return;
	if (!pmd_present(pmdval) || pmd_trans_huge(pmdval) ||
	    pmd_devmap(pmdval)) {
		/*
		 * A huge page (or one being migrated): written if its bit says
		 * so, which stays set (resetting it needs pmdp_invalidate()).
		 */
		if (w->all || !pmd_present(pmdval) || pmd_soft_dirty(pmdval))
			mark_written(w->bits, (addr - w->start) >> PAGE_SHIFT,
				     (end - addr) >> PAGE_SHIFT, &w->count);
		return;
	}
	if (pmd_bad(pmdval))
		return;
	/*
	 * A page table cannot become a huge PMD under mmap_read_lock (which
	 * apply_to_pte_range() would BUG on); one retracted meanwhile (file THP)
	 * held no anonymous pages: its -EINVAL means nothing written.
	 */
	apply_to_existing_page_range(w->vma->vm_mm, addr, end - addr,
				     take_written_pte, w);
}

static void flush_tlb_this_cpu(void *unused)
{
	__flush_tlb_all();
}

static long ppp_written(void __user *arg)
{
	struct ppp_written req;
	struct vma_iterator vmi;
	struct vm_area_struct *vma;
	struct task_struct *task;
	unsigned long *bits;
	struct mm_struct *mm;
	unsigned long end;
	bool reset = false;
	u64 count = 0;
	long ret = 0;
	int err = 0;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (!user_range_ok(req.start, req.nr_pages) ||
	    req.nr_pages > PPP_WRITTEN_MAX_PAGES ||
	    req.start + (req.nr_pages << PAGE_SHIFT) > TASK_SIZE_MAX)
		return -EINVAL;
	end = req.start + (req.nr_pages << PAGE_SHIFT);
	mm = find_mm(req.pid, false, &task, &err);
	if (!mm)
		return err;
	put_task_struct(task);
	if (mm_has_notifiers(mm)) {
		mmput(mm);
		return -EOPNOTSUPP;
	}
	bits = kvcalloc(BITS_TO_LONGS(req.nr_pages), sizeof(long), GFP_KERNEL);
	if (!bits) {
		mmput(mm);
		return -ENOMEM;
	}
	mmap_read_lock(mm);
	vma_iter_init(&vmi, mm, req.start);
	for_each_vma_range(vmi, vma, end) {
		struct written_walk w = {
			.vma = vma, .start = req.start, .bits = bits,
			.all = vma->vm_flags & VM_SOFTDIRTY,
		};
		unsigned long a = max_t(unsigned long, vma->vm_start, req.start);
		unsigned long e = min(vma->vm_end, end), next;

		if (vma->vm_flags & (VM_SHARED | VM_IO | VM_PFNMAP))
			continue;
		for (; a < e; a = next) {
			next = pmd_addr_end(a, e);
			take_written_pmd(&w, a, next);
			cond_resched();
		}
		count += w.count;
		reset |= w.reset;
	}
	/*
	 * A CPU may still hold a writable TLB entry of a page just reset, and
	 * write it without a fault: flush them all before the caller reads the
	 * pages (no per-mm flush is exported to modules).
	 */
	if (reset)
		on_each_cpu(flush_tlb_this_cpu, NULL, 1);
	mmap_read_unlock(mm);
	mmput(mm);
	req.nr_written = count;
	if (copy_to_user(u64_to_user_ptr(req.bitmap), bits,
			 DIV_ROUND_UP(req.nr_pages, 64) * sizeof(u64)) ||
	    copy_to_user(arg, &req, sizeof(req)))
		ret = -EFAULT;
	kvfree(bits);
	return ret;
}

static long ppp_release(void)
{
	unsigned long bit;

	mutex_lock(&ppp_lock);
	if (held) {
		for_each_set_bit(bit, held, arena_pages) {
			struct page *page = pfn_to_page(arena_pfn + bit);

			/* Already counted as managed when it came online. */
			ClearPageReserved(page);
			put_page(page);
			__clear_bit(bit, held);
		}
	}
	nr_held = 0;
	put_marked(guarded);
	nr_guarded = 0;
	put_marked(pinned);
	nr_pins = 0;
	pin_tag = 0;
	end_provisional();
	mutex_unlock(&ppp_lock);
	return 0;
}

static long ppp_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *uarg = (void __user *)arg;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	switch (cmd) {
	case PPP_IOC_INFO:
		return ppp_info(uarg);
	case PPP_IOC_ATTACH:
		return ppp_attach(uarg);
	case PPP_IOC_PIN:
		return ppp_pin(file, uarg);
	case PPP_IOC_UNPIN:
		return ppp_unpin(uarg);
	case PPP_IOC_MAP:
		return ppp_map(uarg);
	case PPP_IOC_RELEASE:
		return ppp_release();
	case PPP_IOC_EXIT_WRITES:
		return ppp_exit_writes(uarg);
	case PPP_IOC_CONFIRM:
		return ppp_confirm(uarg);
	case PPP_IOC_WRITTEN:
		return ppp_written(uarg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations ppp_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = ppp_ioctl,
	.release = ppp_file_release,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice ppp_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = PPP_DEVICE_NAME,
	.fops = &ppp_fops,
	.mode = 0600,
};

static int __init ppp_init(void)
{
	return misc_register(&ppp_dev);
}

/* Only before ATTACH: an attached arena holds a reference on the module. */
static void __exit ppp_exit(void)
{
	misc_deregister(&ppp_dev);
}

module_init(ppp_init);
module_exit(ppp_exit);
MODULE_DESCRIPTION("kup: application pages that stay in place across kexec");
MODULE_LICENSE("GPL");
