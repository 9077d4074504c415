"""The one table of constants shared by bpf/gputrace.bpf.c and its Python readers.

The C program defines none of these itself: every value arrives as a `-D`
flag built here (`cflags()`), so the stat order, buffer sizes and flag bits
cannot drift apart.  Every macro carries the `GT_` prefix so that none can
collide with a kernel macro (the kernel's own `NR_OPEN` once shadowed ours).
"""

from __future__ import annotations

# Order of the per-CPU `stats` array; the C enum is generated from it.
STAT_NAMES = (
    "denials",                 # matched denials, every attempt
    "emitted",                 # full events handed to the buffer
    "updates",                 # count updates handed to the buffer
    "dropped_buffer_full",     # full event the buffer refused (resent later)
    "dropped_update",          # count update the buffer refused (count kept in map)
    "aggregation_table_full",  # aggregation table full: event sent unaggregated
    "aggregated",              # repeats folded into an aggregate
    "path_unreadable",         # user path unreadable
    "dir_unresolved",          # relative path whose directory could not be named
    "candidates",              # refused opens outside the GPU prefixes (every attempt)
    "candidates_known",        # ...whose path userspace already found not to be a GPU node
    "candidates_rate_limited",  # ...new ones refused by the candidate rate bound
    "container_starts",        # container-start signals handed to the buffer
    "container_starts_dropped",  # ...refused by the buffer (the tracker's inotify remains)
    "dev_progs_sent",          # device programs' instructions handed to the buffer
    "dev_progs_dropped",       # ...refused by the buffer (sent again with the next denial)
    "dev_progs_unreadable",    # ...whose instructions could not be read
    "dev_progs_tail_failed",   # denials sent without their device programs (no tail call)
)

PATH_CAP = 256          # bytes of a path in an event (normalised, and as given)
NORM_IN_CAP = 512       # bytes of the absolute path the kernel normalises
MAX_GROUPS = 1024       # supplementary groups copied per event (the event's variable tail);
                        # beyond it the kernel's sorted order decides (tracer/verdict/groups.py)
MAX_PREFIXES = 32       # GPU path prefixes (LPM trie entries)
PREFIX_CAP = 32         # bytes of one prefix
NORM_DEPTH = 32         # path segments `..` can climb back over
RINGBUF_PAGES = 1024    # default ring buffer: 4 MiB, a burst of ~4,000 distinct denials (~1,000 B each)
GPU_DEVS_MAX = 256      # device numbers / majors in the `gpu_devs` map
NOT_GPU_MAX = 8192      # (mount ns, path hash) pairs known not to be GPU nodes
NOT_GPU_TTL_S = 10      # ...for this long: a path may become a GPU node (symlink, mount) later
CANDIDATE_RATE = 2000   # new candidates per second per CPU the kernel may send
CANDIDATE_BURST = 4000  # ...and its token bucket depth
CGROUP_NAME_CAP = 128   # bytes of one cgroup directory name (cri-containerd-<64 hex>.scope: 85)
START_PATH_CAP = 256    # bytes of a new cgroup's path in a container-start signal
START_ARGV_CAP = 512    # bytes of the runtime's command line in it (docker's runc create: ~450)
MAX_DEV_PROGS = 8       # effective BPF_CGROUP_DEVICE programs named per event
MAX_PROG_INSNS = 4000   # instructions of one device program copied (a per-CPU value: < 32 KiB)
DEV_PROGS_SENT_MAX = 1024  # program ids whose instructions the kernel already sent

EV_DENIAL, EV_UPDATE, EV_DEV_PROG = 1, 2, 3
EV_START = 4             # a container-start signal (bpf/container_start.bpf.c)
START_EXEC, START_MKDIR = 1, 2  # ...its kind: a pid namespace's init exec'd; a cgroup made

