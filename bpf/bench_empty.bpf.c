// SPDX-License-Identifier: GPL-2.0
/* Benchmark floors: empty programs on the hooks a syscall tracer can use.
 *
 *   -DRAW_SYS_EXIT  one raw tracepoint on sys_exit (gputrace's hook before
 *                   issue 12): once attached, every syscall takes the slow
 *                   path and runs the program.
 *   otherwise       the syscall-specific exit tracepoints gputrace uses
 *                   (syscalls:sys_exit_open, _creat, _openat, _openat2,
 *                   _ioctl): every syscall takes the slow path, but only the
 *                   watched ones run a program.
 */
#ifdef RAW_SYS_EXIT
RAW_TRACEPOINT_PROBE(sys_exit)
{
	return 0;
}
#else
TRACEPOINT_PROBE(syscalls, sys_exit_open) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_creat) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_openat2) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_ioctl) { return 0; }
#endif
