/* Tight syscall loops for the overhead benchmark; prints ns per iteration.
 *   syscall_loop open PATH N     open()+close() of PATH, N times
 *   syscall_loop ioctl PATH N    ioctl(FIONREAD) on an open PATH, N times
 *   syscall_loop deny PATH N     open() expected to fail; prints failures too */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s open|ioctl|deny PATH N\n", argv[0]);
		return 2;
	}
	const char *mode = argv[1], *path = argv[2];
	long n = atol(argv[3]), failures = 0;
	double t0 = now_ns();
	if (!strcmp(mode, "open")) {
		for (long i = 0; i < n; i++) {
			int fd = open(path, O_RDONLY);
			if (fd < 0)
				failures++;
			else
				close(fd);
		}
	} else if (!strcmp(mode, "ioctl")) {
		int fd = open(path, O_RDONLY), v;
		if (fd < 0) {
			perror(path);
			return 1;
		}
		for (long i = 0; i < n; i++)
			if (ioctl(fd, FIONREAD, &v) < 0)
				failures++;
		close(fd);
	} else if (!strcmp(mode, "deny")) {
		for (long i = 0; i < n; i++) {
			int fd = open(path, O_RDONLY);
			if (fd < 0)
				failures++;
			else
				close(fd);
		}
	} else {
		fprintf(stderr, "unknown mode %s\n", mode);
		return 2;
	}
	printf("%.3f %ld\n", (now_ns() - t0) / n, failures);
	return 0;
}
