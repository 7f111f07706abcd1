"""The FastAPI application: loads the model once at start-up and wires HTTP -> router -> engine."""

import logging
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from transformers import AutoConfig, AutoTokenizer

from adapters.base import BaseModelSpec
from adapters.registry import AdapterRegistry
from training.jobs import JobStore
from server.adapter_api import adapter_api
from server.adapter_manager import AdapterManager
from server.api import api
from server.job_runner import JobRunner
from server.jobs_api import jobs_api
from server.default_model import ensure_default_model
from server.engine.factory import build_engine
from server.errors import install_error_handlers
from server.router import Router
from server.settings import ServeSettings

log = logging.getLogger(__name__)

_DEFAULT_MAX_MODEL_LEN = 4096


def resolve_model(settings: ServeSettings) -> tuple[Path, str]:
    """The model folder to load and the name clients use for it."""
    path = settings.model or ensure_default_model(settings.cache_dir)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {path}: not an HF model folder (no config.json)")
    return path, settings.served_model_name or path.name


def context_length(path: Path, requested: int | None) -> int:
    config = AutoConfig.from_pretrained(path)
    native = getattr(config, "max_position_embeddings", None) or _DEFAULT_MAX_MODEL_LEN
    if requested is not None and requested > native:
        raise SystemExit(f"--max-model-len {requested} exceeds the model's context of {native} tokens")
    return requested or min(native, _DEFAULT_MAX_MODEL_LEN)


def build_app(settings: ServeSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        path, name = resolve_model(settings)
        max_model_len = context_length(path, settings.max_model_len)
        tokenizer = AutoTokenizer.from_pretrained(path)
        engine = build_engine(settings, path, tokenizer, max_model_len)
        await engine.start()
        registry = AdapterRegistry(settings.adapter_store or settings.cache_dir / "adapters")
        adapters = AdapterManager(registry, engine, BaseModelSpec.from_pretrained(path), name,
                                  max_resident=settings.max_resident_adapters, max_lora_rank=settings.max_lora_rank)
        app.state.router = Router(engine, adapters, tokenizer, name, max_model_len)
        app.state.settings = settings
        jobs_root = settings.fine_tuning_dir or settings.cache_dir / "fine_tuning"
        app.state.jobs = JobRunner(JobStore(jobs_root / "jobs.sqlite3"), adapters, settings.training_threads)
        await app.state.jobs.start()
        log.info("serving %s as %r (context %d tokens)", path, name, max_model_len)
        try:
            yield
        finally:
            await app.state.jobs.shutdown()
            await engine.shutdown()

    app = FastAPI(title="swapyard", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(api)
    app.include_router(adapter_api)
    app.include_router(jobs_api)
    return app


def run_server(settings: ServeSettings) -> None:
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
