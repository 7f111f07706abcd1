"""Adapter files, folders, archives and names from a hostile or unlucky client: each is refused with a
4xx naming what is wrong, never a 500, and the registry is left as it was. Hypothesis fuzzes adapter
configs and archive bytes for the whole class, beyond the cases written out here."""

import io
import json
import os
import shutil
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from adapter_factory import KINDS
from conftest import MODEL, ask, running, running_server, scrape, start_serve_process, until_generating

ADAPTERS = "/v1/adapters"
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _register(http, name: str, folder: Path | str, **extra) -> httpx.Response:
    return http.post(ADAPTERS, json={"name": name, "path": str(folder), **extra})


def _refused(response: httpx.Response, param: str, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error


def _answer(http, model: str) -> str:
    body = {"model": model, "messages": ask("Write a short poem about the sea."), "temperature": 0, "max_tokens": 12}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _copy(src: Path, root: Path, name: str) -> Path:
    dst = root / name
    shutil.rmtree(dst, ignore_errors=True)
    return Path(shutil.copytree(src, dst))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(http, adapter_dirs, adapter_root, kind, bad):
    folder = _copy(adapter_dirs[kind], adapter_root, f"nonfinite-{kind}")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = sorted(tensors)[-1]
    tensors[key].view(-1)[0] = bad
    save_file(tensors, folder / "adapter_model.safetensors")
    error = _refused(_register(http, "nonfinite", folder), key)
    assert "NaN or infinite" in error["message"]
    assert http.get(f"{ADAPTERS}/nonfinite").status_code == 404


@pytest.mark.parametrize("config_text, param", [
    ('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, "target_modules": ["q_proj"]}', "adapter_config.json"),
    ('{"peft_type": "LORA", "r": 4, "lora_alpha": 1e999, "target_modules": ["q_proj"]}', "adapter_config.json"),
    ("[1, 2, 3]", "adapter_config.json"),
    ("[" * 100_000 + "]" * 100_000, "adapter_config.json"),
    ('{"peft_type": "LORA", "r": 4}\xff', "adapter_config.json"),
    ('{"peft_type": "LORA", "r": 0, "lora_alpha": 8, "target_modules": ["q_proj"]}', "r"),
    ('{"peft_type": "LORA", "r": "8", "lora_alpha": 8, "target_modules": ["q_proj"]}', "r"),
])
def test_malformed_configs_are_refused(http, adapter_dirs, adapter_root, config_text, param):
    folder = _copy(adapter_dirs["lora"], adapter_root, "bad-config")
    (folder / "adapter_config.json").write_bytes(config_text.encode("latin-1"))
    _refused(_register(http, "bad-config", folder), param)


def test_config_that_is_a_folder_and_overflowing_alpha(http, adapter_dirs, adapter_root):
    folder = _copy(adapter_dirs["lora"], adapter_root, "config-folder")
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").mkdir()
    _refused(_register(http, "config-folder", folder), "adapter_config.json")
    folder = _copy(adapter_dirs["lora"], adapter_root, "huge-alpha")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e300}))
    assert "overflows" in _refused(_register(http, "huge-alpha", folder), "lora_alpha")["message"]
    folder = _copy(adapter_dirs["bottleneck"], adapter_root, "huge-scaling")  # folded into up by the torch engine
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "scaling": 1e39}))
    assert "overflows" in _refused(_register(http, "huge-scaling", folder), "scaling")["message"]


@pytest.mark.parametrize("target", ["/etc/passwd", "/dev/zero", "fifo"])
def test_links_and_special_files_inside_a_folder_are_refused(http, adapter_dirs, adapter_root, target):
    folder = _copy(adapter_dirs["lora"], adapter_root, "linked")
    if target == "fifo":
        os.mkfifo(folder / "extra")
    else:
        (folder / "extra").symlink_to(target)
    assert "regular files only" in _refused(_register(http, "linked", folder), "path")["message"]
    assert http.get(f"{ADAPTERS}/linked").status_code == 404


def test_a_folder_over_the_upload_limit_is_refused_while_copying(tmp_path, adapter_dirs):
    root = tmp_path / "root"
    folder = _copy(adapter_dirs["lora"], root, "big")
    (folder / "padding.bin").write_bytes(b"\0" * (2 * 2**20))
    with running_server(data_dir=tmp_path / "data", adapter_roots=[root], max_upload_mb=1) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            assert "limit" in _refused(_register(http, "big", folder), "path")["message"]


def test_a_nul_byte_in_a_path(http):
    _refused(_register(http, "nul", "/tmp/a\0b"), "path")


def _archive(files: dict[str, bytes], kind: str) -> bytes:
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + f.name: f.read_bytes() for f in folder.iterdir()}


def _upload(http, name: str, archive: bytes, filename: str) -> httpx.Response:
    return http.post(ADAPTERS, data={"name": name}, files={"file": (filename, archive)})


def _bad_crc(zip_bytes: bytes) -> bytes:
    """Flip one byte of the first member's compressed data, leaving the headers intact."""
    data = bytearray(zip_bytes)
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        info = zf.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    return bytes(data)


