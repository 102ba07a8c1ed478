/*
 * memsubject: a checkpoint/restore test subject whose memory can be verified after a CRIU restore and which can
 * keep dirtying memory for benchmarks.
 *
 *   memsubject --status FILE --private-mib N [--shared-mib N] [--memfd-mib N] [--seed S]
 *              [--dirty-pct P] [--dirty-mib-per-s R] [--dirty-on-signal] [--stride K] [--read-only-mib N]
 *              [--ignore-sigpipe]
 *
 * Regions (each absent when its size is 0):
 *   1 "private"  MAP_PRIVATE|MAP_ANONYMOUS, MADV_NOHUGEPAGE; when it has >= 64 pages, the 16 pages starting at
 *                its middle page are never touched (a hole that must read back as zero)
 *   2 "shared"   MAP_SHARED|MAP_ANONYMOUS
 *   3 "memfd"    memfd_create("memsubject", 0), ftruncate, MAP_SHARED; the fd stays open
 *
 * With --read-only-mib N the last N MiB of "private" are made PROT_READ once written (so a restore must put pages
 * into memory the process itself may not write); the dirtied first P% must lie before them.
 *
 * With --stride K > 1 only every K-th page of each region (page index a multiple of K) is ever written: the others
 * are holes that must read back as zero, so the pages a dump sends, and those the dirtying rewrites, lie one by
 * one instead of in long runs (an app whose writes are spread thinly over a large heap). The working set is then
 * the written pages among the first P% of the region.
 *
 * Every written page describes itself: word 0 is its generation g (>= 1), words 1..511 are
 * mix64(key + i * GOLDEN) with key = mix64(mix64(mix64(mix64(seed) ^ region) ^ page) ^ g), mix64 being the
 * splitmix64 step. So a page can be checked on its own (e.g. in a dump image), whatever its generation.
 *
 * With --dirty-pct P > 0 the main loop rewrites pages forever (generation + 1 each time), cycling through the
 * first P% of each region's pages, at most R MiB/s (0 or absent: as fast as it can, with a tiny nanosleep every
 * 256 pages). With --dirty-on-signal it rewrites nothing until SIGUSR2, then the first P% of each region once
 * (a burst, e.g. "50% written during the pre-dump"; at most R MiB/s too), and so on for each SIGUSR2. The loop position lives in
 * this process's memory, so the verifier also knows the exact
 * generation every page must have: a page restored from a stale image is caught even though it is
 * self-consistent.
 *
 * With --ignore-sigpipe it ignores SIGPIPE, as network servers (memcached, redis, nginx) do; without it, a
 * SIGPIPE kills it (the default action), as it does most programs.
 *
 * Signals:
 *   SIGUSR1  verify all regions, then atomically (FILE.tmp + rename) write FILE:
 *            "OK pid=<pid> private=<MiB> shared=<MiB> memfd=<MiB> pages=<n> rewrites=<n>"
 *            or "BAD region=<name> page=<index> addr=<hex> reason=<text>" for the first bad page
 *   SIGUSR2  with --dirty-on-signal: one rewrite of the first P% of each region (queued while one is under way)
 *   SIGTERM  exit 0
 * After filling (and a first verification) FILE gets "READY pid=..." with the same fields as OK.
 *
 * Single-threaded, no sockets, no tty, no signalfd/timerfd/eventfd: the only fd it opens and keeps is the memfd.
 * Start it under setsid with stdin/stdout/stderr on /dev/null.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define MIB (1024UL * 1024)
#define HOLE_PAGES 16UL
#define HOLE_MIN_PAGES 64UL
#define BATCH 256 /* pages between yields / signal checks while dirtying */
#define GOLDEN 0x9e3779b97f4a7c15ULL

struct region {
	const char *name;
	uint64_t id;
	uint64_t *base;
	size_t mib, pages;
	size_t ws;                    /* working set: pages [0, ws) are rewritten (hole pages excepted) */
	size_t hole_start, hole_end;  /* [start, end) never touched; empty when start == end */
};

static struct region regions[3] = {
	{ .name = "private", .id = 1 },
	{ .name = "shared", .id = 2 },
	{ .name = "memfd", .id = 3 },
};

static uint64_t seed = 0x6b7570; /* "kup", as in scripts/criu-host/pattern.c */
static uint64_t stride = 1;      /* only pages whose index is a multiple of it are written */

/* Dirtying position. Kept here (in the dumped memory) so verification can compute exact generations. */
static uint64_t passes;   /* completed passes over all working sets */
static size_t cur_region; /* next page to rewrite: regions[cur_region], page cur_page */
static size_t cur_page;
static uint64_t rewrites; /* total page rewrites */

