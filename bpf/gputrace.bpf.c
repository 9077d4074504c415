// SPDX-License-Identifier: GPL-2.0
/*
 * gputrace kernel sensor: failed opens and ioctls of GPU device nodes.
 *
 * Compiled by BCC.  Kernel headers only make it compile: the program never
 * dereferences a kernel struct by field name.  Every offset arrives as a -D
 * flag computed from the running kernel's BTF (tracer/sensors/bpf_layout.py),
 * and every read goes through bpf_probe_read_kernel at that offset.
 *
 * Hooks: only the watched syscalls pay.  HOOK_FEXIT puts fexit programs on
 * the syscall wrappers (FN_*); otherwise the syscall-specific exit
 * tracepoints (syscalls:sys_exit_open, _openat, ...) run, so every other
 * syscall skips BPF entirely.  Arguments come from the task's saved user
 * registers (bpf_task_pt_regs), read only after the errno filter passed.
 *
 * Configuration (-D), all from Python:
 *   GT_*                constants from ONE table (tracer/sensors/bpf_constants.py):
 *                       stat order, buffer sizes, flag bits, syscall ids
 *   ERRNO_MASK          bit e set = report -e
 *   HOOK_FEXIT          fexit programs; otherwise syscall exit tracepoints
 *   HAVE_SYS_OPEN/CREAT the architecture has open(2)/creat(2)
 *   USE_RINGBUF         BPF ring buffer (RINGBUF_PAGES); otherwise perf buffer
 *   CANDIDATES          send refused opens outside the GPU prefixes for
 *                       userspace to match by device number
 *   AGG_INTERVAL_NS     min time between count updates for one aggregate
 *   AGG_MAX             aggregation table size
 *   OFF_*, SIZEOF_UPID  struct offsets from BTF
 *   HAVE_CGROUP_NAMES   name the task's own cgroup (its v2 cgroup, else its v1
 *                       devices cgroup: DEVICES_CGRP_ID from BTF's cgroup_subsys_id)
 *   CONTAINER_STARTS    also the container-start signals: bpf/container_start.bpf.c is
 *                       appended to this file (BCC only generates tracepoint argument
 *                       structs for the main source, so it cannot be #included)
 *   HAVE_DEV_PROGS      read the refused task's effective cgroup v2 device programs
 *                       (ids in the event, instructions once per program id); with
 *                       the tracepoint hooks this runs in one program reached by a
 *                       tail call (gt_dev_progs_tail), so the verifier checks its loop
 *                       once, not in every hook
 *   HAVE_V1_DEVICES     read the id of the task's cgroup in the v1 devices hierarchy
 *
 * The event layout below is mirrored by tracer/sensors/bpf_event.py; the offset
 * of its variable tail (groups) is checked at compile time against
 * EVENT_GROUPS_OFFSET from Python.
 */
#include <uapi/linux/ptrace.h>
#include "kernel_read.h"

#ifndef GT_PATH_CAP
#error "build with the -D flags of tracer/sensors/bpf_constants.py"
#endif

#define PATH_CAP GT_PATH_CAP
#define MAX_GROUPS GT_MAX_GROUPS
#define PREFIX_CAP GT_PREFIX_CAP
#define NORM_IN GT_NORM_IN_CAP
#define WALK_DEPTH 16
#define NAME_CAP 64
#define DIR_END 255
#define AT_FDCWD_ -100
#define S_IFMT_ 0170000
#define S_IFCHR_ 0020000
#define DEV_ANY_MINOR 0xfffff
/* Keeps the compiler from folding away a bound the verifier needs to see. */

struct agg_key {
	u32 tgid;
	u16 sys;
	u16 err;
	u64 target; /* path hash; candidates: GT_TARGET_CANDIDATE | hash; ioctl: GT_TARGET_IOCTL | dev */
};

struct agg_val {
	u64 count;
	u64 last_emit_ns;
	u64 need_full; /* the first event was refused by the buffer: resend */
};

struct gpu_event {
	u32 kind;
	u32 sys;
	s32 err;
	u32 tgid;
	u32 tid;
	u32 ppid;
	u64 ts_ns;
	u64 count;
	struct agg_key key;
	/* GT_EV_UPDATE events end here */
	u64 cgroup_id;
	u64 devices_cgroup_id; /* the task's cgroup in the v1 devices hierarchy (kernfs id); 0: not read */
	u64 flags_or_cmd;
	u64 cap_eff;
	u32 dev;
	u32 path_flags; /* GT_F_* bits */
	u32 uid, gid, euid, egid, fsuid, fsgid;
	u32 ngroups;
	u32 userns_inum;
	u32 userns_level;
	u32 userns_owner;
	u32 mntns;
	u32 pidns;
	u32 cgroupns;
	u32 ns_pid;
	u32 loginuid;
	u32 sessionid;
	u32 seccomp_mode;    /* task->seccomp.mode (0 off, 1 strict, 2 filter); GT_F_SECCOMP_KNOWN */
	u32 seccomp_filters; /* task->seccomp.filter_count: filters attached */
	s32 dirfd;
	u32 path_len;
	u32 dev_prog_count;  /* effective device programs (GT_F_DEV_PROGS_KNOWN); > GT_MAX_DEV_PROGS: more */
	u32 dev_prog_ids[GT_MAX_DEV_PROGS];
	char comm[16];
	char path[PATH_CAP];  /* normalised: no //, no . or .. segments */
	char given[PATH_CAP]; /* the path as the process passed it */
	/* GT_F_CGROUP_NAMED: the task's own cgroup directory and its parent's, e.g.
	 * docker-<id>.scope, libpod-<id>, cri-containerd-<id>.scope, docker + <id> */
	char cgroup_leaf[GT_CGROUP_NAME_CAP];
	char cgroup_parent[GT_CGROUP_NAME_CAP];
	/* variable tail: min(ngroups, MAX_GROUPS) are sent, in the kernel's (ascending) order */
	u32 groups[MAX_GROUPS];
};

