"""Where the databases and the stores may live, checked at start-up so that a configuration known to be
unsafe stops the server with the reason instead of corrupting the registry later.

- An SQLite database needs a local filesystem: WAL shares its index through memory-mapped files, which
  do not work across machines, and relies on POSIX locks that network filesystems implement loosely or
  not at all. So SQLite files on NFS, SMB, CephFS or FUSE mounts are refused.
- The data folder (adapter store, fine-tuning jobs) is written stage -> rename -> commit. A network filesystem
  with POSIX renames (NFS, EFS, Filestore, SMB, CephFS...) serves, but only with PostgreSQL: a store
  shared across nodes means replicas across nodes, whose registry cannot be an SQLite file. FUSE mounts
  (S3 through Mountpoint or s3fs, GCS through gcsfuse) are refused: object stores cannot rename.
"""

from pathlib import Path

_NETWORK_TYPES = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "lustre",
                            "gpfs", "beegfs", "ocfs2", "gfs2"})
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


def is_fuse(fs_type: str) -> bool:
    return fs_type == "fuse" or fs_type.startswith("fuse.")


def is_network(fs_type: str) -> bool:
    return fs_type in _NETWORK_TYPES or is_fuse(fs_type)


def _type_of(path: Path) -> str | None:
    if not MOUNTINFO.is_file():  # not Linux: nothing to tell from
        return None
    existing = path.resolve()
    while not existing.exists():
        existing = existing.parent
    return filesystem_type(existing, MOUNTINFO.read_text())


def require_local(path: Path, option: str) -> None:
    """Stop the server when an SQLite database's folder `path` is on a network filesystem."""
    fs_type = _type_of(path)
    if fs_type is not None and is_network(fs_type):
        raise SystemExit(f"{option} {path} is on a {fs_type} filesystem: an SQLite database needs a local disk "
                         f"(network filesystems break SQLite's locking and WAL). Put it on a local volume, or "
                         f"use PostgreSQL (--database-url postgresql://...) for replicas on several nodes.")


def require_store(path: Path, option: str, *, shared_database: bool) -> None:
    """Stop the server when a store folder `path` is on a filesystem that cannot hold it safely."""
    fs_type = _type_of(path)
    if fs_type is None or not is_network(fs_type):
        return
    if is_fuse(fs_type):
        raise SystemExit(f"{option} {path} is on a {fs_type} (FUSE) filesystem: stores are written by atomic "
                         f"renames, which object-storage mounts (S3, GCS, Azure Blob) cannot do. Use a local "
                         f"volume or a network filesystem such as NFS, EFS or Filestore.")
    if not shared_database:
        raise SystemExit(f"{option} {path} is on a {fs_type} filesystem, shared across nodes, but the registry "
                         f"and job store are SQLite files (local only): give replicas on several nodes one "
                         f"PostgreSQL database with --database-url postgresql://...")
