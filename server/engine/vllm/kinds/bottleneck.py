"""Bottleneck adapters in the vLLM engine: an all-zero LoRA gives each request a LoRA slot, and a hooked op in
the model adds the bottleneck of each token's slot (server/engine/vllm/bottleneck.py)."""

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vllm.lora.request import LoRARequest

from adapters.base import AdapterError
from adapters.bottleneck import BottleneckAdapter
from adapters.lora import LoraAdapter
from server.engine.vllm.bottleneck import ATTN, LAYERS, MLP
from server.engine.vllm.kinds.base import Served

if TYPE_CHECKING:
    from server.engine.vllm.engine import VLLMEngine


@dataclass
class ServedBottleneck(Served):
    """Its requests carry an all-zero LoRA: vLLM batches and maps them like any LoRA's, and the hooked op
    (vllm/bottleneck.py) adds the bottleneck to the rows of that LoRA's slot."""

    runs_own_worker_code = True
    lora: LoraAdapter = field()
    request: LoRARequest = field()
    bottleneck: BottleneckAdapter = field()
    compensated: LoRARequest | None = None

    @classmethod
    def check(cls, engine: "VLLMEngine", adapter: BottleneckAdapter) -> None:
        c = adapter.config
        for name, module, hooked in (("layers_module", c.layers_module, LAYERS),
                                     ("attn_module", c.attn_module, ATTN), ("mlp_module", c.mlp_module, MLP)):
            if module != hooked:
                raise AdapterError(name, f"`{module}`: the vLLM engine hooks bottlenecks into `{hooked}` "
                                          f"(as `{LAYERS}.N.{ATTN}` and `{LAYERS}.N.{MLP}`)")
        engine.check_compensated_rank(engine.zero_lora)

    @classmethod
    async def load(cls, engine: "VLLMEngine", name: str, adapter: BottleneckAdapter,
                   folder: Path) -> "ServedBottleneck":
        served = cls(engine.zero_lora, await engine.write_lora(name, engine.zero_lora.scaled()), adapter)
        await served.attach(engine, served.request.lora_int_id)
        return served

    async def attach(self, engine: "VLLMEngine", lora_id: int) -> None:
        folder = engine.folder(lora_id) / "bottleneck"
        await asyncio.to_thread(self.bottleneck.save, folder)
        await engine.to_worker(lora_id, "bottleneck", str(folder))