#define UPDATE_SIZE (offsetof(struct gpu_event, cgroup_id))
#ifdef EVENT_GROUPS_OFFSET
_Static_assert(offsetof(struct gpu_event, groups) == EVENT_GROUPS_OFFSET,
	       "event layout differs from bpf_event.py");
#endif

/* struct dev_prog_record (a device program's instructions) is in kernel_read.h. */

struct prefix_key { /* LPM trie key: the longest configured prefix of the path wins */
	u32 prefixlen; /* bits */
	char data[PREFIX_CAP];
};

struct scratch {
	struct gpu_event ev;
	char rel[PATH_CAP];
	char dir[2 * PATH_CAP];
	char name[NAME_CAP];
	char full[4 * PATH_CAP];
	struct prefix_key pkey;
	/* normaliser state, kept in the map so the verifier sees one state per step */
	u32 n_out, n_mark, n_depth, n_over;
	u16 n_stack[GT_NORM_DEPTH];
	u32 ev_size; /* bytes of ev to send, for the tail call that sends it */
};

struct not_gpu_key { /* a path userspace resolved to something that is not a GPU node */
	u32 mntns;
	u32 pad;
	u64 hash;
};

struct bucket { /* candidate rate bound, per CPU */
	u64 last_ns;
	u64 tokens;
};

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif
BPF_HASH(agg, struct agg_key, struct agg_val, AGG_MAX);
BPF_PERCPU_ARRAY(stats, u64, GT_ST_COUNT);
BPF_PERCPU_ARRAY(scratch_map, struct scratch, 1);
BPF_LPM_TRIE(prefixes, struct prefix_key, u8, GT_MAX_PREFIXES);
BPF_HASH(gpu_devs, u32, u8, GT_GPU_DEVS_MAX);
BPF_TABLE("lru_hash", struct not_gpu_key, u64, not_gpu, GT_NOT_GPU_MAX); /* value: valid until (ns) */
BPF_PERCPU_ARRAY(cand_bucket, struct bucket, 1);
#if defined(HAVE_DEV_PROGS) && !defined(HOOK_FEXIT)
#define DEV_PROGS_TAIL
BPF_PROG_ARRAY(denial_tail, 1); /* [0] = gt_dev_progs_tail */
#endif
#ifdef HAVE_DEV_PROGS
BPF_PERCPU_ARRAY(prog_scratch, struct dev_prog_record, 1);
BPF_TABLE("lru_hash", u32, u64, dev_progs_sent, GT_DEV_PROGS_SENT_MAX); /* id -> struct bpf_prog * */
#endif

static __always_inline void stat_add(u32 idx)
{
	u64 *v = stats.lookup(&idx);
	if (v)
		*v += 1;
}

static __always_inline int emit(void *ctx, void *data, u64 size)
{
#ifdef USE_RINGBUF
	return events.ringbuf_output(data, size, 0);
#else
	return events.perf_submit(ctx, data, size);
#endif
}

/* Name the path of (mnt, dentry) relative to the task's root, written
 * backwards so that it ends at s->dir[DIR_END].  Returns the start offset, or
 * -1 when the walk was cut short (too deep, too long, unreadable). */
static __always_inline int walk_path(struct scratch *s, void *mnt, void *dentry,
				     void *root_mnt, void *root_dentry)
{
	u32 pos = DIR_END;
	void *mount = (char *)mnt - OFF_MOUNT_MNT;

	for (int i = 0; i < WALK_DEPTH; i++) {
		if (dentry == root_dentry && mnt == root_mnt)
			return pos;
		if (dentry == rd_ptr(mnt, OFF_VFSMOUNT_ROOT)) {
			void *parent = rd_ptr(mount, OFF_MOUNT_PARENT);
			if (!parent || parent == mount)
				return pos; /* root of the mount namespace */
			dentry = rd_ptr(mount, OFF_MOUNT_MOUNTPOINT);
			mount = parent;
			mnt = (char *)parent + OFF_MOUNT_MNT;
			continue;
		}
		int n = bpf_probe_read_kernel_str(s->name, NAME_CAP, rd_ptr(dentry, OFF_DENTRY_NAME));
		if (n <= 1 || n >= NAME_CAP)
			return -1; /* empty, unreadable or longer than NAME_CAP */
		u32 len = n - 1;
		if (len + 1 > pos)
			return -1;
		pos -= len;
		barrier_var(len);
		len &= NAME_CAP - 1;
		bpf_probe_read_kernel(&s->dir[pos & DIR_END], len, s->name);
		pos -= 1;
		s->dir[pos & DIR_END] = '/';
		void *up = rd_ptr(dentry, OFF_DENTRY_PARENT);
		if (up == dentry)
			return pos;
		dentry = up;
	}
	return -1;
}

