"""The FastAPI application: loads the model once, in the background at start-up, and wires
HTTP -> auth and limits -> router -> engine."""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from transformers import AutoConfig, AutoTokenizer

from adapters.registry import AdapterRegistry
from server.database import Database, normalize_url, sqlite_url
from training.jobs import JobStore
from server.web.adapter_api import adapter_api, alias_api, models_api
from server.auth import ApiKeyGate, ApiKeys
from server.adapter_manager import AdapterManager
from server.web.api import api
from server.job_runner import JobRunner
from server.web.files_api import files_api
from server.web.jobs_api import jobs_api
from server.default_model import ensure_default_model
from server.engine.factory import build_engine
from server.engine.torch.model_runner import eos_token_ids
from server.errors import install_error_handlers
from server.generation_defaults import read_sampling_defaults
from server.host import keep_torch_to_one_thread
from server.limits import BodyLimit
from server.web.ops_api import ops_api
from server.router import Router
from server.structured import GrammarCompiler
from server.settings import ServeSettings
from server.tenancy import PolicyFile, TenantAdmission, Tenants
from server.storage import require_local, require_store

log = logging.getLogger(__name__)

_DEFAULT_MAX_MODEL_LEN = 4096
_MULTIPART_SLACK = 1 << 16  # form fields and part headers around an upload of --max-upload-mb
# h11 bounds a request's line and headers (httptools, uvicorn's other parser, does not: a 100 MB header
# was read whole before any check).
UVICORN_HTTP = {"http": "h11", "h11_max_incomplete_event_size": 64 * 1024}


def resolve_model(settings: ServeSettings) -> tuple[Path, str]:
    """The model folder to load and the name clients use for it."""
    path = settings.model or ensure_default_model(settings.cache_dir)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {path}: not an HF model folder (no config.json)")
    return path, settings.served_model_name or path.name


def databases(settings: ServeSettings) -> tuple[Database, Database]:
    """The registry's and the job store's database: one shared (--database-url), or two SQLite files
    in the data folder."""
    if settings.database_url is not None:
        shared = Database(settings.database_url)
        return shared, shared
    return (Database(sqlite_url(settings.adapters_dir / "registry.sqlite3")),
            Database(sqlite_url(settings.fine_tuning_dir / "jobs.sqlite3")))


def check_storage(settings: ServeSettings) -> None:
    """Refuse storage known to be unsafe (server/storage.py), before anything is written."""
    url = normalize_url(settings.database_url) if settings.database_url is not None else None
    shared = url is not None and url.get_backend_name() == "postgresql"
    # Without a URL, the SQLite files are in the data folder.
    require_store(settings.data_dir, "--data-dir", shared_database=shared)
    if url is not None and not shared:
        require_local(Path(url.database).parent, "--database-url")


def point_to_earlier_state(settings: ServeSettings) -> None:
    """Earlier versions kept adapters and jobs in the cache folder, with the same layout: say so rather than
    serve an empty registry without a word."""
    earlier = settings.cache_dir / "adapters" / "registry.sqlite3"
    if earlier.is_file() and not settings.adapters_dir.exists():
        log.warning("adapters registered by an earlier swapyard are in %s; start with --data-dir %s to serve them",
                    earlier.parent, settings.cache_dir)


def context_length(path: Path, requested: int | None) -> int:
    config = AutoConfig.from_pretrained(path)
    native = getattr(config, "max_position_embeddings", None) or _DEFAULT_MAX_MODEL_LEN
    if requested is not None and requested > native:
        raise SystemExit(f"--max-model-len {requested} exceeds the model's context of {native} tokens")
    return requested or min(native, _DEFAULT_MAX_MODEL_LEN)


