"""How each adapter kind runs inside vLLM: one module per kind, each a subclass of `Served`. Adding a kind is
adding a module here and its class to `KINDS`."""

from adapters.bottleneck import BottleneckAdapter
from adapters.lora import LoraAdapter
from adapters.prefix import PrefixAdapter
from adapters.prompt import PromptAdapter
from server.engine.vllm.kinds.base import Served
from server.engine.vllm.kinds.bottleneck import ServedBottleneck
from server.engine.vllm.kinds.lora import ServedLora
from server.engine.vllm.kinds.prefix import ServedPrefix
from server.engine.vllm.kinds.prompt import ServedPrompt

BASE = Served()  # the base model's requests
KINDS: dict[str, type[Served]] = {LoraAdapter.kind: ServedLora, BottleneckAdapter.kind: ServedBottleneck,
                                  PromptAdapter.kind: ServedPrompt, PrefixAdapter.kind: ServedPrefix}