static __always_inline int task_root(void *task, void **mnt, void **dentry)
{
	void *fs = rd_ptr(task, OFF_TASK_FS);
	if (!fs)
		return -1;
	*mnt = rd_ptr(fs, OFF_FS_ROOT + OFF_PATH_MNT);
	*dentry = rd_ptr(fs, OFF_FS_ROOT + OFF_PATH_DENTRY);
	return 0;
}

/* Copy the walked path (s->dir[start..DIR_END)) to s->full; returns its length. */
static __always_inline u32 dir_to_full(struct scratch *s, int start)
{
	u32 len = DIR_END - (u32)start;
	barrier_var(len);
	len &= DIR_END;
	bpf_probe_read_kernel(s->full, len, &s->dir[start & DIR_END]);
	s->full[len & DIR_END] = 0;
	return len;
}

/* One trie lookup on the first PREFIX_CAP bytes: no loop for the verifier to unroll. */
static __always_inline int prefix_match(struct scratch *s, const char *p)
{
	s->pkey.prefixlen = PREFIX_CAP * 8;
	bpf_probe_read_kernel(s->pkey.data, PREFIX_CAP, p);
	return prefixes.lookup(&s->pkey) != 0;
}

static __always_inline u64 path_hash(const char *p)
{
	u64 h = 0xcbf29ce484222325ULL; /* FNV-1a */
	for (u32 i = 0; i < PATH_CAP; i++) {
		char c = p[i];
		if (!c)
			break;
		h = (h ^ (u8)c) * 0x100000001b3ULL;
	}
	return h & GT_HASH_MASK;
}

#ifdef HAVE_CGROUP_NAMES
/* The task's own cgroup by name: the cgroup directory carries the container id
 * (docker-<id>.scope, libpod-<id>, cri-containerd-<id>.scope, crio-<id>.scope,
 * /docker/<id>) even when no runtime state is left to read. */
static __always_inline void fill_cgroup_names(void *task, char *leaf, char *parent, u32 *flags)
{
	void *cset = rd_ptr(task, OFF_TASK_CGROUPS);
	void *kn = rd_ptr(rd_ptr(cset, OFF_CSS_SET_DFL_CGRP), OFF_CGROUP_KN);
	void *up = rd_ptr(kn, OFF_KERNFS_PARENT);
#ifdef DEVICES_CGRP_ID
	if (!up) { /* at the v2 root (or no v2 here): the v1 devices cgroup */
		void *css = rd_ptr(cset, OFF_CSS_SET_SUBSYS + DEVICES_CGRP_ID * 8);
		if (css) {
			kn = rd_ptr(rd_ptr(css, OFF_CSS_CGROUP), OFF_CGROUP_KN);
			up = rd_ptr(kn, OFF_KERNFS_PARENT);
			*flags |= GT_F_CGROUP_V1;
		}
	}
#endif
	leaf[0] = 0;
	parent[0] = 0;
	if (!up) /* the root of its hierarchy: no cgroup of its own */
		return;
	bpf_probe_read_kernel_str(leaf, GT_CGROUP_NAME_CAP, rd_ptr(kn, OFF_KERNFS_NAME));
	if (rd_ptr(up, OFF_KERNFS_PARENT)) /* the parent is not the root */
		bpf_probe_read_kernel_str(parent, GT_CGROUP_NAME_CAP, rd_ptr(up, OFF_KERNFS_NAME));
	*flags |= GT_F_CGROUP_NAMED;
}
#endif

#ifdef HAVE_DEV_PROGS
/* Send a device program's instructions unless this very program was sent already. */
static __always_inline void send_dev_prog(void *ctx, void *prog, u32 id)
{
	u64 *sent = dev_progs_sent.lookup(&id);
	if (sent && *sent == (u64)prog)
		return;
	u32 zero = 0;
	struct dev_prog_record *r = prog_scratch.lookup(&zero);
	if (!r)
		return;
	u32 size = read_dev_prog(r, GT_EV_DEV_PROG, prog, id);
	barrier_var(size);
	if (size == 0 || size > sizeof(*r)) {
		stat_add(GT_ST_DEV_PROGS_UNREADABLE);
		return;
	}
	if (emit(ctx, r, size) == 0) {
		u64 p = (u64)prog;
		dev_progs_sent.update(&id, &p);
		stat_add(GT_ST_DEV_PROGS_SENT);
	} else {
		stat_add(GT_ST_DEV_PROGS_DROPPED); /* sent again with the next denial naming it */
	}
}

