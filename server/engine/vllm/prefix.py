"""Prefix tuning inside vLLM's paged KV cache, through vLLM's KV connector API.

A request for a prefix adapter reaches vLLM as `num_virtual_tokens` placeholder tokens (copies of the
prompt's first token: never embedded, and no new token for repetition penalties) and then its prompt,
with `kv_transfer_params` naming the adapter's K/V. The scheduler side of this connector reports the
placeholders as externally computed; the worker side writes the adapter's keys and values into the
blocks vLLM allocated for them, through the attention backend's own cache write (so the layout is the
platform's, CPU or CUDA). The prompt's positions start after the placeholders, as PEFT offsets them, and
its attention reads the adapter's K/V from the cache like any earlier token's. A preempted request is
loaded again when it is scheduled again; a salt per adapter version keeps vLLM's prefix cache from
sharing these blocks across adapters or versions.

The adapters' K/V stay in the worker's host memory (`PREFIX_KV`), registered and dropped by the worker
extension (vllm/worker.py) over collective_rpc, each worker keeping its tensor-parallel share of the heads.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata
from vllm.model_executor.models.utils import extract_layer_index

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

PARAMS_KEY = "swapyard_prefix"  # kv_transfer_params: {PARAMS_KEY: prefix id, "num_virtual_tokens": n}

# prefix id -> (keys, values), each (layers, kv_heads of this rank, virtual, head_dim), in the worker.
PREFIX_KV: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def add_prefix(prefix_id: int, file: str, dtype: torch.dtype) -> None:
    tensors = load_file(file)
    PREFIX_KV[prefix_id] = tuple(_this_ranks_heads(tensors[key]).to(dtype).contiguous() for key in ("keys", "values"))


def _this_ranks_heads(kv: torch.Tensor) -> torch.Tensor:
    """The KV heads (dim 1) this tensor-parallel rank's cache holds: its share, or with more ranks than
    heads the one head vLLM replicates onto it."""
    ranks, rank, heads = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank(), kv.shape[1]
    if ranks <= heads:
        return kv.chunk(ranks, dim=1)[rank]
    return kv[:, [rank // (ranks // heads)]]


def drop_prefix(prefix_id: int) -> None:
    PREFIX_KV.pop(prefix_id, None)


def held_bytes() -> int:
    return sum(t.nbytes for kv in PREFIX_KV.values() for t in kv)


@dataclass
class _Load:
    prefix_id: int
    first: int  # the first virtual position to write (those before it were found in vLLM's prefix cache)
    slots: torch.Tensor  # (virtual - first,) cache slots of positions first..virtual-1


@dataclass
class PrefixLoads(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)


def prefix_of(request: "Request") -> tuple[int, int] | None:
    """(prefix id, virtual tokens) when the request is for a prefix adapter."""
    params = request.kv_transfer_params or {}
    return (params[PARAMS_KEY], params["num_virtual_tokens"]) if PARAMS_KEY in params else None


class PrefixConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._pending: list[_Load] = []

    # Scheduler side (the engine core process).

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        prefix = prefix_of(request)
        return (max(0, prefix[1] - num_computed_tokens) if prefix else 0), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        prefix_id, virtual = prefix_of(request)
        positions = torch.arange(virtual - num_external_tokens, virtual)
        block_ids = torch.tensor(blocks.get_block_ids()[0])
        slots = block_ids[positions // self._block_size] * self._block_size + positions % self._block_size
        self._pending.append(_Load(prefix_id, virtual - num_external_tokens, slots))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        loads, self._pending = self._pending, []
        return PrefixLoads(loads)

    # Worker side.

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        loads = self._get_connector_metadata().loads
        if not loads:
            return
        for name, layer in forward_context.no_compile_layers.items():
            cache = getattr(layer, "kv_cache", None)
            if cache is None or not hasattr(layer, "impl"):
                continue
            index = extract_layer_index(name)
            for load in loads:
                keys, values = PREFIX_KV[load.prefix_id]
                # (kv_heads, n, head_dim) -> (n, kv_heads, head_dim), the rows the backend's cache write takes.
                key, value = (t[index, :, load.first:].transpose(0, 1).to(cache.device).contiguous()
                              for t in (keys, values))
                layer.impl.do_kv_cache_update(layer, key, value, cache, load.slots.to(cache.device))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return
