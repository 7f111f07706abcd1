"""Admin routes for the adapter registry: register (server path or archive upload), list, show, delete."""

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from adapters.archive import confine, copy_folder, extract_archive
from adapters.base import AdapterError
from adapters.registry import AdapterRecord
from server.dependencies import get_router, get_settings
from server.errors import APIError, invalid_request
from server.router import Router
from server.settings import ServeSettings

adapter_api = APIRouter(prefix="/v1/adapters")
models_api = APIRouter()  # the same registry under OpenAI's model routes


class RegisterAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str | None = None  # a server folder inside --adapter-roots or a job's output; or upload `file`
    replace: bool = False  # swap the version served under an existing name
    pinned: bool = False  # never evicted from the device


class AdapterCard(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    kind: str
    version: int
    num_virtual_tokens: int
    num_bytes: int
    pinned: bool
    merged: bool  # folded into the base weights (POST /v1/adapters/{name}/merge)
    engine: str  # the engine serving it: "torch", or "vllm" (on --engine vllm, "torch" with --torch-beside-vllm)
    source: str
    created: int

    @classmethod
    def of(cls, r: AdapterRecord, router: Router) -> "AdapterCard":
        return cls(id=r.name, kind=r.kind, version=r.version, num_virtual_tokens=r.num_virtual_tokens,
                   num_bytes=r.num_bytes, pinned=r.is_pinned, merged=router.adapters.merged == r.name,
                   engine=router.engine.engine_for(r.kind),
                   source=r.source, created=int(r.created_at))


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class Deleted(BaseModel):
    id: str
    object: Literal["adapter", "model"] = "adapter"
    deleted: bool = True


async def _read_upload(request: Request, limit: int, staging: Path) -> tuple[RegisterAdapter, Path]:
    """A multipart registration: form fields plus the archive in `file` (the body's size is bounded by
    the BodyLimit middleware; starlette spools the file to disk)."""
    form = await request.form(max_files=1, max_fields=8)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "multipart registration needs the archive in a `file` field", param="file")
    if upload.size is not None and upload.size > limit:
        raise APIError(413, f"upload of {upload.size} bytes exceeds the limit of {limit}", param="file")
    fields = {k: v for k, v in form.items() if k != "file"}
    try:
        body = RegisterAdapter.model_validate({**fields, "replace": fields.get("replace") == "true",
                                              "pinned": fields.get("pinned") == "true"})
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from exc

    def unpack() -> Path:  # disk work off the event loop: an archive may unpack to --max-upload-mb
        archive = staging / "upload"
        with archive.open("wb") as out:
            shutil.copyfileobj(upload.file, out)
        return extract_archive(archive, staging / "files", limit)

    return body, await asyncio.to_thread(unpack)


@adapter_api.post("", response_model=AdapterCard, status_code=201)
async def register_adapter(request: Request, router: Router = Depends(get_router),
                           settings: ServeSettings = Depends(get_settings)) -> AdapterCard:
    """Register an adapter: JSON `{"name", "path", "replace", "pinned"}` naming a server folder (inside
    --adapter-roots, or a fine-tuning job's output), or multipart form fields `name`, `replace`, `pinned` with
    a .tar.gz or .zip of the folder in `file`."""
    limit = settings.max_upload_mb * 2**20
    with tempfile.TemporaryDirectory(prefix="swapyard-upload-") as tmp:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            body, folder = await _read_upload(request, limit, Path(tmp))
            source = f"upload:{body.name}"
        else:
            try:
                body = RegisterAdapter.model_validate_json(await request.body())
            except ValidationError as exc:
                raise invalid_request(exc.errors()) from exc
            if body.path is None:
                raise AdapterError("path", "give a server folder in `path`, or upload an archive as multipart")
            source_folder = confine(body.path, settings.registrable_roots)
            # Read from a checked copy: links or devices in the folder are refused, its size is bounded.
            folder = await asyncio.to_thread(copy_folder, source_folder, Path(tmp) / "files", limit)
            source = str(source_folder)
        record = await router.adapters.register(body.name, folder, source=source, replace=body.replace,
                                                is_pinned=body.pinned)
    return AdapterCard.of(record, router)


@adapter_api.get("", response_model=AdapterList)
async def list_adapters(router: Router = Depends(get_router)) -> AdapterList:
    records = sorted(router.adapters.records().values(), key=lambda record: record.name)
    return AdapterList(data=[AdapterCard.of(r, router) for r in records])


async def _record(router: Router, name: str) -> AdapterRecord:
    record = await router.adapters.get(name)
    if record is None:
        raise APIError(404, f"no adapter named `{name}`", param="name", code="adapter_not_found")
    return record


@adapter_api.get("/{name}", response_model=AdapterCard)
async def show_adapter(name: str, router: Router = Depends(get_router)) -> AdapterCard:
    return AdapterCard.of(await _record(router, name), router)


@adapter_api.post("/{name}/merge", response_model=AdapterCard)
async def merge_adapter(name: str, router: Router = Depends(get_router)) -> AdapterCard:
    """Fold this LoRA into the base weights: its requests run at base speed, all others stay exact."""
    await _record(router, name)
    return AdapterCard.of(await router.adapters.merge(name), router)


@adapter_api.post("/{name}/unmerge", response_model=AdapterCard)
async def unmerge_adapter(name: str, router: Router = Depends(get_router)) -> AdapterCard:
    record = await _record(router, name)
    if not await router.adapters.unmerge(name):
        raise APIError(409, f"`{name}` is not merged", param="name", code="not_merged")
    return AdapterCard.of(record, router)


@adapter_api.delete("/{name}", response_model=Deleted)
async def delete_adapter(name: str, router: Router = Depends(get_router)) -> Deleted:
    if await router.adapters.unregister(name) is None:
        raise APIError(404, f"no adapter named `{name}`", param="name", code="adapter_not_found")
    return Deleted(id=name)


@models_api.delete("/v1/models/{model}", response_model=Deleted)
async def delete_model(model: str, router: Router = Depends(get_router)) -> Deleted:
    """OpenAI's way to delete a fine-tuned model: here, any adapter; never the base model."""
    if model == router.base_model:
        raise APIError(400, "the base model cannot be deleted; adapters can", param="model")
    if await router.adapters.unregister(model) is None:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return Deleted(id=model, object="model")