/* task->cgroups->dfl_cgrp->bpf.effective[CGROUP_DEVICE]: the programs
 * devcgroup_check_permission() ran for this task, as they are now. */
static __always_inline void fill_dev_progs(void *ctx, void *task, struct gpu_event *ev)
{
	ev->dev_prog_count = 0;
	void *cgrp = rd_ptr(rd_ptr(task, OFF_TASK_CGROUPS), OFF_CSS_SET_DFL_CGRP);
	if (!cgrp)
		return;
	void *array = dev_prog_array(cgrp);
	if (!array)
		return;
	u32 n = 0;
	for (u32 i = 0; i <= GT_MAX_DEV_PROGS; i++) {
		void *prog = dev_prog_at(array, i);
		if (!prog)
			break;
		if (n >= GT_MAX_DEV_PROGS) {
			n = GT_MAX_DEV_PROGS + 1; /* more than the event holds */
			break;
		}
		u32 id = prog_id_of(prog);
		if (!id)
			continue; /* the kernel's dummy placeholder: it allows */
		ev->dev_prog_ids[n & (GT_MAX_DEV_PROGS - 1)] = id;
		send_dev_prog(ctx, prog, id);
		n++;
	}
	ev->dev_prog_count = n;
	ev->path_flags |= GT_F_DEV_PROGS_KNOWN;
}
#endif

/* Fill the task's credentials and namespaces; returns the bytes of `ev` to send. */
static __always_inline u32 fill_task(void *ctx, struct gpu_event *ev)
{
	void *task = (void *)bpf_get_current_task();
	void *cred = rd_ptr(task, OFF_TASK_CRED);

	ev->ppid = rd_u32(rd_ptr(task, OFF_TASK_REAL_PARENT), OFF_TASK_TGID);
	ev->uid = rd_u32(cred, OFF_CRED_UID);
	ev->gid = rd_u32(cred, OFF_CRED_GID);
	ev->euid = rd_u32(cred, OFF_CRED_EUID);
	ev->egid = rd_u32(cred, OFF_CRED_EGID);
	ev->fsuid = rd_u32(cred, OFF_CRED_FSUID);
	ev->fsgid = rd_u32(cred, OFF_CRED_FSGID);
	ev->cap_eff = rd_u64(cred, OFF_CRED_CAP_EFF);

	void *gi = rd_ptr(cred, OFF_CRED_GROUP_INFO);
	u32 ng = rd_u32(gi, OFF_GI_NGROUPS);
	ev->ngroups = ng;
	u32 copy = ng < MAX_GROUPS ? ng : MAX_GROUPS;
	barrier_var(copy);
	if (copy > MAX_GROUPS)
		copy = MAX_GROUPS;
	/* group_info keeps them sorted: a longer list is still decided up to its last copied gid */
	if (bpf_probe_read_kernel(ev->groups, copy * 4, (char *)gi + OFF_GI_GID) != 0)
		copy = 0;

	void *uns = rd_ptr(cred, OFF_CRED_USER_NS);
	ev->userns_inum = rd_u32(uns, OFF_USERNS_INUM);
	ev->userns_level = rd_u32(uns, OFF_USERNS_LEVEL);
	ev->userns_owner = rd_u32(uns, OFF_USERNS_OWNER);

	void *nsp = rd_ptr(task, OFF_TASK_NSPROXY);
	if (nsp) {
		ev->mntns = rd_u32(rd_ptr(nsp, OFF_NSPROXY_MNT), OFF_MNTNS_INUM);
		ev->cgroupns = rd_u32(rd_ptr(nsp, OFF_NSPROXY_CGROUP), OFF_CGROUPNS_INUM);
	}
	/* pid namespace and pid as seen there: the thread group leader's struct pid */
	void *leader_pid = rd_ptr(rd_ptr(task, OFF_TASK_GROUP_LEADER), OFF_TASK_THREAD_PID);
	u32 level = rd_u32(leader_pid, OFF_PID_LEVEL) & 31;
	void *upid = (char *)leader_pid + OFF_PID_NUMBERS + level * SIZEOF_UPID;
	ev->ns_pid = rd_u32(upid, OFF_UPID_NR);
	ev->pidns = rd_u32(rd_ptr(upid, OFF_UPID_NS), OFF_PIDNS_INUM);
#ifdef HAVE_AUDIT_IDS
	ev->loginuid = rd_u32(task, OFF_TASK_LOGINUID);
	ev->sessionid = rd_u32(task, OFF_TASK_SESSIONID);
#else
	ev->loginuid = (u32)-1;
	ev->sessionid = (u32)-1;
#endif
#ifdef HAVE_SECCOMP
	/* read now: an EPERM process usually exits before userspace could look at /proc */
	ev->seccomp_mode = rd_u32(task, OFF_TASK_SECCOMP_MODE);
	ev->seccomp_filters = rd_u32(task, OFF_TASK_SECCOMP_FILTER_COUNT);
	ev->path_flags |= GT_F_SECCOMP_KNOWN;
#else
	ev->seccomp_mode = 0;
	ev->seccomp_filters = 0;
#endif
#ifdef OFF_TASK_ATOMIC_FLAGS
	/* PFA_NO_NEW_PRIVS (bit 0): whether a setuid helper (nvidia-modprobe) could have run */
	if (rd_u32(task, OFF_TASK_ATOMIC_FLAGS) & 1)
		ev->path_flags |= GT_F_NO_NEW_PRIVS;
	ev->path_flags |= GT_F_NNP_KNOWN;
#endif
	ev->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
#ifdef HAVE_CGROUP_NAMES
	fill_cgroup_names(task, ev->cgroup_leaf, ev->cgroup_parent, &ev->path_flags);
#endif
#ifdef HAVE_V1_DEVICES
	/* task->cgroups->subsys[devices_cgrp_id]->cgroup->kn->id: its devices.list can be
	 * read after the task exited, while that cgroup lives */
	void *devcss = rd_ptr(rd_ptr(task, OFF_TASK_CGROUPS), OFF_CSS_SET_SUBSYS + DEVICES_CGRP_ID * 8);
	ev->devices_cgroup_id = rd_u64(rd_ptr(rd_ptr(devcss, OFF_CSS_CGROUP), OFF_CGROUP_KN),
				       OFF_KERNFS_NODE_ID);
#else
	ev->devices_cgroup_id = 0;
#endif
	ev->dev_prog_count = 0;
#if defined(HAVE_DEV_PROGS) && !defined(DEV_PROGS_TAIL)
	fill_dev_progs(ctx, task, ev);
#endif
	return offsetof(struct gpu_event, groups) + copy * 4;
}

