// SPDX-License-Identifier: GPL-2.0
/*
 * The kernel's word that a container started, so that none is missed however
 * short its life.  Appended to gputrace.bpf.c when built with -DCONTAINER_STARTS
 * (tracer/sensors/bpf_sensor.py; it uses that file's helpers, offsets and
 * `events` buffer).  Measured on
 * runc, crun, podman (rootful and rootless), docker and containerd: see
 * docs/architecture.md.  Two signals, each sent as one struct start_event:
 *
 *   sched:sched_process_exec  by a task that is pid 1 of a pid namespace other
 *                             than the initial one: a container's init starting
 *                             its program (every runtime, rootless included;
 *                             not --pid=host containers)
 *   cgroup:cgroup_mkdir       in hierarchy START_MKDIR_ROOT (the v2 hierarchy, else
 *                             the v1 devices one), when defined: the runtime
 *                             making the container's cgroup (rootful runtimes, also
 *                             --pid=host), with the runtime's own command line
 *                             (--root, the container id), read from its memory
 *                             while it runs
 *
 * Configuration (-D): GT_START_* from tracer/sensors/bpf_constants.py;
 * START_MKDIR_ROOT; OFF_TASK_MM, OFF_MM_ARG_START, OFF_MM_ARG_END from BTF.
 */

#ifdef CONTAINER_STARTS
struct start_event {
	u32 kind;  /* GT_EV_START */
	u32 how;   /* GT_START_EXEC or GT_START_MKDIR */
	u64 ts_ns;
	u64 cgroup_id; /* exec: the task's v2 cgroup; mkdir: the new cgroup */
	u32 tgid;      /* exec: the container's init; mkdir: the task making the cgroup */
	u32 ppid;
	u32 uid;
	u32 userns_inum;
	u32 userns_level;
	u32 userns_owner;
	u32 mntns;
	u32 pidns;
	u32 level;    /* mkdir: the new cgroup's depth */
	u32 flags;    /* GT_F_CGROUP_NAMED, GT_F_CGROUP_V1, GT_F_START_* */
	u32 argv_len; /* bytes of argv */
	u32 pad;
	char comm[16];
	char cgroup_leaf[GT_CGROUP_NAME_CAP];   /* exec: the task's own cgroup by name */
	char cgroup_parent[GT_CGROUP_NAME_CAP];
	char path[GT_START_PATH_CAP];           /* mkdir: the new cgroup's path */
	char argv[GT_START_ARGV_CAP];           /* mkdir: its maker's command line, NUL-separated
						 * (at most GT_START_ARGV_CAP - 1 bytes) */
};

#ifdef START_EVENT_SIZE
_Static_assert(sizeof(struct start_event) == START_EVENT_SIZE,
	       "start_event layout differs from tracer/sensors/container_starts.py");
#endif

BPF_PERCPU_ARRAY(start_scratch, struct start_event, 1);

static __always_inline struct start_event *start_begin(u32 how, void *task)
{
	u32 zero = 0;
	struct start_event *e = start_scratch.lookup(&zero);
	if (!e)
		return 0;
	void *cred = rd_ptr(task, OFF_TASK_CRED);
	void *uns = rd_ptr(cred, OFF_CRED_USER_NS);
	void *nsp = rd_ptr(task, OFF_TASK_NSPROXY);
	void *leader_pid = rd_ptr(rd_ptr(task, OFF_TASK_GROUP_LEADER), OFF_TASK_THREAD_PID);
	u32 level = rd_u32(leader_pid, OFF_PID_LEVEL) & 31;
	void *upid = (char *)leader_pid + OFF_PID_NUMBERS + level * SIZEOF_UPID;

	e->kind = GT_EV_START;
	e->how = how;
	e->ts_ns = bpf_ktime_get_ns();
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->ppid = rd_u32(rd_ptr(task, OFF_TASK_REAL_PARENT), OFF_TASK_TGID);
	e->uid = rd_u32(cred, OFF_CRED_UID);
	e->userns_inum = rd_u32(uns, OFF_USERNS_INUM);
	e->userns_level = rd_u32(uns, OFF_USERNS_LEVEL);
	e->userns_owner = rd_u32(uns, OFF_USERNS_OWNER);
	e->mntns = nsp ? rd_u32(rd_ptr(nsp, OFF_NSPROXY_MNT), OFF_MNTNS_INUM) : 0;
	e->pidns = rd_u32(rd_ptr(upid, OFF_UPID_NS), OFF_PIDNS_INUM);
	e->level = 0;
	e->flags = 0;
	e->argv_len = 0;
	e->cgroup_leaf[0] = 0;
	e->cgroup_parent[0] = 0;
	e->path[0] = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return e;
}

static __always_inline void start_emit(void *ctx, struct start_event *e)
{
	if (emit(ctx, e, sizeof(*e)) == 0)
		stat_add(GT_ST_CONTAINER_STARTS);
	else
		stat_add(GT_ST_CONTAINER_STARTS_DROPPED);
}

/* A container's init starting its program: pid 1 of a pid namespace not the host's. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
	void *task = (void *)bpf_get_current_task();
	void *leader_pid = rd_ptr(rd_ptr(task, OFF_TASK_GROUP_LEADER), OFF_TASK_THREAD_PID);
	u32 level = rd_u32(leader_pid, OFF_PID_LEVEL) & 31;
	if (!level)
		return 0;
	void *upid = (char *)leader_pid + OFF_PID_NUMBERS + level * SIZEOF_UPID;
	if (rd_u32(upid, OFF_UPID_NR) != 1)
		return 0;
	struct start_event *e = start_begin(GT_START_EXEC, task);
	if (!e)
		return 0;
	e->cgroup_id = bpf_get_current_cgroup_id();
#ifdef HAVE_CGROUP_NAMES
	fill_cgroup_names(task, e->cgroup_leaf, e->cgroup_parent, &e->flags);
#endif
	start_emit(args, e);
	return 0;
}

#ifdef START_MKDIR_ROOT
/* A runtime making a container's cgroup, with its own command line. */
TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
	if (args->root != START_MKDIR_ROOT || args->level < 1)
		return 0;
	void *task = (void *)bpf_get_current_task();
	struct start_event *e = start_begin(GT_START_MKDIR, task);
	if (!e)
		return 0;
	e->cgroup_id = args->id;
	e->level = args->level;
	int n = bpf_probe_read_kernel_str(e->path, GT_START_PATH_CAP,
					  (char *)args + (args->data_loc_path & 0xffff));
	if (n >= GT_START_PATH_CAP)
		e->flags |= GT_F_START_PATH_CUT;
	void *mm = rd_ptr(task, OFF_TASK_MM);
	if (mm) {
		u64 from = rd_u64(mm, OFF_MM_ARG_START), to = rd_u64(mm, OFF_MM_ARG_END);
		u32 len = to > from && to - from < 0x100000 ? to - from : 0;
		if (len > GT_START_ARGV_CAP - 1) { /* a power of two: the mask bounds it */
			len = GT_START_ARGV_CAP - 1;
			e->flags |= GT_F_START_ARGV_CUT;
		}
		barrier_var(len);
		len &= GT_START_ARGV_CAP - 1;
		if (len && bpf_probe_read_user(e->argv, len, (void *)from) == 0)
			e->argv_len = len;
	}
	start_emit(args, e);
	return 0;
}
#endif
#endif /* CONTAINER_STARTS */
