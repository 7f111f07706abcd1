"""`swapyard` command line: subcommands parsed by pydantic-settings from the typed settings."""

import json
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from pydantic_settings import BaseSettings, CliApp, CliSubCommand, SettingsConfigDict

from server.default_model import ensure_default_model
from server.settings import DEFAULT_CACHE_DIR, ServeSettings
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


class Swapyard(BaseSettings):
    """One base model, many hot-swappable adapters."""

    model_config = SettingsConfigDict(
        cli_prog_name="swapyard", cli_kebab_case=True, cli_implicit_flags=True, use_attribute_docstrings=True
    )

    serve: CliSubCommand[Serve]
    prepare_model: CliSubCommand[PrepareModel]
    train: CliSubCommand[Train]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    CliApp.run(Swapyard)
