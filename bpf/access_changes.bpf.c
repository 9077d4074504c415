// SPDX-License-Identifier: GPL-2.0
/*
 * gputrace: access that changes while a workload runs.  Not the denial path
 * (that is gputrace.bpf.c): these programs record the calls that change who
 * may open a device later, so a denial can be told as a story.
 *
 *   WATCH_DEVICE_PROGRAMS  bpf(BPF_PROG_ATTACH | BPF_PROG_DETACH | BPF_LINK_CREATE)
 *                          of BPF_CGROUP_DEVICE programs (cgroup v2 device rules
 *                          being attached, replaced or detached): who (pid, comm,
 *                          parent), when, the target cgroup's id, the program's id,
 *                          the replaced program's id, the flags and the result.
 *                          With HAVE_DEV_PROGS also the target cgroup's effective
 *                          device programs before and after the call (cgroup->
 *                          bpf.effective, as the denial probe reads a task's), and
 *                          after a successful call each of those programs'
 *                          instructions, once per program id (struct dev_prog_record,
 *                          kind GT_CHG_KIND_PROGRAM, sent before the call's record):
 *                          the unit cannot ask bpf() for them (BPF_PROG_QUERY needs
 *                          CAP_NET_ADMIN, BPF_PROG_GET_FD_BY_ID CAP_SYS_ADMIN).
 *   WATCH_GROUP_CHANGES    setgroups/setgid/setregid/setresgid: the caller's groups
 *                          and gids before and after a successful call (an
 *                          entrypoint dropping the groups the runtime gave).
 *
 * Only bpf() and the set*gid calls reach these programs (syscall-specific
 * tracepoints); bpf() is filtered on its command at entry, so its exit costs
 * one hash lookup.  Like gputrace.bpf.c, the program never dereferences a
 * kernel struct by name: every offset arrives as a -D flag from BTF
 * (tracer/sensors/access_change_sensor.py), every constant from the one table
 * (tracer/sensors/bpf_constants.py, GT_CHG_*).
 */
#include <uapi/linux/ptrace.h>
#include "kernel_read.h"

#ifndef GT_CHG_MAX_GROUPS
#error "build with the -D flags of tracer/sensors/bpf_constants.py (change_cflags)"
#endif

struct chg_event {
	u32 kind; /* GT_CHG_KIND_* */
	u32 tgid;
	u32 tid;
	u32 ppid;
	u64 ts_ns;
	s64 ret;
	u64 cgroup_id; /* the caller's v2 cgroup */
	u32 uid;
	u32 mntns;
	u32 pidns;
	u32 pid_level; /* nesting of the caller's pid namespace (0: the host's) */
	char comm[16];
	char parent_comm[16];
	/* device programs */
	u32 cmd;
	u32 attach_type;
	u32 attach_flags;
	u32 prog_id;
	u32 replace_prog_id;
	u32 prog_type;
	u64 target_cgroup; /* inode number of the target cgroup directory: its cgroup id */
	u32 progs_known; /* GT_CHG_F_PROGS_BEFORE | GT_CHG_F_PROGS_AFTER: the lists below were read */
	u32 progs_before; /* the target's effective device programs; > GT_MAX_DEV_PROGS: more */
	u32 progs_after;
	u32 progs_pad;
	u32 before_ids[GT_MAX_DEV_PROGS];
	u32 after_ids[GT_MAX_DEV_PROGS];
	/* groups */
	u32 call; /* GT_CHG_CALL_* */
	u32 gid_before, egid_before, fsgid_before;
	u32 gid_after, egid_after, fsgid_after;
	u32 ngroups_before, ngroups_after;
	u32 groups_before[GT_CHG_MAX_GROUPS];
	u32 groups_after[GT_CHG_MAX_GROUPS];
	u32 pad; /* to the struct's 8-byte alignment, so Python's layout matches */
};

