"""Where the registry and job databases may live: a local filesystem.

SQLite in WAL mode shares its index through memory-mapped files, which do not work across machines,
and relies on POSIX locks that network filesystems implement loosely or not at all; S3 mounts
cannot rename, which registrations rely on to be atomic. So NFS, SMB, CephFS and FUSE mounts are
refused at start-up, with the reason, rather than corrupting the registry later. Replicas on one node
may share a local volume; replicas on several nodes need a database server (not yet supported).
"""

from pathlib import Path

_NETWORK_TYPES = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "lustre",
                            "gpfs", "beegfs", "ocfs2", "gfs2", "fuse"})
MOUNTINFO = Path("/proc/self/mountinfo")


def filesystem_type(path: Path, mountinfo: str) -> str | None:
    """The type of the filesystem `path` lies on, from /proc/self/mountinfo's text (None if not found)."""
    best, best_type = "", None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        mount_point = fields[4].replace("\\040", " ")
        fs_type = fields[fields.index("-") + 1]
        inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fs_type
    return best_type


def is_network(fs_type: str) -> bool:
    return fs_type in _NETWORK_TYPES or fs_type.startswith("fuse.")


def require_local(path: Path, option: str) -> None:
    """Stop the server when `path` (an --adapter-store or --fine-tuning-dir) is on a network filesystem."""
    if not MOUNTINFO.is_file():  # not Linux: nothing to tell from
        return
    existing = path.resolve()
    while not existing.exists():
        existing = existing.parent
    fs_type = filesystem_type(existing, MOUNTINFO.read_text())
    if fs_type is not None and is_network(fs_type):
        raise SystemExit(f"{option} {path} is on a {fs_type} filesystem: the SQLite registry and job store need "
                         f"a local disk (network filesystems break SQLite's locking and WAL, S3 mounts cannot "
                         f"rename). Use a local volume; replicas on one node may share it.")
