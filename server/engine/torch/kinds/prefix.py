"""Prefix tuning in the torch engine: the learned keys/values written into a sequence's first cache
positions at admission; nothing inside the model."""

from dataclasses import replace

from adapters.prefix import PrefixAdapter
from server.engine.torch.kinds.base import TorchKind


class PrefixKind(TorchKind):
    kind = PrefixAdapter.kind

    def place(self, resident) -> None:
        adapter, bank = resident.adapter, self.bank
        # In the KV cache's precision: they go straight into it.
        resident.adapter = replace(adapter, keys=bank.cast(adapter.keys, "prompt_embeddings", bank.kv_dtype),
                                   values=bank.cast(adapter.values, "prompt_embeddings", bank.kv_dtype))

    def admit(self, resident, blocks, cache) -> bool:
        cache.write(blocks, resident.adapter.keys, resident.adapter.values)
        return True
