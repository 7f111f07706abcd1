"""What ships for deployment tells the truth: SQLite on a network filesystem and stores on object-storage
mounts are refused (SQLite's locking and WAL do not hold there, S3 mounts cannot rename), and the command
line explains itself. The Kubernetes manifests (no API key or database password in them, the PostgreSQL
overlay) are rendered and checked in test_kubernetes.py; the images and compose in test_images.py."""

import subprocess
import sys
from pathlib import Path

import pytest

from server.storage import filesystem_type, is_network, require_local, require_store

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 259:1 / / rw,relatime - ext4 /dev/nvme0n1p1 rw
40 27 0:50 / /data rw,relatime - nfs4 server:/export rw,vers=4.1
41 40 259:2 / /data/local rw,relatime - xfs /dev/nvme1n1 rw
42 27 0:51 / /mnt/my\\040bucket rw - fuse.mountpoint-s3 mountpoint-s3 rw
"""


@pytest.mark.parametrize("path, expected", [
    ("/srv/adapters", "ext4"), ("/data", "nfs4"), ("/data/adapters", "nfs4"), ("/data/local/x", "xfs"),
    ("/datax", "ext4"), ("/mnt/my bucket/store", "fuse.mountpoint-s3"),
])
def test_filesystem_type_of_the_deepest_mount(path, expected):
    assert filesystem_type(Path(path), MOUNTINFO) == expected


def test_storage_rules(tmp_path, monkeypatch):
    assert is_network("nfs4") and is_network("fuse.mountpoint-s3") and is_network("fuse") and is_network("cifs")
    assert not is_network("ext4") and not is_network("overlay") and not is_network("tmpfs")
    fake = tmp_path / "mountinfo"
    fake.write_text(f"27 1 259:1 / / rw - ext4 /dev/sda rw\n50 27 0:50 / {tmp_path}/nfs rw - nfs4 srv:/x rw\n"
                    f"51 27 0:51 / {tmp_path}/s3 rw - fuse mountpoint-s3 rw\n")
    monkeypatch.setattr("server.storage.MOUNTINFO", fake)
    for mount_point in ("nfs", "s3"):
        (tmp_path / mount_point).mkdir()
    with pytest.raises(SystemExit, match="--database-url .* nfs4 filesystem: an SQLite database needs a local"):
        require_local(tmp_path / "nfs" / "not-yet-created", "--database-url")
    require_local(Path("/usr"), "--database-url")  # local: accepted
    # A store on NFS is shared across nodes: only with PostgreSQL; an object-storage mount never.
    with pytest.raises(SystemExit, match="--adapter-store .* nfs4 filesystem.*PostgreSQL"):
        require_store(tmp_path / "nfs" / "store", "--adapter-store", shared_database=False)
    require_store(tmp_path / "nfs" / "store", "--adapter-store", shared_database=True)
    with pytest.raises(SystemExit, match=r"--fine-tuning-dir .* \(FUSE\) filesystem.*cannot do"):
        require_store(tmp_path / "s3" / "ft", "--fine-tuning-dir", shared_database=True)


def test_every_subcommand_says_what_it_does_in_help():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("serve", "prepare-model", "train", "merge"):
        line = next(line for line in out.splitlines() if line.strip().startswith(command + " "))
        assert len(line.split()) > 3, line  # the name, then its description
