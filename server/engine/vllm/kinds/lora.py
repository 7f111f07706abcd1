"""LoRA in the vLLM engine: vLLM's own multi-LoRA kernels, from the engine's own copy of the files."""

import asyncio
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vllm.lora.request import LoRARequest

from adapters.lora import LoraAdapter
from server.engine.vllm.kinds.base import Served

if TYPE_CHECKING:
    from server.engine.vllm.engine import VLLMEngine


@dataclass
class ServedLora(Served):
    lora: LoraAdapter = field()  # field(): required, not the default Served gives
    request: LoRARequest = field()
    compensated: LoRARequest | None = None
    folds = True

    @classmethod
    def check(cls, engine: "VLLMEngine", adapter: LoraAdapter) -> None:
        engine.check_compensated_rank(adapter)

    @classmethod
    async def load(cls, engine: "VLLMEngine", name: str, adapter: LoraAdapter, folder: Path) -> "ServedLora":
        # vLLM reads the files again whenever its host cache dropped the LoRA, so they must outlive the
        # registry's version folder (removed at the replace's commit): the engine's own copy goes with the id.
        lora_id = engine.new_id()
        await asyncio.to_thread(shutil.copytree, folder, engine.folder(lora_id))
        return cls(adapter, await engine.add_lora(name, str(engine.folder(lora_id)), lora_id))