# Event flag bits (gpu_event.path_flags).
F_RELATIVE = 1       # the path was relative to cwd or dirfd
F_TRUNCATED = 2      # longer than PATH_CAP (or NORM_IN_CAP before normalising)
F_DIR_UNRESOLVED = 4  # the directory of a relative path could not be named
F_DEV_VALID = 8      # `dev` holds the node's device number
F_UNAGGREGATED = 16  # the aggregation table was full: this event counts 1
F_REEMITTED = 32     # a resend of a first event the buffer had refused
F_CANDIDATE = 64     # path outside the GPU prefixes: userspace decides by device
F_SECCOMP_KNOWN = 128  # seccomp_mode/seccomp_filters hold the task's seccomp state
F_NNP_KNOWN = 256    # the task's no_new_privs was read (F_NO_NEW_PRIVS says which)
F_NO_NEW_PRIVS = 512  # task->atomic_flags has PFA_NO_NEW_PRIVS: setuid binaries gain nothing
F_CGROUP_NAMED = 2048  # cgroup_leaf/cgroup_parent hold the names of the task's own cgroup
F_CGROUP_V1 = 4096     # ...of its v1 devices cgroup (its v2 cgroup was the root)
F_START_PATH_CUT = 8192    # start signal: the cgroup's path was longer than START_PATH_CAP
F_START_ARGV_CUT = 16384   # start signal: the command line was longer than START_ARGV_CAP
F_DEV_PROGS_KNOWN = 1024  # dev_prog_count/dev_prog_ids hold the task's effective device programs

# Aggregation key target bits: bit 63 = ioctl (target holds the dev),
# bit 62 = candidate (target holds the path hash).
TARGET_IOCTL = 1 << 63
TARGET_CANDIDATE = 1 << 62
HASH_MASK = TARGET_CANDIDATE - 1

SYSCALL_IDS = {"open": 1, "creat": 2, "openat": 3, "openat2": 4, "ioctl": 5}
SYSCALL_NAMES = {v: k for k, v in SYSCALL_IDS.items()}


def cflags() -> dict[str, object]:
    """Every constant above as the `-D` flags the C program requires."""
    flags: dict[str, object] = {f"GT_ST_{name.upper()}": i for i, name in enumerate(STAT_NAMES)}
    flags["GT_ST_COUNT"] = len(STAT_NAMES)
    flags.update(GT_PATH_CAP=PATH_CAP, GT_NORM_IN_CAP=NORM_IN_CAP, GT_MAX_GROUPS=MAX_GROUPS,
                 GT_MAX_PREFIXES=MAX_PREFIXES, GT_PREFIX_CAP=PREFIX_CAP, GT_NORM_DEPTH=NORM_DEPTH,
                 GT_GPU_DEVS_MAX=GPU_DEVS_MAX, GT_NOT_GPU_MAX=NOT_GPU_MAX,
                 GT_CANDIDATE_RATE=CANDIDATE_RATE, GT_CANDIDATE_BURST=CANDIDATE_BURST,
                 GT_EV_DENIAL=EV_DENIAL, GT_EV_UPDATE=EV_UPDATE, GT_EV_DEV_PROG=EV_DEV_PROG,
                 GT_MAX_DEV_PROGS=MAX_DEV_PROGS, GT_MAX_PROG_INSNS=MAX_PROG_INSNS,
                 GT_DEV_PROGS_SENT_MAX=DEV_PROGS_SENT_MAX, GT_F_DEV_PROGS_KNOWN=F_DEV_PROGS_KNOWN,
                 GT_F_RELATIVE=F_RELATIVE, GT_F_TRUNCATED=F_TRUNCATED,
                 GT_F_DIR_UNRESOLVED=F_DIR_UNRESOLVED, GT_F_DEV_VALID=F_DEV_VALID,
                 GT_F_UNAGGREGATED=F_UNAGGREGATED, GT_F_REEMITTED=F_REEMITTED,
                 GT_F_CANDIDATE=F_CANDIDATE, GT_F_SECCOMP_KNOWN=F_SECCOMP_KNOWN,
                 GT_F_NNP_KNOWN=F_NNP_KNOWN, GT_F_NO_NEW_PRIVS=F_NO_NEW_PRIVS,
                 GT_F_CGROUP_NAMED=F_CGROUP_NAMED, GT_F_CGROUP_V1=F_CGROUP_V1,
                 GT_CGROUP_NAME_CAP=CGROUP_NAME_CAP,
                 GT_EV_START=EV_START, GT_START_EXEC=START_EXEC, GT_START_MKDIR=START_MKDIR,
                 GT_START_PATH_CAP=START_PATH_CAP, GT_START_ARGV_CAP=START_ARGV_CAP,
                 GT_F_START_PATH_CUT=F_START_PATH_CUT, GT_F_START_ARGV_CUT=F_START_ARGV_CUT,
                 GT_TARGET_IOCTL=f"{TARGET_IOCTL}ULL", GT_TARGET_CANDIDATE=f"{TARGET_CANDIDATE}ULL",
                 GT_HASH_MASK=f"{HASH_MASK}ULL")
    for name, number in SYSCALL_IDS.items():
        flags[f"GT_SYS_{name.upper()}"] = number
    return flags