def _lying_sizes(zip_bytes: bytes) -> bytes:
    """Declare a tiny uncompressed size for members that really unpack to more."""
    data = bytearray(zip_bytes)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        while at != -1:
            data[at + offset : at + offset + 4] = (8).to_bytes(4, "little")
            at = data.find(signature, at + 4)
    return bytes(data)


def test_corrupt_archives_are_refused(http, adapter_dirs):
    files = _files(adapter_dirs["lora"])
    zipped, tarred = _archive(files, "zip"), _archive(files, "tar")
    for archive, filename in ((_bad_crc(zipped), "crc.zip"), (_lying_sizes(zipped), "sizes.zip"),
                              (tarred[: len(tarred) // 2], "truncated.tar.gz"),
                              (_archive({**_files(adapter_dirs["lora"], "one/"),
                                         **_files(adapter_dirs["lora2"], "two/")}, "tar"), "two.tar.gz")):
        _refused(_upload(http, "corrupt", archive, filename), "file")
    assert http.get(f"{ADAPTERS}/corrupt").status_code == 404
    # A trainer's output keeps its checkpoints, adapters of their own, one level down: that is not ambiguous.
    nested = {**_files(adapter_dirs["lora"], "run/"), **_files(adapter_dirs["lora2"], "run/checkpoints/epoch-1/")}
    assert _upload(http, "nested", _archive(nested, "tar"), "nested.tar.gz").status_code == 201


@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4),
       kind=st.sampled_from(["zip", "tar"]))
def test_fuzzed_archives_are_never_a_server_error(http, adapter_dirs, cut, flips, kind):
    data = bytearray(_archive(_files(adapter_dirs["lora"]), kind))
    for where, mask in flips:
        data[int(where * (len(data) - 1))] ^= mask
    data = data[: max(1, int(cut * len(data)))] if cut < 0.95 else data
    response = _upload(http, "fuzzed", bytes(data), f"fuzzed.{'zip' if kind == 'zip' else 'tar.gz'}")
    assert response.status_code in (201, 400, 413), response.text
    http.delete(f"{ADAPTERS}/fuzzed")


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                  max_size=4), max_leaves=10)


@FUZZ
@given(kind=st.sampled_from(KINDS), changes=st.dictionaries(st.text(max_size=24) | st.sampled_from(
    ["peft_type", "r", "lora_alpha", "target_modules", "alpha_pattern", "rank_pattern", "use_rslora", "bias",
     "num_virtual_tokens", "token_dim", "num_layers", "num_transformer_submodules", "bottleneck_size",
     "positions", "scaling", "hidden_size", "layers_module", "non_linearity", "task_type"]), _JSON, max_size=3))
def test_fuzzed_configs_are_never_a_server_error(http, adapter_dirs, adapter_root, kind, changes):
    folder = _copy(adapter_dirs[kind], adapter_root, "fuzzed-config")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    response = _register(http, "fuzzed-config", folder, replace=True)
    assert response.status_code in (201, 400), response.text


@pytest.mark.parametrize("name", ["name\n", "name\r\n", "x" * 64 + "\n"])
def test_names_match_whole(http, adapter_dirs, name):
    _refused(_register(http, name, adapter_dirs["lora"]), "name")


def test_names_are_unique_ignoring_case(http, adapter_dirs):
    assert _register(http, "casey", adapter_dirs["lora"], replace=True).status_code == 201
    assert _register(http, "Casey", adapter_dirs["lora"]).status_code == 409
    assert _register(http, "CASEY", adapter_dirs["lora"], replace=True).status_code == 409
    _refused(_register(http, MODEL.upper(), adapter_dirs["lora"]), "name")
    assert http.get(f"{ADAPTERS}/Casey").status_code == 404


def test_lora_features_are_named(http, adapter_dirs, adapter_root):
    folder = _copy(adapter_dirs["lora"], adapter_root, "lora-bias")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    _refused(_register(http, "lora-bias", folder), "lora_bias")
    # bias="all" on a base without biases saved no bias tensor: it serves exactly like bias="none".
    (folder / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    assert _register(http, "bias-all", folder, replace=True).status_code == 201
    assert _register(http, "bias-none", adapter_dirs["lora"], replace=True).status_code == 201
    assert _answer(http, "bias-all") == _answer(http, "bias-none")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(576)
    save_file(tensors, folder / "adapter_model.safetensors")
    _refused(_register(http, "bias-tensor", folder), "bias")


@pytest.mark.parametrize("key, param, hint", [
    ("base_model.model.model.embed_tokens.lora_embedding_A", "target_modules", "embed_tokens"),
    ("base_model.model.model.embed_tokens.base_layer.weight", "save_embedding_layers", "save_embedding_layers=False"),
    ("base_model.model.lm_head.weight", "save_embedding_layers", "save_embedding_layers=False"),
])
def test_embedding_targets_say_how_to_save(http, adapter_dirs, adapter_root, key, param, hint):
    """What PEFT saves for a LoRA on embed_tokens or lm_head (small stand-ins for the real tensors)."""
    folder = _copy(adapter_dirs["lora"], adapter_root, "embed-lora")
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({**tensors, key: torch.zeros(2, 2)}, folder / "adapter_model.safetensors")
    assert hint in _refused(_register(http, "embed-lora", folder), param)["message"]


def test_a_replace_the_engine_refuses_changes_nothing(http, adapter_dirs, adapter_root, tmp_path):
    """The torch engine hooks bottleneck adapters at one place; one wrapping another place is refused
    after validation, by the engine: the registered version, its files and its answers stay."""
    assert _register(http, "keep-bn", adapter_dirs["bottleneck"], replace=True).status_code == 201
    before, answer = http.get(f"{ADAPTERS}/keep-bn").json(), _answer(http, "keep-bn")
    folder = _copy(adapter_dirs["bottleneck"], adapter_root, "other-place")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "attn_module": "self_attn.o_proj"}))
    _refused(_register(http, "keep-bn", folder, replace=True), "layers_module")
    assert http.get(f"{ADAPTERS}/keep-bn").json() == before
    assert _answer(http, "keep-bn") == answer


