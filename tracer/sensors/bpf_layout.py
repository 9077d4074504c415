"""The `-D` flags that configure bpf/gputrace.bpf.c for the running kernel.

Offsets come from BTF (tracer.sensors.btf); syscall numbers and the pt_regs
argument registers depend on the architecture.
"""

from __future__ import annotations

from tracer.errors import EnvironmentProblem
from tracer.sensors.btf import KernelBtf
from tracer.sensors.syscall_table import Arch, arch_for

__all__ = ["Arch", "current_arch", "offset_flags"]

# macro -> BTF member path.  Every kernel struct the program touches is here.
OFFSETS: dict[str, str] = {
    "OFF_TASK_REAL_PARENT": "task_struct.real_parent",
    "OFF_TASK_TGID": "task_struct.tgid",
    "OFF_TASK_CRED": "task_struct.cred",
    "OFF_TASK_GROUP_LEADER": "task_struct.group_leader",
    "OFF_TASK_NSPROXY": "task_struct.nsproxy",
    "OFF_TASK_THREAD_PID": "task_struct.thread_pid",
    "OFF_TASK_FS": "task_struct.fs",
    "OFF_TASK_FILES": "task_struct.files",
    "OFF_CRED_UID": "cred.uid",
    "OFF_CRED_GID": "cred.gid",
    "OFF_CRED_EUID": "cred.euid",
    "OFF_CRED_EGID": "cred.egid",
    "OFF_CRED_FSUID": "cred.fsuid",
    "OFF_CRED_FSGID": "cred.fsgid",
    "OFF_CRED_CAP_EFF": "cred.cap_effective",
    "OFF_CRED_USER_NS": "cred.user_ns",
    "OFF_CRED_GROUP_INFO": "cred.group_info",
    "OFF_GI_NGROUPS": "group_info.ngroups",
    "OFF_GI_GID": "group_info.gid",
    "OFF_USERNS_INUM": "user_namespace.ns.inum",
    "OFF_USERNS_LEVEL": "user_namespace.level",
    "OFF_USERNS_OWNER": "user_namespace.owner",
    "OFF_NSPROXY_MNT": "nsproxy.mnt_ns",
    "OFF_NSPROXY_CGROUP": "nsproxy.cgroup_ns",
    "OFF_MNTNS_INUM": "mnt_namespace.ns.inum",
    "OFF_CGROUPNS_INUM": "cgroup_namespace.ns.inum",
    "OFF_PIDNS_INUM": "pid_namespace.ns.inum",
    "OFF_PID_LEVEL": "pid.level",
    "OFF_PID_NUMBERS": "pid.numbers",
    "OFF_UPID_NR": "upid.nr",
    "OFF_UPID_NS": "upid.ns",
    "OFF_FS_ROOT": "fs_struct.root",
    "OFF_FS_PWD": "fs_struct.pwd",
    "OFF_PATH_MNT": "path.mnt",
    "OFF_PATH_DENTRY": "path.dentry",
    "OFF_FILES_FDT": "files_struct.fdt",
    "OFF_FDT_MAX_FDS": "fdtable.max_fds",
    "OFF_FDT_FD": "fdtable.fd",
    "OFF_FILE_PATH": "file.f_path",
    "OFF_FILE_INODE": "file.f_inode",
    "OFF_INODE_MODE": "inode.i_mode",
    "OFF_INODE_RDEV": "inode.i_rdev",
    "OFF_DENTRY_PARENT": "dentry.d_parent",
    "OFF_DENTRY_NAME": "dentry.d_name.name",
    "OFF_VFSMOUNT_ROOT": "vfsmount.mnt_root",
    "OFF_MOUNT_MNT": "mount.mnt",
    "OFF_MOUNT_PARENT": "mount.mnt_parent",
    "OFF_MOUNT_MOUNTPOINT": "mount.mnt_mountpoint",
}

# Present only with CONFIG_AUDIT / CONFIG_SECCOMP (filter_count since 5.9); the
# program reads them when they exist.
OPTIONAL_OFFSETS: dict[str, str] = {
    "OFF_TASK_LOGINUID": "task_struct.loginuid",
    "OFF_TASK_SESSIONID": "task_struct.sessionid",
    "OFF_TASK_SECCOMP_MODE": "task_struct.seccomp.mode",
    "OFF_TASK_SECCOMP_FILTER_COUNT": "task_struct.seccomp.filter_count",
    "OFF_TASK_ATOMIC_FLAGS": "task_struct.atomic_flags",  # PFA_NO_NEW_PRIVS, bit 0 (3.19+)
}


# The refused task's own cgroup, to name it (HAVE_CGROUP_NAMES): macro -> member paths,
# the first one this kernel has wins (kernfs_node.parent became __parent in 6.15).
CGROUP_NAME_OFFSETS: dict[str, tuple[str, ...]] = {
    "OFF_TASK_CGROUPS": ("task_struct.cgroups",),
    "OFF_CSS_SET_DFL_CGRP": ("css_set.dfl_cgrp",),
    "OFF_CSS_SET_SUBSYS": ("css_set.subsys",),
    "OFF_CSS_CGROUP": ("cgroup_subsys_state.cgroup",),
    "OFF_CGROUP_KN": ("cgroup.kn",),
    "OFF_KERNFS_NAME": ("kernfs_node.name",),
    "OFF_KERNFS_PARENT": ("kernfs_node.__parent", "kernfs_node.parent"),
}


