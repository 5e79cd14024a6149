/*
 * memcounter: the stateful test workload of ms2m.
 *
 *   memcounter [--mib N] [--interval-ms M] [--file PATH]
 *
 * Allocates and touches N MiB (default 0) so that it stays resident, then
 * every M ms (default 100) increments an in-memory counter, writes its value
 * to PATH (default /tmp/counter; written to PATH.tmp and renamed, so a reader
 * never sees a partial value) and prints it to stdout. The counter lives only
 * in memory: after a restore it must continue from the checkpointed value.
 * SIGTERM and SIGINT end it with status 0.
 *
 * Built statically (gcc -static) by hack/build-image.sh.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static void usage(void)
{
	fprintf(stderr, "usage: memcounter [--mib N] [--interval-ms M] [--file PATH]\n");
	exit(2);
}

static unsigned long parse_num(const char *opt, const char *s)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || *s == '\0' || *end != '\0') {
		fprintf(stderr, "memcounter: %s: not a number: %s\n", opt, s);
		exit(2);
	}
	return v;
}

/* Keeps the touched memory observable, so the compiler cannot drop it. */
volatile unsigned char *ballast;
volatile unsigned long ballast_sum;

static int write_counter(const char *path, const char *tmp, unsigned long long value)
{
	FILE *f = fopen(tmp, "w");
	if (!f)
		return -1;
	if (fprintf(f, "%llu\n", value) < 0) {
		fclose(f);
		return -1;
	}
	if (fclose(f) != 0)
		return -1;
	return rename(tmp, path);
}

int main(int argc, char **argv)
{
	unsigned long mib = 0, interval_ms = 100;
	const char *path = "/tmp/counter";

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--mib") == 0 && i + 1 < argc)
			mib = parse_num("--mib", argv[++i]);
		else if (strcmp(argv[i], "--interval-ms") == 0 && i + 1 < argc)
			interval_ms = parse_num("--interval-ms", argv[++i]);
		else if (strcmp(argv[i], "--file") == 0 && i + 1 < argc)
			path = argv[++i];
		else
			usage();
	}

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	if (mib > 0) {
		size_t len = (size_t)mib << 20;
		ballast = malloc(len);
		if (!ballast) {
			fprintf(stderr, "memcounter: cannot allocate %lu MiB\n", mib);
			return 1;
		}
		/* Distinct bytes per page so nothing can be deduplicated or zero-mapped. */
		for (size_t off = 0; off < len; off++)
			ballast[off] = (unsigned char)(off * 31u + (off >> 12));
		unsigned long sum = 0;
		for (size_t off = 0; off < len; off += 4096)
			sum += ballast[off];
		ballast_sum = sum;
	}

	size_t plen = strlen(path);
	char *tmp = malloc(plen + 5);
	if (!tmp)
		return 1;
	memcpy(tmp, path, plen);
	memcpy(tmp + plen, ".tmp", 5);

	unsigned long long counter = 0;
	struct timespec ts = {
		.tv_sec = (time_t)(interval_ms / 1000),
		.tv_nsec = (long)(interval_ms % 1000) * 1000000L,
	};
	while (!stop) {
		counter++;
		if (write_counter(path, tmp, counter) != 0)
			fprintf(stderr, "memcounter: writing %s: %s\n", path, strerror(errno));
		printf("%llu\n", counter);
		fflush(stdout);
		/* nanosleep returns early on a signal; stop is checked right after. */
		nanosleep(&ts, NULL);
	}
	return 0;
}
