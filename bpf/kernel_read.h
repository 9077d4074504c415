/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Reading kernel memory at BTF offsets, shared by every gputrace BPF program
 * (gputrace.bpf.c, access_changes.bpf.c).  No struct is dereferenced by name:
 * each offset arrives as a -D flag (OFF_*) computed from the running kernel's BTF.
 */
#ifndef GPUTRACE_KERNEL_READ_H
#define GPUTRACE_KERNEL_READ_H

static __always_inline u64 rd_u64(const void *base, u32 off)
{
	u64 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), (const char *)base + off);
	return v;
}

static __always_inline u32 rd_u32(const void *base, u32 off)
{
	u32 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), (const char *)base + off);
	return v;
}

static __always_inline void *rd_ptr(const void *base, u32 off)
{
	return (void *)rd_u64(base, off);
}

/* The struct file behind descriptor `fd` of `task`, or 0. */
static __always_inline void *fd_file(void *task, s32 fd)
{
	void *files = rd_ptr(task, OFF_TASK_FILES);
	if (!files || fd < 0)
		return 0;
	void *fdt = rd_ptr(files, OFF_FILES_FDT);
	if ((u32)fd >= rd_u32(fdt, OFF_FDT_MAX_FDS))
		return 0;
	void *arr = rd_ptr(fdt, OFF_FDT_FD);
	return rd_ptr(arr, (u32)fd * 8);
}

#endif
