"""Admin routes for the adapter registry: register (server path or archive upload), list, show, delete, each
adapter's versions and audit log; and aliases, which point at versions (several, with weights, to split
traffic)."""

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapters.archive import confine, copy_folder, extract_archive
from adapters.compose import Combination
from adapters.base import AdapterError
from adapters.registry import MAX_ALIAS_TARGETS, AdapterEvent, AdapterRecord, AliasRecord, AliasTarget, VersionRecord
from server.dependencies import get_router, get_settings, get_tenant
from server.errors import APIError, invalid_request
from server.router import Router
from server.settings import ServeSettings

adapter_api = APIRouter(prefix="/v1/adapters")
alias_api = APIRouter(prefix="/v1/aliases")
models_api = APIRouter()  # the same registry under OpenAI's model routes


class ComposePart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=200)  # a registered LoRA: NAME (its newest version), NAME@N or NAME@sha256:HEX
    weight: float = Field(1.0, ge=-10, le=10)  # negative subtracts its effect

    @field_validator("weight")
    @classmethod
    def _not_zero(cls, weight: float) -> float:
        if weight == 0:
            raise ValueError("a weight of 0 leaves the adapter out: drop it instead")
        return weight


class ComposeSpec(BaseModel):
    """A new LoRA from registered ones, as PEFT's add_weighted_adapter builds it."""

    model_config = ConfigDict(extra="forbid")

    method: Combination
    adapters: list[ComposePart] = Field(min_length=2, max_length=8)
    density: float | None = Field(None, gt=0, le=1)  # the share of weights kept (TIES, DARE, magnitude pruning)


class RegisterAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str | None = None  # a server folder inside --adapter-roots or a job's output; or upload `file`
    compose: ComposeSpec | None = None  # or compose it from registered LoRAs
    replace: bool = False  # register a new version under an existing name
    pinned: bool = False  # never evicted from the device


class AdapterCard(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    kind: str
    version: int  # the newest, which `model: NAME` is served by
    sha256: str | None  # of its files (GET .../versions explains how it is computed)
    num_virtual_tokens: int
    num_bytes: int
    pinned: bool
    merged: bool  # folded into the base weights (POST /v1/adapters/{name}/merge)
    residency: Literal["device", "host", "disk"]  # where its newest version is now, on the server answering
    engine: str  # the engine serving it: "torch", or "vllm" (on --engine vllm, "torch" with --torch-beside-vllm)
    source: str
    created: int

    @classmethod
    def of(cls, r: AdapterRecord, router: Router) -> "AdapterCard":
        return cls(id=r.name, kind=r.kind, version=r.version, sha256=r.sha256, num_virtual_tokens=r.num_virtual_tokens,
                   num_bytes=r.num_bytes, pinned=r.is_pinned, merged=router.adapters.merged == r.name,
                   residency=router.engine.tier(router.adapters.ref(r)),
                   engine=router.engine.engine_for(r.kind),
                   source=r.source, created=int(r.created_at))


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class VersionCard(BaseModel):
    id: str  # NAME@N, what `model` pins it by
    object: Literal["adapter.version"] = "adapter.version"
    version: int
    kind: str
    # sha256 over adapter_config.json then adapter_model.safetensors, each as its name, a NUL byte, its size in
    # 8 bytes big-endian and its bytes; `model: NAME@sha256:HEX` (12 or more digits) pins it.
    sha256: str | None
    num_bytes: int
    current: bool  # the version `model: NAME` is served by
    aliases: list[str]  # those pointing at it
    source: str
    created: int
    created_by: str | None  # the admin key's tenant; null without keys
    provenance: dict | None

    @classmethod
    def of(cls, v: VersionRecord, current: int, aliases: list[AliasRecord]) -> "VersionCard":
        return cls(id=f"{v.name}@{v.version}", version=v.version, kind=v.kind, sha256=v.sha256, num_bytes=v.num_bytes,
                   current=v.version == current, source=v.source, created=int(v.created_at), created_by=v.created_by,
                   provenance=v.provenance,
                   aliases=[a.name for a in aliases if any((t.adapter, t.version) == (v.name, v.version)
                                                           for t in a.targets)])


class VersionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VersionCard]


class EventCard(BaseModel):
    id: int  # increasing; `after` pages on it
    object: Literal["adapter.event"] = "adapter.event"
    created_at: float
    actor: str | None
    action: str  # registered, replaced, deleted, pruned, alias_moved, alias_deleted
    version: int | None
    data: dict | None

    @classmethod
    def of(cls, e: AdapterEvent) -> "EventCard":
        return cls(id=e.seq, created_at=e.created_at, actor=e.actor, action=e.action, version=e.version, data=e.data)


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventCard]
    has_more: bool