# --- bpf/access_changes.bpf.c: access that changes while a workload runs ---------
# (not the denial path; its own program, its own buffer, the same table)
CHG_STAT_NAMES = (
    "program_calls",   # bpf() attach/detach calls for BPF_CGROUP_DEVICE seen at entry
    "group_calls",     # setgroups/setgid/setregid/setresgid calls seen at entry
    "emitted",         # change records handed to the buffer
    "dropped",         # change records the buffer refused
    "pending_full",    # a call in flight could not be remembered until its exit
    "progs_sent",      # device programs' instructions handed to the buffer (once per id)
    "progs_dropped",   # ...refused by the buffer (sent again with the next call naming it)
    "progs_unreadable",  # ...whose instructions could not be read
)
CHG_KIND_DEVICE_PROGRAM, CHG_KIND_GROUPS = 1, 2
CHG_KIND_PROGRAM = 3       # a device program's instructions (struct dev_prog_record)
CHG_F_PROGS_BEFORE, CHG_F_PROGS_AFTER = 1, 2  # the target's effective programs were read
CHG_CALLS = {"setgroups": 1, "setgid": 2, "setregid": 3, "setresgid": 4}
CHG_CALL_NAMES = {v: k for k, v in CHG_CALLS.items()}
CHG_MAX_GROUPS = 32        # groups copied before and after a set*gid call
CHG_RINGBUF_PAGES = 64     # 256 KiB: a call's records and its programs' instructions
                           # (a few hundred instructions each, at most 32 KiB); changes are rare
CHG_PENDING_MAX = 1024     # calls in flight (one per thread)
# uapi/linux/bpf.h: commands, attach type, program type and flag the filter needs
BPF_PROG_ATTACH, BPF_PROG_DETACH, BPF_LINK_CREATE = 8, 9, 28
BPF_CMD_NAMES = {BPF_PROG_ATTACH: "BPF_PROG_ATTACH", BPF_PROG_DETACH: "BPF_PROG_DETACH",
                 BPF_LINK_CREATE: "BPF_LINK_CREATE"}
BPF_CGROUP_DEVICE_ATTACH = 6
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_F_ALLOW_OVERRIDE, BPF_F_ALLOW_MULTI, BPF_F_REPLACE = 1, 2, 4


def change_cflags() -> dict[str, object]:
    """The `-D` flags bpf/access_changes.bpf.c requires (its probes are chosen apart)."""
    flags: dict[str, object] = {f"GT_CHG_ST_{name.upper()}": i
                                for i, name in enumerate(CHG_STAT_NAMES)}
    flags["GT_CHG_ST_COUNT"] = len(CHG_STAT_NAMES)
    flags.update(GT_CHG_KIND_DEVICE_PROGRAM=CHG_KIND_DEVICE_PROGRAM,
                 GT_CHG_KIND_GROUPS=CHG_KIND_GROUPS, GT_CHG_MAX_GROUPS=CHG_MAX_GROUPS,
                 GT_CHG_RINGBUF_PAGES=CHG_RINGBUF_PAGES, GT_CHG_PENDING_MAX=CHG_PENDING_MAX,
                 GT_CHG_BPF_PROG_ATTACH=BPF_PROG_ATTACH, GT_CHG_BPF_PROG_DETACH=BPF_PROG_DETACH,
                 GT_CHG_BPF_LINK_CREATE=BPF_LINK_CREATE,
                 GT_CHG_BPF_CGROUP_DEVICE=BPF_CGROUP_DEVICE_ATTACH,
                 GT_CHG_BPF_F_REPLACE=BPF_F_REPLACE,
                 GT_CHG_KIND_PROGRAM=CHG_KIND_PROGRAM, GT_CHG_F_PROGS_BEFORE=CHG_F_PROGS_BEFORE,
                 GT_CHG_F_PROGS_AFTER=CHG_F_PROGS_AFTER, GT_MAX_DEV_PROGS=MAX_DEV_PROGS,
                 GT_MAX_PROG_INSNS=MAX_PROG_INSNS, GT_DEV_PROGS_SENT_MAX=DEV_PROGS_SENT_MAX)
    for name, number in CHG_CALLS.items():
        flags[f"GT_CHG_CALL_{name.upper()}"] = number
    return flags
