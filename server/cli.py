"""`swapyard` command line: subcommands parsed by pydantic-settings from the typed settings."""

import json
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand, SettingsConfigDict

from adapters.base import AdapterError
from server.database import Database, url_from_env
from server.default_model import ensure_default_model
from server.settings import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, ServeSettings, adapters_dir
from training.config import TrainConfig


class Serve(ServeSettings):
    """Serve the base model over an OpenAI-compatible HTTP API."""

    def cli_cmd(self) -> None:
        from server.app import run_server

        run_server(self)


class PrepareModel(BaseModel):
    """Convert the embedded default model to an HF folder in the cache (idempotent)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    cache_dir: Path = DEFAULT_CACHE_DIR
    """Cache folder to write `models/smollm2-135m-instruct` into."""

    def cli_cmd(self) -> None:
        print(ensure_default_model(self.cache_dir))


class Train(TrainConfig):
    """Train a LoRA, prefix, prompt or bottleneck adapter on chat JSONL."""

    def cli_cmd(self) -> None:
        from training.recipe import train

        summary = train(TrainConfig.model_validate(self.model_dump()))
        print(json.dumps(summary, indent=2))
        print(f"adapter written to {self.out}")


class Merge(BaseModel):
    """Fold a LoRA adapter into the base weights and write a standalone HF model folder."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    adapter: CliPositionalArg[str]
    """An adapter folder, or the name of a registered adapter."""
    out: Path
    """Folder to write the merged model to."""
    model: Path | None = None
    """Base model folder (default: the embedded SmolLM2-135M-Instruct)."""
    cache_dir: Path = DEFAULT_CACHE_DIR
    """Where the default model is converted to (as `serve --cache-dir`)."""
    data_dir: Path = DEFAULT_DATA_DIR
    """The server's data folder, whose registry names are looked up in (as `serve --data-dir`)."""
    database_url: str | None = Field(default_factory=url_from_env)
    """The registry's database, as `serve --database-url` (default: an SQLite file in the adapter store)."""

    def cli_cmd(self) -> None:
        from adapters.merge import merge_lora
        from adapters.registry import AdapterRegistry

        folder = Path(self.adapter)
        if not folder.is_dir():
            registry = AdapterRegistry(adapters_dir(self.data_dir),
                                       Database(self.database_url) if self.database_url else None)
            record = registry.get(self.adapter)
            if record is None:
                raise SystemExit(f"{self.adapter}: neither an adapter folder nor a registered adapter")
            folder = registry.path(record)
        try:
            print(merge_lora(self.model or ensure_default_model(self.cache_dir), folder, self.out))
        except AdapterError as exc:
            raise SystemExit(f"{self.adapter}: {exc}") from exc


class Swapyard(BaseSettings):
    """One base model, many hot-swappable adapters."""

    model_config = SettingsConfigDict(
        cli_prog_name="swapyard", cli_kebab_case=True, cli_implicit_flags=True, use_attribute_docstrings=True
    )

    # Each subcommand's one-line help is its class docstring.
    serve: CliSubCommand[Serve] = Field(description=Serve.__doc__)
    prepare_model: CliSubCommand[PrepareModel] = Field(description=PrepareModel.__doc__)
    train: CliSubCommand[Train] = Field(description=Train.__doc__)
    merge: CliSubCommand[Merge] = Field(description=Merge.__doc__)

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    CliApp.run(Swapyard)