static __always_inline void emit_denial(void *ctx, struct gpu_event *ev, u64 size,
					struct agg_val *v)
{
	barrier_var(size);
	if (size > sizeof(*ev))
		size = sizeof(*ev);
	barrier_var(size); /* the bounded value itself goes to the helper */
	if (emit(ctx, ev, size) == 0) {
		stat_add(GT_ST_EMITTED);
	} else {
		stat_add(GT_ST_DROPPED_BUFFER_FULL);
		if (v)
			v->need_full = 1;
	}
}

#ifdef DEV_PROGS_TAIL
/* Reached by tail call from report(): the denial's device programs, then the denial. */
int gt_dev_progs_tail(void *ctx)
{
	u32 zero = 0;
	struct scratch *s = scratch_map.lookup(&zero);
	if (!s)
		return 0;
	fill_dev_progs(ctx, (void *)bpf_get_current_task(), &s->ev);
	emit_denial(ctx, &s->ev, s->ev_size, agg.lookup(&s->ev.key));
	return 0;
}
#endif

/* Count the denial; send the full event the first time, count updates after. */
static __always_inline int report(void *ctx, struct scratch *s, struct agg_key *key, u64 now)
{
	struct gpu_event *ev = &s->ev;
	u64 count = 1;
	int full = 1;

	stat_add(GT_ST_DENIALS);
	struct agg_val *v = agg.lookup(key);
	if (!v) {
		struct agg_val init = { .count = 1, .last_emit_ns = now };
		if (agg.insert(key, &init) == 0) {
			v = agg.lookup(key);
		} else {
			v = agg.lookup(key); /* lost an insert race, or the table is full */
			if (v) {
				count = __sync_fetch_and_add(&v->count, 1) + 1;
				stat_add(GT_ST_AGGREGATED);
				full = 0;
			} else {
				stat_add(GT_ST_AGGREGATION_TABLE_FULL);
				ev->path_flags |= GT_F_UNAGGREGATED;
			}
		}
	} else {
		count = __sync_fetch_and_add(&v->count, 1) + 1;
		stat_add(GT_ST_AGGREGATED);
		full = 0;
	}
	if (!full && v && v->need_full) {
		v->need_full = 0;
		full = 1;
		ev->path_flags |= GT_F_REEMITTED;
	}

	ev->ts_ns = now;
	ev->count = count;
	__builtin_memcpy(&ev->key, key, sizeof(*key));
	if (full) {
		u32 size = fill_task(ctx, ev);
		barrier_var(size);
		if (size > sizeof(*ev))
			size = sizeof(*ev);
#ifdef DEV_PROGS_TAIL
		s->ev_size = size;
		denial_tail.call(ctx, 0); /* reads the device programs, then sends: no return */
		stat_add(GT_ST_DEV_PROGS_TAIL_FAILED); /* sent without them: enrichment asks bpf() */
#endif
		emit_denial(ctx, ev, size, v);
		return 0;
	}
	if (v && now - v->last_emit_ns >= AGG_INTERVAL_NS) {
		v->last_emit_ns = now;
		ev->kind = GT_EV_UPDATE;
		ev->count = v->count;
		if (emit(ctx, ev, UPDATE_SIZE) == 0)
			stat_add(GT_ST_UPDATES);
		else
			stat_add(GT_ST_DROPPED_UPDATE);
	}
	return 0;
}