static volatile sig_atomic_t want_verify, want_exit, want_burst;
static void on_usr1(int s) { (void)s; want_verify = 1; }
static void on_usr2(int s) { (void)s; want_burst = 1; }
static void on_term(int s) { (void)s; want_exit = 1; }

static uint64_t mix64(uint64_t z) /* splitmix64 */
{
	z += GOLDEN;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static uint64_t page_key(uint64_t s, uint64_t region, uint64_t page, uint64_t g)
{
	return mix64(mix64(mix64(mix64(s) ^ region) ^ page) ^ g);
}

static int in_hole(const struct region *r, size_t page)
{
	return (page >= r->hole_start && page < r->hole_end) || page % stride;
}

static uint64_t *page_addr(const struct region *r, size_t page)
{
	return r->base + page * WORDS;
}

static void write_page(const struct region *r, size_t page, uint64_t g)
{
	uint64_t *p = page_addr(r, page);
	uint64_t k = page_key(seed, r->id, page, g);
	for (size_t i = 1; i < WORDS; i++)
		p[i] = mix64(k + i * GOLDEN);
	p[0] = g;
}

/* The generation page must have now: 1 after filling, plus one per pass, plus one if the current pass has
 * already been past it. 0 for hole pages. */
static uint64_t expected_gen(size_t ri, size_t page)
{
	const struct region *r = &regions[ri];
	if (in_hole(r, page))
		return 0;
	if (page >= r->ws)
		return 1;
	return 1 + passes + (ri < cur_region || (ri == cur_region && page < cur_page));
}

/* Rewrite the next working-set page. The new generation is the page's own word 0 + 1 (not expected_gen + 1), so
 * a page that came back stale from a restore stays stale and the next verification reports it. */
static void rewrite_next(void)
{
	for (;;) {
		struct region *r = &regions[cur_region];
		if (cur_page >= r->ws) {
			cur_page = 0;
			if (++cur_region == 3) {
				cur_region = 0;
				passes++;
			}
			continue;
		}
		size_t page = cur_page;
		if (page >= r->hole_start && page < r->hole_end) {
			cur_page = r->hole_end;
			continue;
		}
		if (page % stride) {
			cur_page += stride - page % stride;
			continue;
		}
		write_page(r, page, page_addr(r, page)[0] + 1);
		cur_page++;
		rewrites++;
		return;
	}
}

/* Check every page; on the first bad one fill msg with a BAD line and return -1. */
static int verify(char *msg, size_t len, uint64_t *npages)
{
	*npages = 0;
	for (size_t ri = 0; ri < 3; ri++) {
		const struct region *r = &regions[ri];
		for (size_t page = 0; page < r->pages; page++, (*npages)++) {
			const uint64_t *p = page_addr(r, page);
			uint64_t want_g = expected_gen(ri, page), g = p[0];
			char why[160] = "";
			if (want_g == 0) {
				for (size_t i = 0; i < WORDS && !why[0]; i++)
					if (p[i])
						snprintf(why, sizeof(why), "hole page not zero: word %zu = 0x%016" PRIx64, i,
							 p[i]);
			} else if (g == 0) {
				snprintf(why, sizeof(why), "generation 0 (page lost or zeroed), want %" PRIu64, want_g);
			} else {
				/* Self-consistency first (torn or foreign data), then the exact generation (stale page). */
				uint64_t k = page_key(seed, r->id, page, g);
				for (size_t i = 1; i < WORDS && !why[0]; i++) {
					uint64_t w = mix64(k + i * GOLDEN);
					if (p[i] != w)
						snprintf(why, sizeof(why),
							 "word %zu of generation %" PRIu64 ": want 0x%016" PRIx64
							 " got 0x%016" PRIx64, i, g, w, p[i]);
				}
				if (!why[0] && g != want_g)
					snprintf(why, sizeof(why), "stale generation: want %" PRIu64 " got %" PRIu64,
						 want_g, g);
			}
			if (why[0]) {
				snprintf(msg, len, "BAD region=%s page=%zu addr=%p reason=%s\n", r->name, page,
					 (const void *)p, why);
				return -1;
			}
		}
	}
	return 0;
}

/* Verify, then replace the status file atomically so a reader never sees a partial line. Only plain
 * open/write/close: nothing may stay open for CRIU to see. */
static void report(const char *path, const char *kind)
{
	char msg[512], tmp[4096];
	uint64_t npages;
	if (verify(msg, sizeof(msg), &npages) == 0)
		snprintf(msg, sizeof(msg), "%s pid=%d private=%zu shared=%zu memfd=%zu pages=%" PRIu64
			 " rewrites=%" PRIu64 "\n", kind, (int)getpid(), regions[0].mib, regions[1].mib,
			 regions[2].mib, npages, rewrites);
	if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= sizeof(tmp))
		return;
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	size_t n = strlen(msg);
	ssize_t w = write(fd, msg, n);
	close(fd);
	if (w == (ssize_t)n)
		rename(tmp, path);
	else
		unlink(tmp);
}

