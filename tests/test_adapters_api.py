"""The adapter registry over HTTP: register by path or upload, hot swap, delete, capacity, restarts,
and every bad input refused with a clear 4xx while the registry stays as it was."""

import asyncio
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save_file

from adapter_factory import KINDS
from conftest import MAX_UPLOAD_MB, MODEL, ask, running_server, scrape

ADAPTERS = "/v1/adapters"
QUESTION = ask("Write a short poem about the sea.")


def _answer(http, model: str, max_tokens: int = 16) -> str:
    body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": max_tokens}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _register(http, name: str, folder: Path, **extra) -> httpx.Response:
    return http.post(ADAPTERS, json={"name": name, "path": str(folder), **extra})


def _tar_gz(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return buffer.getvalue()


def _zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for file in folder.iterdir():
            zf.write(file, file.name)
    return buffer.getvalue()


def _upload(http, name: str, archive: bytes, filename: str, **fields) -> httpx.Response:
    return http.post(ADAPTERS, data={"name": name, **fields}, files={"file": (filename, archive)})


@pytest.mark.parametrize("kind", KINDS)
def test_register_by_path_then_chat_and_list(http, adapter_dirs, kind):
    name = f"api-{kind}"
    response = _register(http, name, adapter_dirs[kind], replace=True)
    assert response.status_code == 201, response.text
    card = response.json()
    assert card["id"] == name and card["kind"] == kind and card["num_bytes"] > 0
    assert http.get(f"{ADAPTERS}/{name}").json()["kind"] == kind
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models[name]["parent"] == MODEL
    reply = http.post("/v1/chat/completions", json={"model": name, "messages": QUESTION, "max_tokens": 4}).json()
    assert reply["model"] == name and reply["usage"]["completion_tokens"] == 4
    # Latency metrics carry the adapter's name and the version that served it.
    labels = (("model", name), ("version", f"{name}@{card['version']}"))
    assert scrape(http)[("swapyard_time_to_first_token_seconds_count", labels)] >= 1


@pytest.mark.parametrize("pack, filename", [(_tar_gz, "adapter.tar.gz"), (_zip, "adapter.zip")])
def test_upload_archive(http, adapter_dirs, pack, filename):
    name = f"uploaded-{filename.split('.')[1]}"
    response = _upload(http, name, pack(adapter_dirs["prompt"]), filename, replace="true")
    assert response.status_code == 201, response.text
    assert response.json()["source"] == f"upload:{name}"
    assert _register(http, "by-path", adapter_dirs["prompt"], replace=True).status_code == 201
    assert _answer(http, name) == _answer(http, "by-path")


def test_replace_swaps_atomically_and_in_flight_requests_finish_on_the_old_version(http, base_url, adapter_dirs):
    assert _register(http, "swap", adapter_dirs["lora"], replace=True).status_code == 201
    old_answer = _answer(http, "swap", max_tokens=48)
    assert _register(http, "swap", adapter_dirs["lora2"]).status_code == 409  # no silent overwrite
    assert _register(http, "solo-lora2", adapter_dirs["lora2"], replace=True).status_code == 201
    new_answer = _answer(http, "solo-lora2", max_tokens=48)
    assert old_answer != new_answer

    async def swap_mid_stream() -> str:
        body = {"model": "swap", "messages": QUESTION, "temperature": 0, "max_tokens": 48, "stream": True}
        parts = []
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                    parts.append(delta)
                    if len(parts) == 3:  # mid-stream: swap in the other version
                        swapped = await client.post(ADAPTERS, json={"name": "swap", "replace": True,
                                                                    "path": str(adapter_dirs["lora2"])})
                        assert swapped.status_code == 201 and swapped.json()["version"] >= 2
        return "".join(parts)

    assert asyncio.run(swap_mid_stream()) == old_answer
    assert _answer(http, "swap", max_tokens=48) == new_answer


def test_delete(http, adapter_dirs):
    assert _register(http, "doomed", adapter_dirs["bottleneck"], replace=True).status_code == 201
    assert http.delete(f"{ADAPTERS}/doomed").json() == {"id": "doomed", "object": "adapter", "deleted": True}
    assert http.get(f"{ADAPTERS}/doomed").status_code == 404
    assert http.delete(f"{ADAPTERS}/doomed").status_code == 404
    chat = http.post("/v1/chat/completions", json={"model": "doomed", "messages": QUESTION})
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"


def _corrupt_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)
    return dst


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return dst


def _pickled_only(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "adapter_model.safetensors").rename(dst / "adapter_model.bin")
    return dst