static __always_inline struct scratch *begin(u32 sys, long ret)
{
	u32 zero = 0;
	struct scratch *s = scratch_map.lookup(&zero);
	if (!s)
		return 0;
	u64 pt = bpf_get_current_pid_tgid();
	s->ev.kind = GT_EV_DENIAL;
	s->ev.sys = sys;
	s->ev.err = -ret;
	s->ev.tgid = pt >> 32;
	s->ev.tid = (u32)pt;
	s->ev.path_flags = 0;
	s->ev.dev = 0;
	s->ev.dirfd = AT_FDCWD_;
	return s;
}

static __always_inline u32 ix_in(u32 v)
{
	barrier_var(v);
	return v & (NORM_IN - 1);
}

static __always_inline u32 ix_out(u32 v)
{
	barrier_var(v);
	return v & (PATH_CAP - 1);
}

/* One character of the lexical normaliser: s->full (absolute) -> s->ev.path.
 * A segment is copied as it is read; at its end it is undone when it is empty
 * (//), "." or "..", and ".." also pops the previous segment.  Returns 1 when
 * done. */
static __always_inline int norm_step(struct scratch *s, u32 i)
{
	char c = s->full[ix_in(i)];
	char *out = s->ev.path;
	if (c == '/' || c == 0) {
		u32 mark = s->n_mark, o = s->n_out;
		u32 len = o > mark ? o - mark - 1 : 0;
		if (len == 0 || (len == 1 && out[ix_out(mark + 1)] == '.')) {
			s->n_out = mark;
		} else if (len == 2 && out[ix_out(mark + 1)] == '.' && out[ix_out(mark + 2)] == '.') {
			s->n_out = mark;
			if (s->n_depth > 0) {
				s->n_depth -= 1;
				s->n_out = s->n_stack[ix_out(s->n_depth) & (GT_NORM_DEPTH - 1)];
			}
		} else if (s->n_depth < GT_NORM_DEPTH) {
			s->n_stack[ix_out(s->n_depth) & (GT_NORM_DEPTH - 1)] = mark;
			s->n_depth += 1;
		} else {
			s->n_over = 1; /* deeper than the stack: ".." could not climb back */
		}
		if (c == 0)
			return 1;
		s->n_mark = s->n_out;
		if (s->n_out >= PATH_CAP - 1) {
			s->n_over = 1;
			return 1;
		}
		out[ix_out(s->n_out)] = '/';
		s->n_out += 1;
		return 0;
	}
	if (s->n_out >= PATH_CAP - 1) {
		s->n_over = 1;
		return 1;
	}
	out[ix_out(s->n_out)] = c;
	s->n_out += 1;
	return 0;
}

/* Normalise the absolute path in s->full into s->ev.path; returns its length. */
static __always_inline u32 normalise(struct scratch *s)
{
	s->n_out = 0;
	s->n_mark = 0;
	s->n_depth = 0;
	s->n_over = 0;
	for (u32 i = 0; i < NORM_IN; i++) {
		if (norm_step(s, i))
			break;
	}
	u32 len = s->n_out;
	if (len == 0) { /* "/", "/.", "/.." */
		s->ev.path[0] = '/';
		len = 1;
	}
	s->ev.path[ix_out(len)] = 0;
	return len;
}

static __always_inline u32 current_mntns(void)
{
	void *task = (void *)bpf_get_current_task();
	void *nsp = rd_ptr(task, OFF_TASK_NSPROXY);
	if (!nsp)
		return 0;
	return rd_u32(rd_ptr(nsp, OFF_NSPROXY_MNT), OFF_MNTNS_INUM);
}

#ifdef CANDIDATES
/* May a new candidate be sent now?  A token bucket per CPU bounds the rate. */
static __always_inline int candidate_token(u64 now)
{
	u32 zero = 0;
	struct bucket *b = cand_bucket.lookup(&zero);
	if (!b)
		return 0;
	u64 tokens = b->tokens;
	u64 gained = (now - b->last_ns) / (1000000000ULL / GT_CANDIDATE_RATE);
	if (gained) {
		tokens += gained;
		if (tokens > GT_CANDIDATE_BURST)
			tokens = GT_CANDIDATE_BURST;
		b->last_ns = now;
	}
	if (!tokens) {
		b->tokens = 0;
		return 0;
	}
	b->tokens = tokens - 1;
	return 1;
}
#endif