static void sleep_ns(long ns)
{
	struct timespec ts = { ns / 1000000000L, ns % 1000000000L };
	nanosleep(&ts, NULL); /* EINTR is fine: the caller checks the signal flags next */
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One step of the dirtying loop: up to BATCH (and max) rewrites, limited to rate pages/s when rate > 0;
 * returns how many it did. */
static size_t dirty_step(double rate, size_t max)
{
	static double last, credit;
	size_t n = BATCH;
	if (rate > 0) {
		double now = now_s(), dt = now - last;
		last = now;
		/* First call, or the clock jumped (e.g. restored on another boot): neither burst nor stall. */
		if (dt < 0 || dt > 1)
			dt = 0;
		credit += dt * rate;
		if (credit > BATCH)
			credit = BATCH; /* no burst after a long verification */
		/* Work in chunks of ~10 ms worth of pages so a low rate does not mean a wakeup per page. */
		double chunk = rate / 100 < 1 ? 1 : rate / 100 > BATCH ? BATCH : rate / 100;
		if (credit < chunk) {
			double wait = (chunk - credit) / rate;
			sleep_ns((long)((wait < 0.05 ? wait : 0.05) * 1e9));
			return 0;
		}
		n = (size_t)credit;
	}
	if (n > max)
		n = max;
	if (rate > 0)
		credit -= (double)n;
	for (size_t i = 0; i < n; i++)
		rewrite_next();
	sleep_ns(1000); /* tiny yield between batches */
	return n;
}

static int parse_u64(const char *opt, const char *s, uint64_t max, uint64_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s || *end || strchr(s, '-') || v > max) {
		fprintf(stderr, "memsubject: bad value for --%s: %s\n", opt, s);
		return -1;
	}
	*out = v;
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: memsubject --status FILE --private-mib N [--shared-mib N] [--memfd-mib N] "
			"[--seed S] [--dirty-pct P] [--dirty-mib-per-s R] [--dirty-on-signal] [--stride K] "
			"[--read-only-mib N] [--ignore-sigpipe]\n");
}

