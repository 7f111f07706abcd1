"""The documentation site: the reference pages under docs/reference/ are what docs/gen_reference.py writes from
the code today, and `mkdocs build --strict` passes (a broken link, an anchor that does not exist, a page missing
from the nav or an include that is not there fails it)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "reference"
REGENERATE = "run .venv/bin/python docs/gen_reference.py"


def _gen_reference():
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_pages_are_generated_from_the_code(tmp_path):
    written = {path.name: path.read_text() for path in _gen_reference().generate(tmp_path)}
    committed = {path.name for path in REFERENCE.iterdir()}
    assert committed == set(written), f"docs/reference/ holds {sorted(committed)}, the script writes " \
                                      f"{sorted(written)}: {REGENERATE}"
    stale = [name for name, text in written.items() if (REFERENCE / name).read_text() != text]
    assert not stale, f"docs/reference/{', '.join(stale)} differ from the code: {REGENERATE}"


def test_reference_covers_every_option_and_route(tmp_path):
    from server.settings import ServeSettings
    from training.config import TrainConfig

    cli = (REFERENCE / "cli.md").read_text()
    for model in (ServeSettings, TrainConfig):
        for name in model.model_fields:
            flag = name.replace("_", "-")
            assert f"`--{flag}`" in cli or f"`--[no-]{flag}`" in cli, f"--{flag} is not in docs/reference/cli.md"
    api = (REFERENCE / "api.md").read_text()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/adapters/{name}/merge", "/v1/fine_tuning/jobs",
                 "/ready"):
        assert f"`{path}`" in api
    fields = (REFERENCE / "request-fields.md").read_text()
    assert "`max_tokens` | integer > 0 or null | `null` |" in fields  # chat: up to the context
    assert "`max_tokens` | integer ≥ 0 or null | `16` |" in fields  # completions: OpenAI's 16


def test_site_builds_with_no_warning(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", "mkdocs.yml",
                           "--site-dir", str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # Material's banner
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "WARNING" not in done.stderr, done.stderr[-5000:]
    site = tmp_path / "site"
    assert (site / "reference" / "openapi.json").is_file()
    assert (site / "benchmarks" / "img" / "serve-throughput.png").is_file()
    # deploy/README.md is included into the deploying guide, not copied.
    deploying = (site / "guides" / "deploying" / "index.html").read_text()
    assert "Kubernetes, replicas on PostgreSQL" in deploying
