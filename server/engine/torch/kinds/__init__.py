"""How each adapter kind lives in the torch engine: one module per kind, each a `TorchKind` that places the
kind's weights, frees them, binds its rows for a forward pass and hooks admission or embedding where the kind
needs to. Adding a kind is adding a module here and its class to `KINDS`."""

from server.engine.torch.kinds.base import TorchKind
from server.engine.torch.kinds.bottleneck import BottleneckKind
from server.engine.torch.kinds.lora import LoraKind
from server.engine.torch.kinds.prefix import PrefixKind
from server.engine.torch.kinds.prompt import PromptKind

KINDS: tuple[type[TorchKind], ...] = (LoraKind, PrefixKind, PromptKind, BottleneckKind)
