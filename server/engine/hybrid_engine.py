"""vLLM for LoRAs and soft prompts, a torch engine beside it for prefix and bottleneck adapters: the opt-in
fallback (--torch-beside-vllm) to serving those inside vLLM.

The torch engine starts on the first such adapter, so a LoRA-only deployment pays nothing for it. It
holds its own copy of the base weights (the model's size again: 0.5 GB for SmolLM2-135M in float32,
16 GB for an 8B model in bfloat16) and its own KV cache (up to --kv-cache-memory-gb), on the same device.
"""

import asyncio
from contextlib import aclosing
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from adapters.loading import Adapter
from server.engine.base import Engine, GenerationOutput, GenerationRequest
from server.engine.residency import AdapterRef

class HybridEngine:
    def __init__(self, main: Engine, build_side: Callable[[], Engine], side_kinds: set[str]):
        """`side_kinds`: the adapter kinds the engine `build_side` makes serves instead of `main`."""
        self.max_model_len = main.max_model_len
        self._side_kinds = side_kinds
        self._main, self._build_side = main, build_side
        self._side: Engine | None = None
        self._side_started = asyncio.Lock()

    @property
    def failure(self) -> str | None:
        return self._main.failure or (self._side.failure if self._side is not None else None)

    @property
    def merged(self) -> str | None:
        return self._main.merged  # the torch engine holds no LoRA: its base stays as it is

    @property
    def is_restarting(self) -> bool:
        return self._main.is_restarting

    async def start(self) -> None:
        await self._main.start()

    async def shutdown(self) -> None:
        if self._side is not None:
            await self._side.shutdown()
        await self._main.shutdown()

    async def read_adapter(self, folder: Path) -> Adapter:
        return await self._main.read_adapter(folder)

    def check_adapter(self, adapter: Adapter) -> None:
        if adapter.kind not in self._side_kinds:
            self._main.check_adapter(adapter)

    def engine_for(self, kind: str) -> str:
        return "torch" if kind in self._side_kinds else self._main.engine_for(kind)

    async def add_adapter(self, ref: AdapterRef, adapter: Adapter) -> None:
        is_side = ref.kind in self._side_kinds
        engine, other = (await self._side_engine(), self._main) if is_side else (self._main, self._side)
        await engine.add_adapter(ref, adapter)
        if other is not None:  # a new kind under an old name: the other engine lets the old version go
            if other.merged == ref.name:
                await other.unmerge_adapter()
            await other.remove_adapter(ref.name)

    async def remove_adapter(self, name: str) -> None:
        for engine in filter(None, (self._main, self._side)):
            await engine.remove_adapter(name)

    def tier(self, ref: AdapterRef) -> str:
        if ref.kind in self._side_kinds:
            return self._side.tier(ref) if self._side is not None else "disk"
        return self._main.tier(ref)

    async def merge_adapter(self, ref: AdapterRef) -> None:
        await self._main.merge_adapter(ref)

    async def unmerge_adapter(self) -> None:
        await self._main.unmerge_adapter()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        is_side = request.adapter is not None and request.adapter.kind in self._side_kinds
        engine = await self._side_engine() if is_side else self._main  # a replica may have registered it
        async with aclosing(engine.generate(request)) as outputs:
            async for out in outputs:
                yield out

    async def _side_engine(self) -> Engine:
        async with self._side_started:
            if self._side is None:
                side = await asyncio.to_thread(self._build_side)  # loads the model: off the event loop
                await side.start()
                self._side = side
        return self._side
