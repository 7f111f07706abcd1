"""Safe extraction of uploaded adapter archives (.tar.gz / .zip) and confinement of server-side paths."""

import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from adapters.base import CONFIG_FILE, AdapterError


def _check_member(name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise AdapterError("file", f"archive member `{name}` points outside the archive")


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack into `dest` (regular files and folders only) and return the folder holding adapter_config.json."""
    total = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member(info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise AdapterError("file", f"archive member `{info.filename}` is a link")
                total += info.file_size
            if total > max_bytes:
                raise AdapterError("file", f"unpacks to {total} bytes, over the limit of {max_bytes}")
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for member in members:
                _check_member(member.name)
                if not (member.isfile() or member.isdir()):
                    raise AdapterError("file", f"archive member `{member.name}` is a link or device")
                total += member.size
            if total > max_bytes:
                raise AdapterError("file", f"unpacks to {total} bytes, over the limit of {max_bytes}")
            tf.extractall(dest, members=members, filter="data")
    else:
        raise AdapterError("file", "not a .tar.gz or .zip archive")
    configs = sorted(dest.rglob(CONFIG_FILE), key=lambda p: len(p.parts))
    if not configs:
        raise AdapterError("file", f"the archive holds no {CONFIG_FILE}")
    return configs[0].parent


def confine(path: str, roots: list[Path], *, field: str = "path", is_dir: bool = True) -> Path:
    """The resolved folder (or file), if it lies inside one of the allowed roots (links resolved first)."""
    if not roots:
        raise AdapterError(field, "server paths are disabled; start the server with --adapter-roots to allow "
                                  "them, or upload instead")
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        raise AdapterError(field, f"`{path}` is outside the allowed roots")
    if not (resolved.is_dir() if is_dir else resolved.is_file()):
        raise AdapterError(field, f"`{path}` is not a {'folder' if is_dir else 'file'}")
    return resolved