def test_registered_while_every_slot_is_pinned_is_a_201(tmp_path, adapter_dirs, adapter_root):
    with running_server(data_dir=tmp_path / "data", adapter_roots=[adapter_root],
                        max_resident_adapters=1, max_pinned_adapters=1) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            assert _register(http, "pinned", adapter_dirs["lora"], pinned=True).status_code == 201
            waiting = _register(http, "waiting", adapter_dirs["lora2"])
            assert waiting.status_code == 201, waiting.text
            assert _register(http, "waiting", adapter_dirs["lora2"]).status_code == 409  # it is registered
            assert http.get(f"{ADAPTERS}/waiting").json()["version"] == 1


def test_an_adapter_deleted_while_its_request_waits_for_a_slot_is_a_404(tmp_path, adapter_dirs, adapter_root):
    """One slot, held by a stream of `busy`: a request for `cold` waits in line for it; `cold` is deleted
    meanwhile, and the request ends as a request for an unknown model does (it was a 400). A server process of
    its own: the memory of a model loaded in pytest's process is not all returned, and the vLLM tests need it."""
    proc, url = start_serve_process(tmp_path / "serve.log", "--engine", "torch", "--dtype", "float32",
                                    "--max-model-len", "512", "--data-dir", str(tmp_path / "data"),
                                    "--adapter-roots", json.dumps([str(adapter_root)]), "--max-resident-adapters", "1")
    try:
        with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(2) as pool:
            assert _register(http, "busy", adapter_dirs["lora"]).status_code == 201
            assert _register(http, "cold", adapter_dirs["lora2"]).status_code == 201
            long = {"model": "busy", "messages": ask("Count from one to a hundred."), "max_tokens": 160,
                    "temperature": 0, "ignore_eos": True}
            busy = pool.submit(http.post, "/v1/chat/completions", json=long)
            while running(scrape(http), "busy") < 1:
                time.sleep(0.05)
            cold = pool.submit(http.post, "/v1/chat/completions", json={**long, "model": "cold", "max_tokens": 4})
            while scrape(http).get(("swapyard_adapter_queue_length", ()), 0) < 1:  # in line for the slot
                time.sleep(0.05)
            assert http.delete(f"{ADAPTERS}/cold").status_code == 200
            refused = cold.result()
            assert refused.status_code == 404, refused.text
            assert refused.json()["error"]["code"] == "model_not_found"
            assert busy.result().status_code == 200
    finally:
        proc.kill()
        proc.wait()


def test_deleted_adapters_leave_no_metric_series(http, adapter_dirs):
    def series() -> int:
        return len(scrape(http))

    for cycle in range(4):
        assert _register(http, f"cycled-{cycle}", adapter_dirs["lora"]).status_code == 201
        _answer(http, f"cycled-{cycle}")
        assert http.delete(f"{ADAPTERS}/cycled-{cycle}").status_code == 200
        if cycle == 0:
            after_first = series()
    assert series() == after_first
    assert not any("cycled-" in str(labels) for _, labels in scrape(http))


def test_deleting_an_adapter_mid_stream_leaves_no_series_and_no_negative_gauge(http, adapter_dirs):
    """The stream finishes on the weights it started with; its metrics close on series that then go, rather
    than bringing the deleted adapter's series back with its running gauge at -1."""
    assert _register(http, "doomed", adapter_dirs["lora"]).status_code == 201
    body = {"model": "doomed", "messages": ask("Count from one to fifty."), "temperature": 0, "max_tokens": 48,
            "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.iter_lines()
        until_generating(lines)
        assert http.delete(f"{ADAPTERS}/doomed").status_code == 200
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and any('"finish_reason":"length"' in line.replace(" ", "") for line in rest)
    metrics = scrape(http)
    assert not [labels for _, labels in metrics if ("model", "doomed") in labels]
    assert min(value for (name, _), value in metrics.items()
               if name in ("swapyard_requests_running", "swapyard_requests_waiting")) >= 0
