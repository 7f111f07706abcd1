"""Typed training configuration; field docstrings are `swapyard train --help`."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from server.settings import DEFAULT_CACHE_DIR

Method = Literal["lora", "prefix", "prompt", "bottleneck"]
MAX_LORA_RANK = 512
# The fields that shape an adapter (a run that continues one keeps its shape instead).
SHAPE_FIELDS = frozenset({"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora",
                          "num_virtual_tokens", "bottleneck_size", "bottleneck_positions", "bottleneck_non_linearity"})
Auto = Literal["auto"]


class TrainConfig(BaseModel):
    # Every number is bounded (and finite): fine-tuning jobs take these from clients.
    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid", allow_inf_nan=False)

    method: Method
    """Adapter kind to train."""
    objective: Literal["sft", "dpo"] = "sft"
    """sft: learn the answers in the data. dpo: learn to prefer one answer of each pair over the other (direct
    preference optimisation), against the starting model's own preferences."""
    data: Path
    """Training data, JSONL. sft: one {"messages": [...]} (OpenAI chat) or {"prompt", "completion"} per line. dpo:
    one {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]} (OpenAI's
    preference format) or {"prompt", "chosen", "rejected"} (TRL's) per line."""
    out: Path
    """Output folder: the adapter, metrics.jsonl, loss.png, README.md and checkpoints/."""
    validation: Path | None = None
    """Validation data in the same format; evaluated after every epoch."""
    model: Path | None = None
    """Base model folder (default: the embedded SmolLM2-135M-Instruct)."""
    init_adapter: Path | None = None
    """Continue training this adapter (a folder of the method's kind, on the same base) instead of a new one: its
    shape replaces the method's shape options, and with DPO it is also the reference (e.g. DPO after SFT)."""
    epochs: Annotated[int, Field(gt=0, le=100)] | Auto = "auto"
    """auto: 3, raised to reach 50 optimizer steps (at most 25), lowered to stay under 25,000 examples seen."""
    batch_size: Annotated[int, Field(gt=0, le=256)] | Auto = "auto"
    """auto: the power of two nearest the square root of the number of examples, from 1 to 32."""
    gradient_accumulation_steps: int = Field(1, gt=0, le=1024)
    """Batches whose gradients add up to one optimizer step."""
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=10)] | Auto = "auto"
    """Scales the method's base learning rate (auto: 1)."""
    learning_rate: Annotated[float, Field(gt=0, le=1)] | Auto = "auto"
    """Peak learning rate; auto: the method's base (lora 1e-3, prefix 3e-2, prompt 3e-2, bottleneck 1e-3 at
    8 examples a step) times sqrt(examples a step / 8) times the multiplier. Give this or the multiplier."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Share of the optimizer steps over which the learning rate rises linearly to its peak."""
    beta: Annotated[float, Field(gt=0, le=10)] | Auto = "auto"
    """DPO: how far the model may move from the reference's preferences (smaller: further); auto: 0.1."""
    sft_weight: Annotated[float, Field(ge=0, le=10)] | Auto = "auto"
    """DPO: weight of an extra next-token loss on each preferred answer (TRL's rpo_alpha; 0: pure DPO); auto: 1,
    the RPO paper's, which keeps the preferred answers likely as the model learns to rank them."""
    loraplus_lr_ratio: float | None = Field(None, ge=1, le=1000)
    """LoRA: train each B matrix at this many times the learning rate of the A matrices (LoRA+; 16 is the
    paper's suggestion); default: one rate."""
    lr_scheduler: Literal["cosine", "linear"] = "cosine"
    """How the learning rate decays after the warmup."""
    weight_decay: float = Field(0.0, ge=0, le=1)
    """AdamW's weight decay."""
    max_seq_len: int = Field(1024, gt=8, le=32768)
    """Longer examples are truncated (with a warning naming their line)."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seeds initialization, shuffling and dropout."""
    lora_r: int = Field(8, gt=0, le=MAX_LORA_RANK)
    """LoRA: rank."""
    lora_alpha: float = Field(16, gt=0, le=10_000)
    """LoRA: alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA: dropout on the adapter's input."""
    lora_target_modules: Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=64)] | \
        Literal["all-linear"] = "all-linear"
    """LoRA: the linear layers to adapt, by module name (q_proj, v_proj, ...), or every linear layer."""
    use_rslora: bool = False
    """LoRA: rank-stabilized scaling, alpha / sqrt(r)."""
    num_virtual_tokens: int = Field(16, gt=0, le=1024)
    """Prefix and prompt tuning: learned positions before the prompt."""
    bottleneck_size: int = Field(16, gt=0, le=8192)
    """Bottleneck: width of the down projection."""
    bottleneck_positions: list[Literal["attn", "mlp"]] = ["attn", "mlp"]
    """Bottleneck: sublayer outputs it adds to (both: Houlsby's placement; mlp alone: Pfeiffer's)."""
    bottleneck_non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Bottleneck: activation between the down and up projections."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The frozen base's compute dtype (auto: bfloat16 on CPUs with bf16 matmul hardware and on GPUs that have
    it, else float32); the adapter's own weights always train in float32."""
    resume: bool = True
    """Continue from the last epoch checkpoint in `out` when one is there."""
    cache_dir: Path = DEFAULT_CACHE_DIR
    """Where the default model is converted to (see `swapyard prepare-model`)."""

    @field_validator("learning_rate")
    @classmethod
    def _one_learning_rate_knob(cls, value: float | str, info: ValidationInfo) -> float | str:
        if value != "auto" and info.data.get("learning_rate_multiplier", "auto") != "auto":
            raise ValueError("give learning_rate or learning_rate_multiplier, not both")
        return value

    @field_validator("beta", "sft_weight")
    @classmethod
    def _dpo_only(cls, value: float | str, info: ValidationInfo) -> float | str:
        if value != "auto" and info.data.get("objective") != "dpo":
            raise ValueError(f"{info.field_name} applies to DPO only (objective dpo; method type `dpo` in a job)")
        return value

    @field_validator("loraplus_lr_ratio")
    @classmethod
    def _lora_only(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("method") != "lora":
            raise ValueError("loraplus_lr_ratio applies to LoRA adapters only")
        return value
