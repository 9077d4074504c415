// SPDX-License-Identifier: GPL-2.0
/* Benchmark baseline: an empty program on the hook gputrace uses (raw
 * tracepoint sys_exit).  Its cost is the floor any sys_exit probe pays: once
 * a syscall tracepoint is attached, every syscall takes the slow path. */
RAW_TRACEPOINT_PROBE(sys_exit)
{
	return 0;
}
