/*
 * A small checkpoint/restore test subject for CRIU on the kup development host.
 *
 *   pattern STATUS_FILE PRIVATE_KIB [SHARED_KIB [SEED]]
 *
 * Maps PRIVATE_KIB of private anonymous memory and (optionally) SHARED_KIB of MAP_SHARED|MAP_ANONYMOUS memory
 * and fills each 8-byte word with a value derived from SEED, the region and the word's offset. In the private
 * region the 16 pages starting at its middle are never touched, so a dump sees two runs of present pages with
 * a hole between them. The process holds no sockets and no tty; run it under setsid with stdio redirected.
 *
 * Signals:
 *   SIGUSR1  verify both regions and (re)write STATUS_FILE: "OK <pid> private=<addr> <kib> shared=<addr> <kib>"
 *            or "BAD <region> offset <off> want <x> got <y>"
 *   SIGTERM  exit
 * At start the status file gets "READY ..." with the same fields, after the regions are filled.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define HOLE_PAGES 16UL

static volatile sig_atomic_t want_verify, want_exit;
static void on_usr1(int s) { (void)s; want_verify = 1; }
static void on_term(int s) { (void)s; want_exit = 1; }

static uint64_t word(uint64_t seed, uint64_t region, uint64_t off)
{
	uint64_t x = seed ^ (region * 0x9e3779b97f4a7c15ULL) ^ (off * 0xbf58476d1ce4e5b9ULL);
	x ^= x >> 31;
	return x;
}

static int in_hole(size_t len, size_t off)
{
	size_t start = (len / PAGE / 2) * PAGE;
	return len >= 4 * HOLE_PAGES * PAGE && off >= start && off < start + HOLE_PAGES * PAGE;
}

static void fill(uint64_t *p, size_t len, uint64_t seed, uint64_t region, int hole)
{
	for (size_t off = 0; off < len; off += 8)
		if (!(hole && in_hole(len, off)))
			p[off / 8] = word(seed, region, off);
}

static int check(const char *name, uint64_t *p, size_t len, uint64_t seed, uint64_t region, int hole, FILE *out)
{
	for (size_t off = 0; off < len; off += 8) {
		uint64_t want = (hole && in_hole(len, off)) ? 0 : word(seed, region, off);
		if (p[off / 8] != want) {
			fprintf(out, "BAD %s offset %zu want %016llx got %016llx\n", name, off,
				(unsigned long long)want, (unsigned long long)p[off / 8]);
			return -1;
		}
	}
	return 0;
}

static void status(const char *path, const char *word0, void *priv, size_t plen, void *shr, size_t slen,
		   uint64_t seed)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f)
		return;
	int bad = 0;
	if (strcmp(word0, "OK") == 0) {
		bad |= check("private", priv, plen, seed, 1, 1, f);
		if (!bad && shr)
			bad |= check("shared", shr, slen, seed, 2, 0, f);
	}
	if (!bad)
		fprintf(f, "%s %d private=%p %zu shared=%p %zu\n", word0, (int)getpid(), priv, plen / 1024, shr,
			slen / 1024);
	fclose(f);
	rename(tmp, path);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s STATUS_FILE PRIVATE_KIB [SHARED_KIB [SEED]]\n", argv[0]);
		return 2;
	}
	const char *path = argv[1];
	size_t plen = strtoull(argv[2], NULL, 0) * 1024;
	size_t slen = argc > 3 ? strtoull(argv[3], NULL, 0) * 1024 : 0;
	uint64_t seed = argc > 4 ? strtoull(argv[4], NULL, 0) : 0x6b7570u; /* "kup" */
	plen = (plen + PAGE - 1) & ~(PAGE - 1);
	slen = (slen + PAGE - 1) & ~(PAGE - 1);

	void *priv = mmap(NULL, plen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *shr = NULL;
	if (priv == MAP_FAILED) {
		perror("mmap private");
		return 1;
	}
	if (slen) {
		shr = mmap(NULL, slen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		if (shr == MAP_FAILED) {
			perror("mmap shared");
			return 1;
		}
	}
	madvise(priv, plen, MADV_NOHUGEPAGE); /* keep the hole a hole */
	fill(priv, plen, seed, 1, 1);
	if (shr)
		fill(shr, slen, seed, 2, 0);

	struct sigaction sa = { 0 };
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	status(path, "READY", priv, plen, shr, slen, seed);
	while (!want_exit) {
		pause();
		if (want_verify) {
			want_verify = 0;
			status(path, "OK", priv, plen, shr, slen, seed);
		}
	}
	return 0;
}
