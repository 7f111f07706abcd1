"""README.md's and docs/'s examples run as a user would paste them, with the markers deploy/README.md uses
(tests/test_deploy_docs.py): every fenced shell or Python block carries, on the line above it, `<!-- run -->`
(this test runs it) or `<!-- not run here: REASON -->` (it trains for minutes, needs a GPU, a cluster, or a
second server). A block without a marker, or a fence without a language, fails here.

Run blocks execute in order, page by page, against the session's server (tests/conftest.py `base_url`):
`localhost:8000` becomes its address, `/srv/adapters` its adapter root, curl fails on an HTTP error status, and
the working folder holds the repository's files plus `pirate-lora/`, a LoRA of the tests' own. The adapter a page
registers (`pirate`) is deleted afterwards, with any other adapter or alias it made; a page that only uses it gets
it registered first."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL, PYTHON = {"bash", "sh", "shell", "console"}, {"python", "py"}
RUN, NOT_RUN = "<!-- run -->", re.compile(r"<!-- not run here: .{10,} -->")
OPEN_FENCE, CLOSE_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)"), re.compile(r"^\s*```\s*$")
ADAPTER = "pirate"
LINKED = (".venv", "adapters", "benchmarks", "deploy", "docs", "server", "training", "pyproject.toml", "README.md")


def blocks(page: Path) -> list[tuple[int, str, str, str]]:
    """(line number, language, marker line, body) of every fenced block of `page`."""
    lines, found, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        opening = OPEN_FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, indent, body = i, len(opening["indent"]), []
        i += 1
        while i < len(lines) and not CLOSE_FENCE.match(lines[i]):
            body.append(lines[i][indent:])
            i += 1
        marker = lines[start - 1].strip() if start else ""
        found.append((start + 1, opening["lang"], marker, "\n".join(body) + "\n"))
        i += 1
    return found


def name(page: Path) -> str:
    return str(page.relative_to(REPO))


def runnable(page: Path) -> list[tuple[str, str]]:
    return [(lang, body) for _, lang, marker, body in blocks(page) if marker == RUN and lang in SHELL | PYTHON]


def test_every_example_says_whether_it_runs_here():
    checked = 0
    for page in PAGES:
        for line, lang, marker, _ in blocks(page):
            where = f"{name(page)}:{line}"
            assert lang, f"{where}: a fence without a language (say bash, python, json, text...)"
            if lang in SHELL | PYTHON:
                checked += 1
                assert marker == RUN or NOT_RUN.fullmatch(marker), \
                    f"{where}: a {lang} block without `{RUN}` or `<!-- not run here: REASON -->` above it"
    assert checked >= 10
    assert sum(len(runnable(page)) for page in PAGES) >= 8


@pytest.fixture(scope="module")
def pirate_lora(adapter_dirs, adapter_root) -> Path:
    """The LoRA the examples call `pirate-lora`, in the server's adapter root (registration by path)."""
    folder = adapter_root / "pirate-lora"
    if not folder.exists():
        shutil.copytree(adapter_dirs["lora"], folder)
    return folder


def _adapters(http: httpx.Client) -> set[str]:
    return {card["id"] for card in http.get("/v1/adapters").raise_for_status().json()["data"]}


def _aliases(http: httpx.Client) -> set[str]:
    return {card["id"] for card in http.get("/v1/aliases").raise_for_status().json()["data"]}


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=name)
def test_runnable_examples_run(page, base_url, adapter_root, pirate_lora, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for item in LINKED:
        (work / item).symlink_to(REPO / item)
    shutil.copytree(pirate_lora, work / "pirate-lora")
    address = urlsplit(base_url).netloc
    examples = runnable(page)
    with httpx.Client(base_url=base_url, timeout=120) as http:
        http.delete(f"/v1/adapters/{ADAPTER}")  # 404 when absent: each page starts without it
        before, aliases_before = _adapters(http), _aliases(http)
        registers = any(f'"name": "{ADAPTER}"' in body or f"name={ADAPTER}" in body for _, body in examples)
        if not registers and any(ADAPTER in body for _, body in examples):
            http.post("/v1/adapters", json={"name": ADAPTER, "path": str(pirate_lora)}).raise_for_status()
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        try:
            for lang, body in examples:
                script = body.replace("localhost:8000", address).replace("/srv/adapters", str(adapter_root))
                if lang in SHELL:
                    script = re.sub(r"\bcurl\b", "curl -sS --fail-with-body", script)
                    command = ["bash", "-c", f"set -euo pipefail\n{script}"]
                else:
                    command = [sys.executable, "-c", script]
                done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, f"{name(page)}:\n{script}\n--- stdout\n{done.stdout[-3000:]}\n" \
                                             f"--- stderr\n{done.stderr[-3000:]}"
        finally:
            for alias in _aliases(http) - aliases_before:  # first: an adapter an alias points at stays
                http.delete(f"/v1/aliases/{alias}")
            for adapter in _adapters(http) - before:  # deleting a merged LoRA unmerges it
                http.delete(f"/v1/adapters/{adapter}")