# The container-start signal's runtime command line (CONTAINER_STARTS).
START_OFFSETS: dict[str, str] = {
    "OFF_TASK_MM": "task_struct.mm",
    "OFF_MM_ARG_START": "mm_struct.arg_start",
    "OFF_MM_ARG_END": "mm_struct.arg_end",
}


def start_flags(btf: KernelBtf) -> dict[str, int]:
    """Offsets for the container-start signal; empty when this kernel lacks one."""
    if not all(btf.has_member(p) for p in START_OFFSETS.values()):
        return {}
    return {macro: btf.member(p).offset for macro, p in START_OFFSETS.items()}


def _first_member(btf: KernelBtf, paths: tuple[str, ...]) -> int | None:
    return next((btf.member(p).offset for p in paths if btf.has_member(p)), None)


def cgroup_name_flags(btf: KernelBtf) -> dict[str, int]:
    """Offsets to name the task's cgroup, and the v1 devices controller's index in
    css_set.subsys (`enum cgroup_subsys_id`); empty when this kernel lacks one."""
    found = {macro: _first_member(btf, paths) for macro, paths in CGROUP_NAME_OFFSETS.items()}
    if any(v is None for v in found.values()):
        return {}
    flags = {k: v for k, v in found.items() if v is not None}
    flags["HAVE_CGROUP_NAMES"] = 1
    devices = btf.enum_value("cgroup_subsys_id", "devices_cgrp_id")
    if devices is not None:
        flags["DEVICES_CGRP_ID"] = devices
    return flags


# The refused task's effective cgroup v2 device programs, read at the denial
# (task->cgroups->dfl_cgrp->bpf.effective[CGROUP_DEVICE]): the unit cannot ask bpf()
# for them (systemd/gputrace.service), the probe can read them with CAP_PERFMON.
DEV_PROG_OFFSETS: dict[str, str] = {
    "OFF_CGROUP_BPF_EFFECTIVE": "cgroup.bpf.effective",
    "OFF_PROG_ARRAY_ITEMS": "bpf_prog_array.items",
    "OFF_PROG_ARRAY_ITEM_PROG": "bpf_prog_array_item.prog",
    "OFF_PROG_TYPE": "bpf_prog.type",
    "OFF_PROG_LEN": "bpf_prog.len",
    "OFF_PROG_TAG": "bpf_prog.tag",
    "OFF_PROG_AUX": "bpf_prog.aux",
    "OFF_PROG_INSNSI": "bpf_prog.insnsi",
    "OFF_PROG_AUX_ID": "bpf_prog_aux.id",
    "OFF_PROG_AUX_NAME": "bpf_prog_aux.name",
}


def dev_prog_flags(btf: KernelBtf, names: dict[str, int]) -> dict[str, int]:
    """HAVE_DEV_PROGS and its offsets (with the cgroup offsets of `names`, the
    cgroup_name_flags), when this kernel's BTF has every member; else {}.  With the
    v1 devices controller, HAVE_V1_DEVICES too: the id of the task's devices cgroup."""
    slot = btf.enum_value("cgroup_bpf_attach_type", "CGROUP_DEVICE")
    if "HAVE_CGROUP_NAMES" not in names or slot is None:
        return {}
    flags: dict[str, int] = {}
    try:
        flags.update({macro: btf.member(dotted).offset for macro, dotted in DEV_PROG_OFFSETS.items()})
        flags["SIZEOF_PROG_ARRAY_ITEM"] = btf.size_of("bpf_prog_array_item")
    except KeyError:
        return {}
    flags.update(CGROUP_DEVICE_SLOT=slot, HAVE_DEV_PROGS=1)
    if "DEVICES_CGRP_ID" in names and btf.has_member("kernfs_node.id"):
        flags.update(OFF_KERNFS_NODE_ID=btf.member("kernfs_node.id").offset, HAVE_V1_DEVICES=1)
    return flags


def current_arch(machine: str | None = None) -> Arch:
    return arch_for(machine, "bpf")


def offset_flags(btf: KernelBtf, arch: Arch) -> dict[str, int]:
    """All offset macros for this kernel; raises with the member it could not find."""
    flags: dict[str, int] = {}
    try:
        for macro, dotted in OFFSETS.items():
            flags[macro] = btf.member(dotted).offset
        for role, (dotted, extra) in arch.regs.items():
            flags[f"OFF_REGS_{role}"] = btf.member(dotted).offset + extra
        flags["SIZEOF_UPID"] = btf.size_of("upid")
    except KeyError as exc:
        raise EnvironmentProblem(f"kernel BTF lacks a struct member gputrace needs: {exc.args[0]}") from exc
    for macro, dotted in OPTIONAL_OFFSETS.items():
        if btf.has_member(dotted):
            flags[macro] = btf.member(dotted).offset
    if "OFF_TASK_LOGINUID" in flags and "OFF_TASK_SESSIONID" in flags:
        flags["HAVE_AUDIT_IDS"] = 1
    if "OFF_TASK_SECCOMP_MODE" in flags and "OFF_TASK_SECCOMP_FILTER_COUNT" in flags:
        flags["HAVE_SECCOMP"] = 1
    names = cgroup_name_flags(btf)
    flags.update(names)
    flags.update(dev_prog_flags(btf, names))
    return flags