#ifdef CHG_EVENT_SIZE
_Static_assert(sizeof(struct chg_event) == CHG_EVENT_SIZE, "layout differs from access_change_sensor.py");
#endif

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(changes, GT_CHG_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(changes);
#endif
BPF_HASH(pending, u32, struct chg_event, GT_CHG_PENDING_MAX); /* tid -> call in flight */
BPF_PERCPU_ARRAY(chg_scratch, struct chg_event, 1);
BPF_PERCPU_ARRAY(chg_stats, u64, GT_CHG_ST_COUNT);
#if defined(WATCH_DEVICE_PROGRAMS) && defined(HAVE_DEV_PROGS)
BPF_HASH(pending_cgroup, u32, u64, GT_CHG_PENDING_MAX); /* tid -> the target's struct cgroup */
BPF_PERCPU_ARRAY(chg_prog_scratch, struct dev_prog_record, 1);
BPF_TABLE("lru_hash", u32, u64, chg_progs_sent, GT_DEV_PROGS_SENT_MAX); /* id -> struct bpf_prog * */
#endif

static __always_inline void stat_add(u32 idx)
{
	u64 *v = chg_stats.lookup(&idx);
	if (v)
		*v += 1;
}

/* The common part: who, when, where. */
static __always_inline struct chg_event *begin(u32 kind)
{
	u32 zero = 0;
	struct chg_event *ev = chg_scratch.lookup(&zero);
	if (!ev)
		return 0;
	__builtin_memset(ev, 0, sizeof(*ev));
	void *task = (void *)bpf_get_current_task();
	void *parent = rd_ptr(task, OFF_TASK_REAL_PARENT);
	u64 id = bpf_get_current_pid_tgid();
	ev->kind = kind;
	ev->tgid = id >> 32;
	ev->tid = (u32)id;
	ev->ppid = rd_u32(parent, OFF_TASK_TGID);
	ev->ts_ns = bpf_ktime_get_ns();
	ev->cgroup_id = bpf_get_current_cgroup_id();
	ev->uid = (u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	bpf_probe_read_kernel(ev->parent_comm, sizeof(ev->parent_comm), (char *)parent + OFF_TASK_COMM);
	void *nsp = rd_ptr(task, OFF_TASK_NSPROXY);
	if (nsp)
		ev->mntns = rd_u32(rd_ptr(nsp, OFF_NSPROXY_MNT), OFF_MNTNS_INUM);
	void *leader_pid = rd_ptr(rd_ptr(task, OFF_TASK_GROUP_LEADER), OFF_TASK_THREAD_PID);
	u32 level = rd_u32(leader_pid, OFF_PID_LEVEL) & 31;
	void *upid = (char *)leader_pid + OFF_PID_NUMBERS + level * SIZEOF_UPID;
	ev->pidns = rd_u32(rd_ptr(upid, OFF_UPID_NS), OFF_PIDNS_INUM);
	ev->pid_level = level;
	return ev;
}

static __always_inline int keep_pending(struct chg_event *ev)
{
	int err = pending.update(&ev->tid, ev);
	if (err != 0)
		stat_add(GT_CHG_ST_PENDING_FULL);
	return err;
}

static __always_inline void send(void *ctx, struct chg_event *ev)
{
#ifdef USE_RINGBUF
	int err = changes.ringbuf_output(ev, sizeof(*ev), 0);
#else
	int err = changes.perf_submit(ctx, ev, sizeof(*ev));
#endif
	stat_add(err ? GT_CHG_ST_DROPPED : GT_CHG_ST_EMITTED);
}

#ifdef WATCH_DEVICE_PROGRAMS
#ifdef HAVE_DEV_PROGS
/* The struct cgroup of a cgroup directory's file: f_inode->i_private is its
 * kernfs_node, whose priv is the cgroup (what cgroup_get_from_fd() reaches). */
static __always_inline void *cgroup_of_file(void *file)
{
	void *kn = rd_ptr(rd_ptr(file, OFF_FILE_INODE), OFF_INODE_I_PRIVATE);
	return kn ? rd_ptr(kn, OFF_KERNFS_PRIV) : 0;
}

/* Send a program's instructions unless this very program was sent already. */
static __always_inline void send_program(void *ctx, void *prog, u32 id)
{
	u64 *sent = chg_progs_sent.lookup(&id);
	if (sent && *sent == (u64)prog)
		return;
	u32 zero = 0;
	struct dev_prog_record *r = chg_prog_scratch.lookup(&zero);
	if (!r)
		return;
	u32 size = read_dev_prog(r, GT_CHG_KIND_PROGRAM, prog, id);
	barrier_var(size);
	if (size == 0 || size > sizeof(*r)) {
		stat_add(GT_CHG_ST_PROGS_UNREADABLE);
		return;
	}
#ifdef USE_RINGBUF
	int err = changes.ringbuf_output(r, size, 0);
#else
	int err = changes.perf_submit(ctx, r, size);
#endif
	if (err) {
		stat_add(GT_CHG_ST_PROGS_DROPPED); /* sent again with the next call naming it */
		return;
	}
	u64 p = (u64)prog;
	chg_progs_sent.update(&id, &p);
	stat_add(GT_CHG_ST_PROGS_SENT);
}

/* The effective device programs of `cgrp` into ids; returns their count (more than
 * GT_MAX_DEV_PROGS: more than the record holds), or -1 when unknown.  With `ctx`,
 * each program's instructions are sent too. */
static __always_inline int read_effective(void *ctx, void *cgrp, u32 *ids)
{
	void *array = dev_prog_array(cgrp);
	if (!array)
		return -1;
	u32 n = 0;
	for (u32 i = 0; i <= GT_MAX_DEV_PROGS; i++) {
		void *prog = dev_prog_at(array, i);
		if (!prog)
			break;
		if (n >= GT_MAX_DEV_PROGS) {
			n = GT_MAX_DEV_PROGS + 1;
			break;
		}
		u32 id = prog_id_of(prog);
		if (!id)
			continue; /* the kernel's dummy placeholder: it allows */
		ids[n & (GT_MAX_DEV_PROGS - 1)] = id;
		if (ctx)
			send_program(ctx, prog, id);
		n++;
	}
	return n;
}
#endif /* HAVE_DEV_PROGS */

/* The id and type of the BPF program behind `fd`: file->private_data is the bpf_prog. */
static __always_inline void prog_of_fd(void *task, s32 fd, u32 *id, u32 *type)
{
	void *file = fd_file(task, fd);
	if (!file)
		return;
	void *prog = rd_ptr(file, OFF_FILE_PRIVATE_DATA);
	if (!prog)
		return;
	if (type)
		*type = rd_u32(prog, OFF_PROG_TYPE);
	*id = rd_u32(rd_ptr(prog, OFF_PROG_AUX), OFF_PROG_AUX_ID);
}

TRACEPOINT_PROBE(syscalls, sys_enter_bpf)
{
	u32 cmd = (u32)args->cmd;
	if (cmd != GT_CHG_BPF_PROG_ATTACH && cmd != GT_CHG_BPF_PROG_DETACH &&
	    cmd != GT_CHG_BPF_LINK_CREATE)
		return 0;
	u32 attr[5] = {};
	if (bpf_probe_read_user(attr, sizeof(attr), args->uattr) != 0)
		return 0;
	/* PROG_ATTACH/DETACH: target_fd, attach_bpf_fd, attach_type, attach_flags, replace_bpf_fd;
	 * LINK_CREATE: prog_fd, target_fd, attach_type, flags */
	u32 link = cmd == GT_CHG_BPF_LINK_CREATE;
	if (attr[2] != GT_CHG_BPF_CGROUP_DEVICE)
		return 0;
	stat_add(GT_CHG_ST_PROGRAM_CALLS);
	struct chg_event *ev = begin(GT_CHG_KIND_DEVICE_PROGRAM);
	if (!ev)
		return 0;
	void *task = (void *)bpf_get_current_task();
	s32 target_fd = (s32)(link ? attr[1] : attr[0]);
	s32 prog_fd = (s32)(link ? attr[0] : attr[1]);
	ev->cmd = cmd;
	ev->attach_type = attr[2];
	ev->attach_flags = attr[3];
	void *target = fd_file(task, target_fd);
	if (target)
		ev->target_cgroup = rd_u64(rd_ptr(target, OFF_FILE_INODE), OFF_INODE_INO);
#ifdef HAVE_DEV_PROGS
	void *cgrp = target ? cgroup_of_file(target) : 0;
	if (cgrp) {
		int n = read_effective(0, cgrp, ev->before_ids);
		if (n >= 0) {
			ev->progs_before = n;
			ev->progs_known |= GT_CHG_F_PROGS_BEFORE;
		}
	}
#endif
	/* detach without a program fd detaches whatever is attached (non-multi mode) */
	if (prog_fd > 0 || cmd != GT_CHG_BPF_PROG_DETACH)
		prog_of_fd(task, prog_fd, &ev->prog_id, &ev->prog_type);
	if (!link && (attr[3] & GT_CHG_BPF_F_REPLACE))
		prog_of_fd(task, (s32)attr[4], &ev->replace_prog_id, 0);
	if (keep_pending(ev) != 0)
		return 0;
#ifdef HAVE_DEV_PROGS
	if (cgrp) {
		u64 c = (u64)cgrp;
		pending_cgroup.update(&ev->tid, &c);
	}
#endif
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_bpf)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct chg_event *ev = pending.lookup(&tid);
	if (!ev)
		return 0;
	ev->ret = args->ret;
#ifdef HAVE_DEV_PROGS
	u64 *cgrp = pending_cgroup.lookup(&tid);
	if (cgrp && args->ret == 0) { /* the programs the call left, instructions first */
		int n = read_effective(args, (void *)*cgrp, ev->after_ids);
		if (n >= 0) {
			ev->progs_after = n;
			ev->progs_known |= GT_CHG_F_PROGS_AFTER;
		}
	}
	pending_cgroup.delete(&tid);
#endif
	send(args, ev);
	pending.delete(&tid);
	return 0;
}
#endif /* WATCH_DEVICE_PROGRAMS */

#ifdef WATCH_GROUP_CHANGES
static __always_inline void read_creds(u32 *gid, u32 *egid, u32 *fsgid, u32 *ngroups, u32 *groups)
{
	void *task = (void *)bpf_get_current_task();
	void *cred = rd_ptr(task, OFF_TASK_CRED);
	*gid = rd_u32(cred, OFF_CRED_GID);
	*egid = rd_u32(cred, OFF_CRED_EGID);
	*fsgid = rd_u32(cred, OFF_CRED_FSGID);
	void *gi = rd_ptr(cred, OFF_CRED_GROUP_INFO);
	u32 ng = rd_u32(gi, OFF_GI_NGROUPS);
	*ngroups = ng;
	for (u32 i = 0; i < GT_CHG_MAX_GROUPS; i++) {
		if (i >= ng)
			break;
		groups[i] = rd_u32(gi, OFF_GI_GID + i * 4);
	}
}

static __always_inline int group_call_enter(u32 call)
{
	stat_add(GT_CHG_ST_GROUP_CALLS);
	struct chg_event *ev = begin(GT_CHG_KIND_GROUPS);
	if (!ev)
		return 0;
	ev->call = call;
	read_creds(&ev->gid_before, &ev->egid_before, &ev->fsgid_before, &ev->ngroups_before,
		   ev->groups_before);
	keep_pending(ev);
	return 0;
}

static __always_inline int group_call_exit(void *ctx, long ret)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct chg_event *ev = pending.lookup(&tid);
	if (!ev)
		return 0;
	if (ret == 0) { /* a failed call changed nothing: not worth an event */
		ev->ret = ret;
		read_creds(&ev->gid_after, &ev->egid_after, &ev->fsgid_after, &ev->ngroups_after,
			   ev->groups_after);
		send(ctx, ev);
	}
	pending.delete(&tid);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_setgroups) { return group_call_enter(GT_CHG_CALL_SETGROUPS); }
TRACEPOINT_PROBE(syscalls, sys_exit_setgroups) { return group_call_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_setgid) { return group_call_enter(GT_CHG_CALL_SETGID); }
TRACEPOINT_PROBE(syscalls, sys_exit_setgid) { return group_call_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_setregid) { return group_call_enter(GT_CHG_CALL_SETREGID); }
TRACEPOINT_PROBE(syscalls, sys_exit_setregid) { return group_call_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_setresgid) { return group_call_enter(GT_CHG_CALL_SETRESGID); }
TRACEPOINT_PROBE(syscalls, sys_exit_setresgid) { return group_call_exit(args, args->ret); }
#endif /* WATCH_GROUP_CHANGES */