def _wrong_shape(src: Path, dst: Path) -> Path:
    import torch

    shutil.copytree(src, dst)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 100),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(576, 4)},
              dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("make_bad, kind, field", [
    (_corrupt_weights, "lora", "adapter_model.safetensors"),
    (lambda s, d: _edit_config(s, d, num_layers=12), "prefix", "num_layers"),
    (lambda s, d: _edit_config(s, d, token_dim=64), "prompt", "token_dim"),
    (lambda s, d: _edit_config(s, d, hidden_size=1024), "bottleneck", "hidden_size"),
    (lambda s, d: _edit_config(s, d, peft_type="IA3"), "lora", "peft_type"),
    (_pickled_only, "lora", "adapter_model.bin"),
    (_wrong_shape, "lora", "model.layers.0.self_attn.q_proj.lora_A"),
])
def test_bad_adapter_is_refused_and_nothing_changes(http, adapter_root, adapter_dirs, tmp_path, make_bad, kind, field):
    bad = make_bad(adapter_dirs[kind], adapter_root / f"bad-{tmp_path.name}")
    before = http.get(ADAPTERS).json()
    response = _register(http, "bad", bad)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert http.get(ADAPTERS).json() == before
    assert "Paris" in http.post("/v1/chat/completions", json={"model": MODEL, "temperature": 0, "messages": ask(
        "What is the capital of France?")}).json()["choices"][0]["message"]["content"]


def test_path_outside_roots_is_refused(http, adapter_dirs, tmp_path):
    outside = shutil.copytree(adapter_dirs["lora"], tmp_path / "elsewhere")
    for path in (str(outside), str(adapter_dirs["lora"]) + "/../../../etc", "/etc"):
        response = _register(http, "sneaky", path)
        assert response.status_code == 400 and response.json()["error"]["param"] == "path"
    # A link inside the root that points outside does not get through either.
    link = adapter_dirs["lora"].parent / f"link-{tmp_path.name}"
    link.symlink_to(outside)
    assert _register(http, "sneaky", link).json()["error"]["param"] == "path"
    assert http.get(f"{ADAPTERS}/sneaky").status_code == 404


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        tf.addfile(member, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def test_hostile_archives_are_refused(http):
    escape = tarfile.TarInfo("../../escape.txt")
    escape.size = 2
    link = tarfile.TarInfo("adapter_config.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", "{}")
        zf.writestr("adapter_model.safetensors", b"\0" * (MAX_UPLOAD_MB + 1) * 2**20)
    for archive, filename in ((_tar_with(escape, b"hi"), "a.tar.gz"), (_tar_with(link), "b.tar.gz"),
                              (bomb.getvalue(), "c.zip"), (b"not an archive", "d.zip")):
        response = _upload(http, "hostile", archive, filename)
        assert response.status_code == 400 and response.json()["error"]["param"] == "file", response.text
    too_big = _upload(http, "hostile", b"\0" * (MAX_UPLOAD_MB * 2**20 + 1), "e.tar.gz")
    assert too_big.status_code == 413
    assert http.get(f"{ADAPTERS}/hostile").status_code == 404


@pytest.mark.parametrize("name", ["", "has space", "../up", "x" * 65, MODEL])
def test_bad_names_are_refused(http, adapter_dirs, name):
    response = _register(http, name, adapter_dirs["lora"])
    assert response.status_code == 400 and response.json()["error"]["param"] == "name"


def _registered(http) -> list[dict]:
    """The adapter cards but where each is now (the device, host memory or only the store)."""
    return [{k: v for k, v in card.items() if k != "residency"} for card in http.get(ADAPTERS).json()["data"]]


def test_lru_capacity_pinning_and_restart(tmp_path, adapter_root, adapter_dirs):
    """Two device slots, four adapters: loads and evictions happen on demand, a pinned one stays,
    every answer stays right, and the registry survives a restart."""
    data = tmp_path / "data"
    names = ["cap-lora", "cap-prefix", "cap-prompt", "cap-bottleneck"]
    with running_server(data_dir=data, adapter_roots=[adapter_root], max_resident_adapters=2) as url:
        with httpx.Client(base_url=url, timeout=120) as http:
            for name, kind in zip(names, KINDS):
                assert _register(http, name, adapter_dirs[kind], pinned=kind == "lora").status_code == 201
            first = {name: _answer(http, name) for name in names}
            second = {name: _answer(http, name) for name in reversed(names)}
            assert first == second
            metrics = scrape(http)
            assert metrics[("swapyard_adapter_evictions_total", (("model", "cap-prefix"),))] >= 1
            assert ("swapyard_adapter_evictions_total", (("model", "cap-lora"),)) not in metrics  # pinned
            assert metrics[("swapyard_adapters_resident", (("tier", "device"),))] == 2
            assert metrics[("swapyard_adapter_load_seconds_count", (("model", "cap-prompt"),))] >= 2
            listed = _registered(http)
    with running_server(data_dir=data, adapter_roots=[adapter_root], max_resident_adapters=2) as url:
        with httpx.Client(base_url=url, timeout=120) as http:
            assert _registered(http) == listed
            assert {card["residency"] for card in http.get(ADAPTERS).json()["data"]} == {"disk"}  # none read yet
            assert {name: _answer(http, name) for name in names} == first
