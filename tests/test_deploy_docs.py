"""deploy/README.md's commands run as a user would paste them. Every fenced shell block there carries a
marker on the line above it: `<!-- run -->` (this test runs it), or `<!-- not run here: REASON -->` (it
needs what this machine lacks: a Docker daemon, a cluster, a GPU). A block without a marker fails here.

Run blocks execute in order, in one bash per section, in a copy of deploy/ (so the keys and database files
they write never land in the checkout; setup.sh alone runs as the checkout's), with the repository's venv
first on PATH; a server a block starts
listens on a free port instead of 8000 (`localhost:8000` and `swapyard serve` are rewritten to it) and on a
data folder of its own, and is stopped when the section ends."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "deploy" / "README.md"
BLOCK = re.compile(r"^(?P<marker>[^\n]*)\n```(?:bash|sh)\n(?P<body>.*?)^```", re.MULTILINE | re.DOTALL)
STOP_SERVERS = "trap 'status=$?; kill $(jobs -p) 2>/dev/null || true; exit $status' EXIT"  # and keep the exit status
RUN, NOT_RUN = "<!-- run -->", re.compile(r"<!-- not run here: .{10,} -->")


def _sections() -> dict[str, list[tuple[str, str]]]:
    """`## ` section title -> its shell blocks as (marker line, body), in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    for part in re.split(r"^## ", DOC.read_text(), flags=re.MULTILINE)[1:]:
        title = part.splitlines()[0]
        sections[title] = [(m["marker"].strip(), m["body"]) for m in BLOCK.finditer(part)]
    return sections


def test_every_shell_block_says_whether_it_runs_here():
    blocks = [(title, marker) for title, found in _sections().items() for marker, _ in found]
    assert len(blocks) >= 6
    for title, marker in blocks:
        assert marker == RUN or NOT_RUN.fullmatch(marker), f"{title}: a block without a marker ({marker!r})"


@pytest.mark.parametrize("title", [title for title, blocks in _sections().items()
                                   if any(marker == RUN for marker, _ in blocks)])
def test_runnable_blocks_run(title, tmp_path):
    port = free_port()
    script = "\n".join(body for marker, body in _sections()[title] if marker == RUN)
    # setup.sh is the checkout's own: run from the copy, an install it found stale would point the venv there.
    script = script.replace("localhost:8000", f"127.0.0.1:{port}").replace(
        "swapyard serve", f"swapyard serve --port {port}").replace("~/swapyard-data", str(tmp_path / "data")).replace(
        "./deploy/setup.sh", str(REPO / "deploy" / "setup.sh"))
    work = tmp_path / "checkout"
    shutil.copytree(REPO / "deploy", work / "deploy", ignore=shutil.ignore_patterns("keys.txt", "database.env"))
    (work / ".venv").symlink_to(REPO / ".venv")
    for name in ("pyproject.toml", "README.md", "server", "adapters", "training"):
        (work / name).symlink_to(REPO / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", f"set -euo pipefail\n{STOP_SERVERS}\n{script}"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{title}:\n{script}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n" \
                                 f"{done.stderr[-3000:]}"
