"""Adapter files from outside, taken in safely: uploaded archives (.tar.gz / .zip) and server folders.

Nothing is trusted before it is checked: archive members and folder entries must be regular files or
folders (no links, devices or FIFOs), member paths stay inside the archive, and bytes are counted as
they are written, so an archive that lies about its sizes, or a file that never ends, stops at the limit.
Corrupt archives (bad CRC, truncated streams) are the client's 400, never a 500.
"""

import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from adapters.base import CONFIG_FILE, AdapterError

_CHUNK = 1 << 20


class _Budget:
    """Bytes still allowed for one upload or copy, across all its files."""

    def __init__(self, field: str, max_bytes: int):
        self.field, self.max_bytes, self.left = field, max_bytes, max_bytes

    def copy(self, source: BinaryIO, target: Path) -> None:
        with target.open("xb") as out:
            while chunk := source.read(min(_CHUNK, self.left + 1)):
                self.left -= len(chunk)
                if self.left < 0:
                    raise AdapterError(self.field, f"holds more than the limit of {self.max_bytes} bytes")
                out.write(chunk)


def _member_path(dest: Path, name: str) -> Path:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\0" in name:
        raise AdapterError("file", f"archive member `{name[:200]}` points outside the archive")
    return dest.joinpath(*path.parts)


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = _member_path(dest, info.filename)
            mode = info.external_attr >> 16
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif mode and not stat.S_ISREG(mode):
                raise AdapterError("file", f"archive member `{info.filename}` is a link or device")
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as member:  # checks the CRC as it reads
                    budget.copy(member, target)


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive) as tf:
        for member in tf:  # streamed: a truncated archive fails here, after what was read so far
            target = _member_path(dest, member.name)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif not member.isfile():
                raise AdapterError("file", f"archive member `{member.name}` is a link or device")
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                budget.copy(tf.extractfile(member), target)


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack into `dest` and return the one adapter folder in it (the one holding adapter_config.json)."""
    budget = _Budget("file", max_bytes)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, budget)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, budget)
        else:
            raise AdapterError("file", "not a .tar.gz or .zip archive")
    except AdapterError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, OSError,
            ValueError, NotImplementedError) as exc:  # corrupt, truncated, or an unsupported compression
        raise AdapterError("file", f"the archive is corrupt or unsupported ({type(exc).__name__}: "
                                   f"{str(exc)[:200]})") from exc
    return adapter_folder(dest, "file")


def adapter_folder(root: Path, field: str) -> Path:
    """The shallowest folder holding adapter_config.json; two at that depth are ambiguous and refused.
    (Deeper ones are allowed: a trainer's output holds its checkpoints, each an adapter of its own.)"""
    configs = sorted(root.rglob(CONFIG_FILE), key=lambda p: len(p.parts))
    if not configs:
        raise AdapterError(field, f"holds no {CONFIG_FILE}")
    shallowest = [p for p in configs if len(p.parts) == len(configs[0].parts)]
    if len(shallowest) > 1:
        folders = ", ".join(f"`{p.parent.relative_to(root)}`" for p in shallowest[:4])
        raise AdapterError(field, f"holds {len(shallowest)} adapters ({folders}); send one adapter at a time")
    return configs[0].parent


def copy_folder(source: Path, dest: Path, max_bytes: int, *, field: str = "path") -> Path:
    """Copy the regular files at the top of a server folder (an adapter is flat: subfolders, such as a
    trainer's checkpoints/, are left out) into `dest`, refusing links, devices and FIFOs (checked on the
    open file, so a swap after the check is caught) and stopping at `max_bytes`."""
    budget = _Budget(field, max_bytes)
    dest.mkdir()
    with os.scandir(source) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                continue
            if not entry.is_file(follow_symlinks=False):
                raise AdapterError(field, f"`{entry.path}` is a link, device or other special file; adapter "
                                          f"folders may hold regular files only")
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as exc:
                raise AdapterError(field, f"`{entry.path}` cannot be read ({exc.strerror})") from exc
            with os.fdopen(fd, "rb") as file:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise AdapterError(field, f"`{entry.path}` is not a regular file")
                budget.copy(file, dest / entry.name)
    return dest


def confine(path: str, roots: list[Path], *, field: str = "path", is_dir: bool = True) -> Path:
    """The resolved folder (or file), if it lies inside one of the allowed roots (links resolved first)."""
    if not roots:
        raise AdapterError(field, "server paths are disabled; start the server with --adapter-roots to allow "
                                  "them, or upload instead")
    try:
        resolved = Path(path).resolve()
        is_kind = resolved.is_dir() if is_dir else resolved.is_file()
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long, a loop of links
        raise AdapterError(field, f"not a usable path ({exc})") from exc
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        raise AdapterError(field, f"`{path}` is outside the allowed roots")
    if not is_kind:
        raise AdapterError(field, f"`{path}` is not a {'folder' if is_dir else 'file'}")
    return resolved
