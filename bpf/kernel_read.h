/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Reading kernel memory at BTF offsets, shared by every gputrace BPF program
 * (gputrace.bpf.c, access_changes.bpf.c).  No struct is dereferenced by name:
 * each offset arrives as a -D flag (OFF_*) computed from the running kernel's BTF.
 */
#ifndef GPUTRACE_KERNEL_READ_H
#define GPUTRACE_KERNEL_READ_H

/* Keeps the compiler from folding a bounds check the verifier must see. */
#define barrier_var(v) asm volatile("" : "+r"(v))

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

#ifdef HAVE_DEV_PROGS
/*
 * cgroup v2 device programs, read where the kernel keeps them (both probes:
 * the refused task's at a denial, a bpf() call's target cgroup at the call).
 */

/* The instructions of one device program (xlated), sent once per program id;
 * mirrored by tracer/sensors/bpf_event.py (DEV_PROG). */
struct dev_prog_record {
	u32 kind; /* GT_EV_DEV_PROG (denial probe) or GT_CHG_KIND_PROGRAM (change probe) */
	u32 id;
	u32 type;
	u32 len;    /* instructions the program has */
	u32 copied; /* instructions that follow (len, or GT_MAX_PROG_INSNS when longer) */
	u32 pad;
	u8 tag[8];
	char name[16];
	u64 insns[GT_MAX_PROG_INSNS];
};

/* cgroup->bpf.effective[CGROUP_DEVICE]: the programs devcgroup_check_permission()
 * runs for the cgroup's tasks, its own and those it inherits; 0 when unknown. */
static __always_inline void *dev_prog_array(void *cgrp)
{
	return cgrp ? rd_ptr(cgrp, OFF_CGROUP_BPF_EFFECTIVE + CGROUP_DEVICE_SLOT * 8) : 0;
}

/* The i-th program of such an array; 0 at its end. */
static __always_inline void *dev_prog_at(void *array, u32 i)
{
	return rd_ptr(array, OFF_PROG_ARRAY_ITEMS + i * SIZEOF_PROG_ARRAY_ITEM +
			      OFF_PROG_ARRAY_ITEM_PROG);
}

static __always_inline u32 prog_id_of(void *prog)
{
	return rd_u32(rd_ptr(prog, OFF_PROG_AUX), OFF_PROG_AUX_ID);
}

/* Fill `r` with program `prog`: returns the bytes of `r` to send, or 0 when its
 * instructions could not be read. */
static __always_inline u32 read_dev_prog(struct dev_prog_record *r, u32 kind, void *prog, u32 id)
{
	r->kind = kind;
	r->id = id;
	r->type = rd_u32(prog, OFF_PROG_TYPE);
	u32 len = rd_u32(prog, OFF_PROG_LEN);
	r->len = len;
	if (len > GT_MAX_PROG_INSNS)
		len = GT_MAX_PROG_INSNS;
	barrier_var(len);
	if (len > GT_MAX_PROG_INSNS)
		return 0;
	r->copied = len;
	r->pad = 0;
	bpf_probe_read_kernel(r->tag, sizeof(r->tag), (char *)prog + OFF_PROG_TAG);
	bpf_probe_read_kernel(r->name, sizeof(r->name), (char *)rd_ptr(prog, OFF_PROG_AUX) + OFF_PROG_AUX_NAME);
	if (bpf_probe_read_kernel(r->insns, len * 8, (char *)prog + OFF_PROG_INSNSI) != 0)
		return 0;
	return offsetof(struct dev_prog_record, insns) + len * 8;
}
#endif /* HAVE_DEV_PROGS */

#endif