static __always_inline int on_open(void *ctx, u32 sys, long ret, s32 dirfd,
				   const char *upath, u64 flags)
{
	struct scratch *s = begin(sys, ret);
	if (!s)
		return 0;
	struct gpu_event *ev = &s->ev;
	ev->dirfd = dirfd;
	ev->flags_or_cmd = flags;

	int n = bpf_probe_read_user_str(s->rel, PATH_CAP, upath);
	if (n <= 0) {
		stat_add(GT_ST_PATH_UNREADABLE);
		return 0;
	}
	if (s->rel[0] != '/') {
		void *task = (void *)bpf_get_current_task();
		void *mnt = 0, *dentry = 0, *root_mnt = 0, *root_dentry = 0;
		if (task_root(task, &root_mnt, &root_dentry) < 0)
			return 0;
		if (dirfd == AT_FDCWD_) {
			void *fs = rd_ptr(task, OFF_TASK_FS);
			mnt = rd_ptr(fs, OFF_FS_PWD + OFF_PATH_MNT);
			dentry = rd_ptr(fs, OFF_FS_PWD + OFF_PATH_DENTRY);
		} else {
			void *file = fd_file(task, dirfd);
			if (!file)
				return 0;
			mnt = rd_ptr(file, OFF_FILE_PATH + OFF_PATH_MNT);
			dentry = rd_ptr(file, OFF_FILE_PATH + OFF_PATH_DENTRY);
		}
		int start = walk_path(s, mnt, dentry, root_mnt, root_dentry);
		if (start < 0) {
			stat_add(GT_ST_DIR_UNRESOLVED);
			return 0;
		}
		u32 dlen = dir_to_full(s, start);
		s->full[dlen & DIR_END] = '/';
		u32 off = (dlen + 1) & (2 * PATH_CAP - 1);
		if (bpf_probe_read_kernel_str(&s->full[off], PATH_CAP, s->rel) <= 0)
			return 0;
		ev->path_flags |= GT_F_RELATIVE;
	} else {
		bpf_probe_read_kernel_str(s->full, PATH_CAP, s->rel);
	}
	s->full[NORM_IN - 1] = 0; /* longer inputs are cut (and flagged) */
	u32 len = normalise(s);
	if (s->n_over)
		ev->path_flags |= GT_F_TRUNCATED;

	u64 target = GT_TARGET_CANDIDATE;
	if (prefix_match(s, ev->path)) {
		target = 0;
	} else {
#ifdef CANDIDATES
		stat_add(GT_ST_CANDIDATES);
		struct not_gpu_key nk = { .mntns = current_mntns() };
		nk.hash = path_hash(ev->path);
		u64 *until = not_gpu.lookup(&nk);
		if (until && *until > bpf_ktime_get_ns()) { /* re-checked once it expires */
			stat_add(GT_ST_CANDIDATES_KNOWN);
			return 0;
		}
		ev->path_flags |= GT_F_CANDIDATE;
#else
		return 0;
#endif
	}

	if (n == PATH_CAP) { /* the user's path filled the buffer: was there more? */
		char more = 0;
		bpf_probe_read_user(&more, 1, upath + PATH_CAP - 1);
		if (more)
			ev->path_flags |= GT_F_TRUNCATED;
	}
	ev->path_len = len;
	bpf_probe_read_kernel_str(ev->given, PATH_CAP, s->rel);

	struct agg_key key = { .tgid = ev->tgid, .sys = sys, .err = -ret };
	key.target = target | path_hash(ev->path);
	u64 now = bpf_ktime_get_ns();
#ifdef CANDIDATES
	if (target && !agg.lookup(&key) && !candidate_token(now)) {
		stat_add(GT_ST_CANDIDATES_RATE_LIMITED);
		return 0;
	}
#endif
	return report(ctx, s, &key, now);
}

static __always_inline int on_ioctl(void *ctx, long ret, s32 fd, u64 cmd)
{
	void *task = (void *)bpf_get_current_task();
	void *file = fd_file(task, fd);
	if (!file)
		return 0;
	void *inode = rd_ptr(file, OFF_FILE_INODE);
	u16 mode = 0;
	bpf_probe_read_kernel(&mode, sizeof(mode), (char *)inode + OFF_INODE_MODE);
	if ((mode & S_IFMT_) != S_IFCHR_)
		return 0;
	u32 rdev = rd_u32(inode, OFF_INODE_RDEV);
	u32 any = (rdev & ~DEV_ANY_MINOR) | DEV_ANY_MINOR;
	if (!gpu_devs.lookup(&rdev) && !gpu_devs.lookup(&any))
		return 0;

	struct scratch *s = begin(GT_SYS_IOCTL, ret);
	if (!s)
		return 0;
	struct gpu_event *ev = &s->ev;
	ev->dirfd = fd;
	ev->flags_or_cmd = cmd;
	ev->dev = rdev;
	ev->path_flags |= GT_F_DEV_VALID;
	ev->path_len = 0;
	ev->path[0] = 0;
	ev->given[0] = 0;

	struct agg_key key = { .tgid = ev->tgid, .sys = GT_SYS_IOCTL, .err = -ret };
	key.target = GT_TARGET_IOCTL | rdev;
	struct agg_val *seen = agg.lookup(&key);
	if (!seen || seen->need_full) {
		/* name the node only for events that will carry it */
		void *root_mnt = 0, *root_dentry = 0;
		if (task_root(task, &root_mnt, &root_dentry) == 0) {
			int start = walk_path(s, rd_ptr(file, OFF_FILE_PATH + OFF_PATH_MNT),
					      rd_ptr(file, OFF_FILE_PATH + OFF_PATH_DENTRY),
					      root_mnt, root_dentry);
			if (start >= 0) {
				u32 dlen = dir_to_full(s, start);
				ev->path_len = dlen;
				bpf_probe_read_kernel_str(ev->path, PATH_CAP, s->full);
			} else {
				ev->path_flags |= GT_F_DIR_UNRESOLVED;
			}
		}
	}
	return report(ctx, s, &key, bpf_ktime_get_ns());
}