async def load_model(app: FastAPI, settings: ServeSettings, path: Path, name: str, max_model_len: int) -> None:
    """Everything slow at start-up, off the event loop: /health answers meanwhile, /ready once it is done."""
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
    engine = await asyncio.to_thread(build_engine, settings, path, tokenizer, max_model_len)
    app.state.engine = engine
    await engine.start()
    registry_db, jobs_db = app.state.databases = await asyncio.to_thread(databases, settings)
    # Its start-up sweep takes the database's writers' lock and removes files: off the event loop.
    registry = await asyncio.to_thread(AdapterRegistry, settings.adapters_dir, registry_db,
                                       keep_versions=settings.keep_versions)
    max_pinned = settings.max_pinned_adapters
    if max_pinned is None:
        max_pinned = settings.max_resident_adapters - 1
    adapters = AdapterManager(registry, engine, name, path, max_pinned=max_pinned)
    app.state.jobs = JobRunner(JobStore(jobs_db), settings.fine_tuning_dir, adapters, settings.training_threads)
    await app.state.jobs.start()
    defaults = read_sampling_defaults(path) if settings.generation_config == "auto" else {}
    config = AutoConfig.from_pretrained(path)
    grammars = GrammarCompiler(tokenizer, config.vocab_size, eos_token_ids(path, config),
                               workers=settings.grammar_workers, budget_s=settings.max_grammar_compile_s)
    app.state.router = Router(engine, adapters, tokenizer, name, max_model_len,
                              max_prompt_tokens=settings.max_prompt_tokens, max_tokens_limit=settings.max_tokens_limit,
                              sampling_defaults=defaults, grammars=grammars, tenants=app.state.tenants,
                              prefix_cache_across_keys=settings.prefix_cache_across_keys)
    app.state.phase = "ready"
    log.info("serving %s as %r (context %d tokens)", path, name, max_model_len)


def build_app(settings: ServeSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Torch runs on every core on the engine's thread only: here, and on the threads `to_thread` uses.
        keep_torch_to_one_thread()
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="swapyard-worker", initializer=keep_torch_to_one_thread))
        path, name = resolve_model(settings)  # bad flags stop the server at once, before it listens
        max_model_len = context_length(path, settings.max_model_len)
        check_storage(settings)
        point_to_earlier_state(settings)
        app.state.settings = settings
        app.state.phase, app.state.router, app.state.engine, app.state.jobs = "loading", None, None, None
        app.state.databases = ()
        loading = asyncio.create_task(load_model(app, settings, path, name, max_model_len))
        loading.add_done_callback(lambda task: _on_loaded(app, task))
        try:
            yield
        finally:
            app.state.phase = "stopping"
            await asyncio.wait([loading])
            if app.state.jobs is not None:
                await app.state.jobs.shutdown()
            if app.state.router is not None:
                app.state.router.adapters.close()
                app.state.router.grammars.close()
            if app.state.engine is not None:
                await app.state.engine.shutdown()
            for database in set(app.state.databases):
                database.close()

    api_keys = ApiKeys.load(settings.api_keys_file)  # a bad keys or policy file stops the server before it listens
    tenants = Tenants(PolicyFile.load(settings.tenant_policy_file, api_keys.tenants),
                      pool=settings.max_num_seqs + settings.max_queued_requests)
    app = FastAPI(title="swapyard", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for routes in (ops_api, api, adapter_api, alias_api, models_api, files_api, jobs_api):
        app.include_router(routes)
    # Added innermost first: CORS (preflights carry no key), then keys, then sizes, then capacity, so a
    # request without a key is refused before its body is read or it takes a place in flight.
    app.state.tenants = tenants
    app.add_middleware(TenantAdmission, tenants=tenants)
    app.add_middleware(BodyLimit, limit=int(settings.max_request_mb * 2**20),
                       upload_limit=settings.max_upload_mb * 2**20 + _MULTIPART_SLACK)
    app.add_middleware(ApiKeyGate, keys=api_keys)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app


def _on_loaded(app: FastAPI, task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        app.state.phase = "failed"
        log.error("loading the model failed; /health now answers 503", exc_info=task.exception())


def run_server(settings: ServeSettings) -> None:
    # On SIGTERM uvicorn stops listening, lets in-flight requests finish (up to the drain timeout), then
    # runs the lifespan's shutdown, which aborts whatever is left in the engine.
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=settings.drain_timeout_s, **UVICORN_HTTP)