static int map_region(struct region *r)
{
	size_t len = r->mib * MIB;
	r->pages = len / PAGE;
	if (!len)
		return 0;
	int fd = -1, flags = MAP_SHARED | MAP_ANONYMOUS;
	if (r->id == 1) {
		flags = MAP_PRIVATE | MAP_ANONYMOUS;
	} else if (r->id == 3) {
		fd = memfd_create("memsubject", 0);
		if (fd < 0 || ftruncate(fd, (off_t)len) < 0) {
			perror("memsubject: memfd");
			return -1;
		}
		flags = MAP_SHARED; /* fd stays open on purpose: CRIU must restore the memfd itself */
	}
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, 0);
	if (p == MAP_FAILED) {
		fprintf(stderr, "memsubject: mmap %s: %s\n", r->name, strerror(errno));
		return -1;
	}
	r->base = p;
	if (r->id == 1) {
		/* A huge page would fill the hole with zeroes that are present pages, not a hole. */
		madvise(p, len, MADV_NOHUGEPAGE);
		if (r->pages >= HOLE_MIN_PAGES) {
			r->hole_start = r->pages / 2;
			r->hole_end = r->hole_start + HOLE_PAGES;
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "status", required_argument, NULL, 's' },
		{ "private-mib", required_argument, NULL, 'p' },
		{ "shared-mib", required_argument, NULL, 'h' },
		{ "memfd-mib", required_argument, NULL, 'm' },
		{ "seed", required_argument, NULL, 'S' },
		{ "dirty-pct", required_argument, NULL, 'd' },
		{ "dirty-mib-per-s", required_argument, NULL, 'r' },
		{ "dirty-on-signal", no_argument, NULL, 'o' },
		{ "stride", required_argument, NULL, 'k' },
		{ "read-only-mib", required_argument, NULL, 'R' },
		{ "ignore-sigpipe", no_argument, NULL, 'P' },
		{ NULL, 0, NULL, 0 },
	};
	const char *status = NULL;
	int have_private = 0, on_signal = 0, ignore_sigpipe = 0;
	uint64_t pct = 0, v, ro_mib = 0;
	double mib_per_s = 0;
	const uint64_t max_mib = (SIZE_MAX / MIB) / 2;
	int c;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 's':
			status = optarg;
			break;
		case 'p':
		case 'h':
		case 'm':
			if (parse_u64(c == 'p' ? "private-mib" : c == 'h' ? "shared-mib" : "memfd-mib", optarg,
				      max_mib, &v))
				return 2;
			regions[c == 'p' ? 0 : c == 'h' ? 1 : 2].mib = v;
			have_private |= c == 'p';
			break;
		case 'o':
			on_signal = 1;
			break;
		case 'P':
			ignore_sigpipe = 1;
			break;
		case 'R':
			if (parse_u64("read-only-mib", optarg, max_mib, &ro_mib))
				return 2;
			break;
		case 'S':
			if (parse_u64("seed", optarg, UINT64_MAX, &seed))
				return 2;
			break;
		case 'd':
			if (parse_u64("dirty-pct", optarg, 100, &pct))
				return 2;
			break;
		case 'k':
			if (parse_u64("stride", optarg, 1 << 20, &stride) || !stride) {
				fprintf(stderr, "memsubject: --stride must be 1..%d\n", 1 << 20);
				return 2;
			}
			break;
		case 'r': {
			char *end;
			mib_per_s = strtod(optarg, &end);
			if (end == optarg || *end || !(mib_per_s >= 0)) {
				fprintf(stderr, "memsubject: bad value for --dirty-mib-per-s: %s\n", optarg);
				return 2;
			}
			break;
		}
		default:
			usage();
			return 2;
		}
	}
	if (!status || !have_private || optind != argc) {
		usage();
		return 2;
	}
	if (ro_mib > regions[0].mib || (regions[0].mib * pct + 99) / 100 > regions[0].mib - ro_mib) {
		fprintf(stderr, "memsubject: --read-only-mib must fit in --private-mib after the dirtied first P%%\n");
		return 2;
	}

	/* Drop fds leaked by whoever started us (e.g. a harness's pipes): CRIU would have to dump them too, and a
	 * pipe or socket to a process outside the dumped tree can make the dump fail. */
	if (close_range(3, ~0U, 0) < 0)
		for (int fd = 3; fd < 1024; fd++)
			close(fd);

	/* Handlers before filling, so an early signal cannot kill us; the loop below acts on the flags. */
	struct sigaction sa = { 0 };
	sigemptyset(&sa.sa_mask);
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	if (ignore_sigpipe)
		signal(SIGPIPE, SIG_IGN);
	if (on_signal) {
		sa.sa_handler = on_usr2;
		sigaction(SIGUSR2, &sa, NULL);
	}

	size_t ws_total = 0;
	for (size_t ri = 0; ri < 3; ri++) {
		struct region *r = &regions[ri];
		if (map_region(r))
			return 1;
		r->ws = (r->pages * pct + 99) / 100; /* rounded up: any P > 0 dirties at least one page */
		for (size_t page = 0; page < r->pages; page++)
			if (!in_hole(r, page)) {
				write_page(r, page, 1);
				ws_total += page < r->ws; /* the pages one pass rewrites */
			}
	}
	if (ro_mib && mprotect((char *)regions[0].base + (regions[0].mib - ro_mib) * MIB, ro_mib * MIB, PROT_READ) < 0) {
		perror("memsubject: mprotect");
		return 1;
	}
	int dirtying = ws_total > 0 && !on_signal;
	size_t burst_left = 0;
	double rate = mib_per_s * (MIB / PAGE); /* pages per second; 0 = unlimited */

	/* When idle, keep the signals blocked except inside sigsuspend, so none slips in between the flag check
	 * and the wait. While dirtying they stay unblocked and the flags are polled between batches. */
	sigset_t block, waitmask;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGUSR2);
	if (!dirtying)
		sigprocmask(SIG_BLOCK, &block, &waitmask);

	report(status, "READY");
	while (!want_exit) {
		if (want_verify) {
			want_verify = 0;
			report(status, "OK");
			continue; /* recheck the flags: SIGTERM may have come meanwhile */
		}
		if (want_burst) {
			want_burst = 0;
			burst_left += ws_total;
		}
		if (burst_left) {
			burst_left -= dirty_step(rate, burst_left);
			/* Unblocked between batches, so a SIGUSR1 or SIGTERM is seen mid-burst. */
			sigprocmask(SIG_SETMASK, &waitmask, NULL);
			sigprocmask(SIG_BLOCK, &block, NULL);
		} else if (dirtying)
			dirty_step(rate, BATCH);
		else
			sigsuspend(&waitmask);
	}
	return 0;
}