class Deleted(BaseModel):
    id: str
    object: Literal["adapter", "model", "alias"] = "adapter"
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
                           settings: ServeSettings = Depends(get_settings),
                           tenant: str = Depends(get_tenant)) -> AdapterCard:
    """Register an adapter: JSON `{"name", "path", "replace", "pinned"}` naming a server folder (inside
    --adapter-roots, or a fine-tuning job's output), JSON `{"name", "compose": {"method", "adapters", "density"}}`
    composing registered LoRAs, or multipart form fields `name`, `replace`, `pinned` with a .tar.gz or .zip of the
    folder in `file`."""
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
            if body.compose is not None:
                if body.path is not None:
                    raise AdapterError("compose", "give `path` or `compose`, not both")
                spec = body.compose
                parts = [(f"compose.adapters[{i}].model", p.model, p.weight) for i, p in enumerate(spec.adapters)]
                record = await router.adapters.compose(body.name, spec.method, parts, spec.density,
                                                       replace=body.replace, is_pinned=body.pinned,
                                                       actor=tenant or None)
                return AdapterCard.of(record, router)
            if body.path is None:
                raise AdapterError("path", "give a server folder in `path`, `compose` registered LoRAs, or upload "
                                           "an archive as multipart")
            source_folder = confine(body.path, settings.registrable_roots)
            # Read from a checked copy: links or devices in the folder are refused, its size is bounded.
            folder = await asyncio.to_thread(copy_folder, source_folder, Path(tmp) / "files", limit)
            source = str(source_folder)
        record = await router.adapters.register(body.name, folder, source=source, replace=body.replace,
                                                is_pinned=body.pinned, actor=tenant or None)
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


@adapter_api.get("/{name}/versions", response_model=VersionList)
async def list_versions(name: str, router: Router = Depends(get_router)) -> VersionList:
    """The kept versions of `name`, oldest first (--keep-versions newest, and older ones aliases point at)."""
    record = await _record(router, name)
    versions = await router.adapters.versions(name) or []
    aliases = list(router.adapters.view().aliases.values())
    return VersionList(data=[VersionCard.of(v, record.version, aliases) for v in versions])


@adapter_api.get("/{name}/events", response_model=EventList)
async def list_events(name: str, after: int = Query(0, ge=0, le=2**31 - 1), limit: int = Query(100, ge=1, le=1000),
                      router: Router = Depends(get_router)) -> EventList:
    """`name`'s audit log, oldest first: registrations, replacements, pruned versions, alias moves and
    deletion (kept after the adapter is deleted)."""
    events = await router.adapters.events(name, after, limit + 1)
    return EventList(data=[EventCard.of(e) for e in events[:limit]], has_more=len(events) > limit)


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
async def delete_adapter(name: str, router: Router = Depends(get_router), tenant: str = Depends(get_tenant)) -> Deleted:
    """Delete the adapter and every version of it (409 while an alias points at one)."""
    if await router.adapters.unregister(name, tenant or None) is None:
        raise APIError(404, f"no adapter named `{name}`", param="name", code="adapter_not_found")
    return Deleted(id=name)


@models_api.delete("/v1/models/{model}", response_model=Deleted)
async def delete_model(model: str, router: Router = Depends(get_router), tenant: str = Depends(get_tenant)) -> Deleted:
    """OpenAI's way to delete a fine-tuned model: here, any adapter; never the base model."""
    if model == router.base_model:
        raise APIError(400, "the base model cannot be deleted; adapters can", param="model")
    if await router.adapters.unregister(model, tenant or None) is None:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return Deleted(id=model, object="model")


class AliasTargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=200)  # NAME (its newest version now), NAME@N or NAME@sha256:HEX
    weight: float = Field(1.0, gt=0, le=1e6)  # its share of the alias's requests, relative to the others'


class SetAlias(BaseModel):
    """Either `model` (one version) or `targets` (a weighted split, sticky per `user`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200)
    targets: list[AliasTargetSpec] | None = Field(None, min_length=1, max_length=MAX_ALIAS_TARGETS)


class AliasCard(BaseModel):
    id: str
    object: Literal["alias"] = "alias"
    targets: list[AliasTarget]  # adapter, version, weight
    updated: int
    updated_by: str | None

    @classmethod
    def of(cls, a: AliasRecord) -> "AliasCard":
        return cls(id=a.name, targets=a.targets, updated=int(a.updated_at), updated_by=a.updated_by)


class AliasList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AliasCard]


@alias_api.put("/{alias}", response_model=AliasCard)
async def set_alias(alias: str, body: SetAlias, router: Router = Depends(get_router),
                    tenant: str = Depends(get_tenant)) -> AliasCard:
    """Point `alias` at a version, or split it over several by weight; atomic: a request resolves the alias
    before or after the move, never half. Rolling back is pointing it back. Each move is an event of every
    adapter involved."""
    if (body.model is None) == (body.targets is None):
        raise APIError(400, "give exactly one of `model` (one version) and `targets` (a weighted split)", param="model")
    targets = [("model", body.model, 1.0)] if body.model is not None else \
        [(f"targets[{i}].model", t.model, t.weight) for i, t in enumerate(body.targets)]
    return AliasCard.of(await router.adapters.set_alias(alias, targets, tenant or None))


@alias_api.get("", response_model=AliasList)
async def list_aliases(router: Router = Depends(get_router)) -> AliasList:
    return AliasList(data=[AliasCard.of(a) for _, a in sorted(router.adapters.view().aliases.items())])


@alias_api.get("/{alias}", response_model=AliasCard)
async def show_alias(alias: str, router: Router = Depends(get_router)) -> AliasCard:
    if (record := await router.adapters.alias(alias)) is None:
        raise APIError(404, f"no alias named `{alias}`", param="alias", code="alias_not_found")
    return AliasCard.of(record)


@alias_api.delete("/{alias}", response_model=Deleted)
async def delete_alias(alias: str, router: Router = Depends(get_router), tenant: str = Depends(get_tenant)) -> Deleted:
    if await router.adapters.delete_alias(alias, tenant or None) is None:
        raise APIError(404, f"no alias named `{alias}`", param="alias", code="alias_not_found")
    return Deleted(id=alias, object="alias")
