"""The hooks an adapter kind gives the torch engine's AdapterBank; each default does nothing."""

from typing import TYPE_CHECKING

import torch

from adapters.base import AdapterError

if TYPE_CHECKING:
    from server.engine.torch.adapter_bank import AdapterBank, Resident
    from server.engine.torch.kv_cache import PagedKVCache


class TorchKind:
    kind: str  # the adapters' `kind`

    def __init__(self, bank: "AdapterBank"):
        self.bank = bank

    def place(self, resident: "Resident") -> None:
        """Put the adapter's weights where its rows find them, cast once here (not at every step). Raises
        AdapterCapacityError when the kind's places are full, AdapterError when the weights do not fit."""

    def free(self, resident: "Resident") -> None:
        """Give back what `place` took, zeroed (a batch's range may span it)."""

    def bind(self, residents: list["Resident | None"], chunks: list[slice]) -> None:
        """Point each row of the next forward pass at its adapter's weights (None: the base, or the merged
        LoRA's rows). `chunks`: row ranges of a packed step after all its other rows, one sequence's prefill
        tokens each."""

    def admit(self, resident: "Resident", blocks: list[int], cache: "PagedKVCache") -> bool:
        """At admission, with the sequence's blocks: True when the kind wrote its virtual positions' keys and
        values itself (they are not computed by a forward pass)."""
        return False

    def soft_prompt(self, resident: "Resident") -> torch.Tensor | None:
        """The input embeddings of its virtual positions, when the kind feeds them as embeddings."""
        return None

    def fold(self, resident: "Resident") -> None:
        """Fold the adapter into the base weights (merge), or refuse."""
        raise AdapterError("name", f"only LoRA adapters fold into the weights; `{resident.name}` is {self.kind}")

    def unfold(self) -> None:
        """Restore the base weights exactly."""