static __always_inline long regs_arg(void *regs, u32 off)
{
	return (long)rd_u64(regs, off);
}

static __always_inline int dispatch(void *ctx, u32 sys, void *regs, long ret)
{
	switch (sys) {
	case GT_SYS_OPEN:
		return on_open(ctx, sys, ret, AT_FDCWD_, (const char *)regs_arg(regs, OFF_REGS_ARG0),
			       regs_arg(regs, OFF_REGS_ARG1));
	case GT_SYS_CREAT: /* creat(path, mode) == open(path, O_CREAT|O_WRONLY|O_TRUNC, mode) */
		return on_open(ctx, sys, ret, AT_FDCWD_, (const char *)regs_arg(regs, OFF_REGS_ARG0),
			       01101);
	case GT_SYS_OPENAT:
		return on_open(ctx, sys, ret, (s32)regs_arg(regs, OFF_REGS_ARG0),
			       (const char *)regs_arg(regs, OFF_REGS_ARG1), regs_arg(regs, OFF_REGS_ARG2));
	case GT_SYS_OPENAT2: {
		u64 flags = 0; /* struct open_how: u64 flags first (uapi) */
		bpf_probe_read_user(&flags, sizeof(flags), (void *)regs_arg(regs, OFF_REGS_ARG2));
		return on_open(ctx, sys, ret, (s32)regs_arg(regs, OFF_REGS_ARG0),
			       (const char *)regs_arg(regs, OFF_REGS_ARG1), flags);
	}
	case GT_SYS_IOCTL:
		return on_ioctl(ctx, ret, (s32)regs_arg(regs, OFF_REGS_ARG0), regs_arg(regs, OFF_REGS_ARG1));
	}
	return 0;
}

static __always_inline int errno_wanted(long ret)
{
	if (ret >= 0 || ret < -63)
		return 0;
	return (ERRNO_MASK >> (u32)(-ret)) & 1;
}

#ifdef HOOK_FEXIT
#define GT_FEXIT(fn, sys)                                     \
	KRETFUNC_PROBE(fn, struct pt_regs *regs, long ret)    \
	{                                                     \
		if (!errno_wanted(ret))                       \
			return 0;                             \
		return dispatch(ctx, sys, regs, ret);         \
	}
#define GT_FEXIT_(fn, sys) GT_FEXIT(fn, sys)
#ifdef HAVE_SYS_OPEN
GT_FEXIT_(FN_OPEN, GT_SYS_OPEN)
#endif
#ifdef HAVE_SYS_CREAT
GT_FEXIT_(FN_CREAT, GT_SYS_CREAT)
#endif
GT_FEXIT_(FN_OPENAT, GT_SYS_OPENAT)
GT_FEXIT_(FN_OPENAT2, GT_SYS_OPENAT2)
GT_FEXIT_(FN_IOCTL, GT_SYS_IOCTL)

#else /* syscall-specific exit tracepoints: unwatched syscalls never reach BPF */

/* The registers the task entered the syscall with (arguments intact). */
static __always_inline void *user_regs(void)
{
	return (void *)bpf_task_pt_regs(bpf_get_current_task_btf());
}

#ifdef HAVE_SYS_OPEN
TRACEPOINT_PROBE(syscalls, sys_exit_open)
{
	long ret = args->ret;
	if (!errno_wanted(ret))
		return 0;
	return dispatch(args, GT_SYS_OPEN, user_regs(), ret);
}
#endif

#ifdef HAVE_SYS_CREAT
TRACEPOINT_PROBE(syscalls, sys_exit_creat)
{
	long ret = args->ret;
	if (!errno_wanted(ret))
		return 0;
	return dispatch(args, GT_SYS_CREAT, user_regs(), ret);
}
#endif

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
	long ret = args->ret;
	if (!errno_wanted(ret))
		return 0;
	return dispatch(args, GT_SYS_OPENAT, user_regs(), ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat2)
{
	long ret = args->ret;
	if (!errno_wanted(ret))
		return 0;
	return dispatch(args, GT_SYS_OPENAT2, user_regs(), ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
	long ret = args->ret;
	if (!errno_wanted(ret))
		return 0;
	return dispatch(args, GT_SYS_IOCTL, user_regs(), ret);
}
#endif
