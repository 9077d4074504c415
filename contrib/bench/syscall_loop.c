/* Workloads for `python -m contrib.bench`.  Every mode forks once and runs its
 * loop in the child, so the measured task is created by the caller's uid (the
 * bench's audit "task,never" rule for that uid then keeps it off the audit
 * slow path, as on a host where audit was never enabled).
 *
 *   syscall_loop open  PATH N        open()+close() of PATH N times
 *   syscall_loop ioctl PATH N        ioctl(FIONREAD) on an open PATH, N times
 *   syscall_loop getppid - N         getppid() N times: a syscall gputrace does not watch
 *   syscall_loop bpf - N             bpf(BPF_PROG_GET_NEXT_ID) N times: a bpf() command the
 *                                    access-change probe sees at entry and does not keep
 *   syscall_loop setgroups - N       setgroups() with the caller's own groups N times (root):
 *                                    a call the access-change probe records every time
 *       both print "cpu_ns/call wall_ns/call failures": CPU time is the loop's own
 *       (CLOCK_THREAD_CPUTIME_ID), so time other processes take the core is not in it
 *   syscall_loop deny  PATH SECONDS  open() expected to fail, for SECONDS:
 *                                    "attempts eacces other_failures opened"
 *   syscall_loop denyn DIR N         open() of DIR/f0 .. DIR/f<N-1>, each once (expected
 *                                    to fail): "attempts eacces other_failures opened"
 *   syscall_loop probe PATH N GAP_MS N times: fork a child that opens PATH (expected
 *                                    EACCES), prints "pid sec.nsec" (CLOCK_REALTIME right
 *                                    after the failing return), stays alive HOLD_MS, exits */
#include <errno.h>
#include <grp.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HOLD_MS 300

static double mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static double cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void report_loop(double c0, double t0, long n, long failures)
{
	printf("%.3f %.3f %ld\n", (cpu_ns() - c0) / n, (mono_ns() - t0) / n, failures);
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

static int loop_open(const char *path, long n)
{
	long failures = 0;
	double t0 = mono_ns(), c0 = cpu_ns();
	for (long i = 0; i < n; i++) {
		int fd = open(path, O_RDONLY);
		if (fd < 0)
			failures++;
		else
			close(fd);
	}
	report_loop(c0, t0, n, failures);
	return 0;
}

static int loop_ioctl(const char *path, long n)
{
	int fd = open(path, O_RDONLY | O_NOCTTY), v;
	long failures = 0;
	if (fd < 0) {
		perror(path);
		return 1;
	}
	double t0 = mono_ns(), c0 = cpu_ns();
	for (long i = 0; i < n; i++)
		if (ioctl(fd, FIONREAD, &v) < 0)
			failures++;
	report_loop(c0, t0, n, failures);
	close(fd);
	return 0;
}

static int loop_getppid(long n)
{
	long sum = 0;
	double t0 = mono_ns(), c0 = cpu_ns();
	for (long i = 0; i < n; i++)
		sum += syscall(SYS_getppid);
	report_loop(c0, t0, n, sum < 0);
	return 0;
}

static int loop_bpf(long n)
{
	unsigned int attr[4] = {0, 0, 0, 0}; /* start_id, next_id, open_flags */
	long failures = 0;
	double t0 = mono_ns(), c0 = cpu_ns();
	for (long i = 0; i < n; i++)
		if (syscall(SYS_bpf, 11 /* BPF_PROG_GET_NEXT_ID */, attr, sizeof(attr)) < 0 &&
		    errno != ENOENT)
			failures++;
	report_loop(c0, t0, n, failures);
	return 0;
}

static int loop_setgroups(long n)
{
	gid_t groups[64];
	int count = getgroups(64, groups);
	long failures = 0;
	if (count < 0) {
		perror("getgroups");
		return 1;
	}
	double t0 = mono_ns(), c0 = cpu_ns();
	for (long i = 0; i < n; i++)
		if (setgroups((size_t)count, groups) != 0)
			failures++;
	report_loop(c0, t0, n, failures);
	return 0;
}

static int loop_deny_distinct(const char *dir, long n)
{
	long eacces = 0, other = 0, opened = 0;
	char path[4096];
	for (long i = 0; i < n; i++) {
		snprintf(path, sizeof(path), "%s/f%ld", dir, i);
		int fd = open(path, O_RDONLY);
		if (fd >= 0) {
			opened++;
			close(fd);
		} else if (errno == EACCES) {
			eacces++;
		} else {
			other++;
		}
	}
	printf("%ld %ld %ld %ld\n", n, eacces, other, opened);
	return 0;
}

static int loop_deny(const char *path, double seconds)
{
	long attempts = 0, eacces = 0, other = 0, opened = 0;
	double end = mono_ns() + seconds * 1e9;
	do {
		for (int i = 0; i < 1024; i++) {
			int fd = open(path, O_RDONLY);
			attempts++;
			if (fd >= 0) {
				opened++;
				close(fd);
			} else if (errno == EACCES) {
				eacces++;
			} else {
				other++;
			}
		}
	} while (mono_ns() < end);
	printf("%ld %ld %ld %ld\n", attempts, eacces, other, opened);
	return 0;
}

static int probe(const char *path, long n, long gap_ms)
{
	for (long i = 0; i < n; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		if (pid == 0) {
			int fd = open(path, O_RDONLY);
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			if (fd >= 0 || errno != EACCES)
				printf("%d error %d\n", (int)getpid(), fd >= 0 ? 0 : errno);
			else
				printf("%d %ld.%09ld\n", (int)getpid(), (long)ts.tv_sec, ts.tv_nsec);
			fflush(stdout);
			sleep_ms(HOLD_MS); /* alive while gputrace reads its /proc entry */
			_exit(0);
		}
		sleep_ms(gap_ms);
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
	}
	while (wait(NULL) > 0)
		;
	return 0;
}

static int run(int argc, char **argv)
{
	const char *mode = argv[1], *path = argv[2];
	if (!strcmp(mode, "open"))
		return loop_open(path, atol(argv[3]));
	if (!strcmp(mode, "ioctl"))
		return loop_ioctl(path, atol(argv[3]));
	if (!strcmp(mode, "getppid"))
		return loop_getppid(atol(argv[3]));
	if (!strcmp(mode, "bpf"))
		return loop_bpf(atol(argv[3]));
	if (!strcmp(mode, "setgroups"))
		return loop_setgroups(atol(argv[3]));
	if (!strcmp(mode, "deny"))
		return loop_deny(path, atof(argv[3]));
	if (!strcmp(mode, "denyn"))
		return loop_deny_distinct(path, atol(argv[3]));
	if (!strcmp(mode, "probe") && argc == 5)
		return probe(path, atol(argv[3]), atol(argv[4]));
	fprintf(stderr, "unknown mode %s\n", mode);
	return 2;
}

int main(int argc, char **argv)
{
	int status;
	if (argc < 4) {
		fprintf(stderr, "usage: %s open|ioctl|getppid|bpf|setgroups|deny|denyn|probe PATH N [GAP_MS]\n", argv[0]);
		return 2;
	}
	fflush(stdout);
	pid_t child = fork();
	if (child < 0) {
		perror("fork");
		return 1;
	}
	if (child == 0) {
		int rc = run(argc, argv);
		fflush(stdout);
		_exit(rc);
	}
	if (waitpid(child, &status, 0) < 0)
		return 1;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
