"""The files and fine-tuning API's bodies, in OpenAI's shapes, and how a job request becomes a TrainConfig.

A job names its method as OpenAI does (`{"type": "supervised", "supervised": {"hyperparameters": ...}}`, or
`{"type": "dpo", "dpo": {"hyperparameters": {"beta": ...}}}` for preference tuning); the adapter to train is
swapyard's extension beside the hyperparameters (`"adapter": {"type": "lora", "r": 16}`, LoRA by default).
swapyard's first shape, `{"type": "lora", "hyperparameters": {...}}`, is an alias. Every field's type, bound,
default and description is TrainConfig's, under the API's name.
"""

import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, create_model

from server.errors import APIError
from training.config import SHAPE_FIELDS, Method, TrainConfig
from training.jobs import CheckpointRecord, EventRecord, FileRecord, JobRecord

# Each kind's own fields in the API, and the TrainConfig field each one sets.
ADAPTER_FIELDS: dict[str, dict[str, str]] = {
    "lora": {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "lora_target_modules",
             "use_rslora": "use_rslora", "loraplus_lr_ratio": "loraplus_lr_ratio"},
    "prefix": {"num_virtual_tokens": "num_virtual_tokens"},
    "prompt": {"num_virtual_tokens": "num_virtual_tokens"},
    "bottleneck": {"size": "bottleneck_size", "positions": "bottleneck_positions",
                   "non_linearity": "bottleneck_non_linearity"},
}
# OpenAI's three hyperparameters (n_epochs is TrainConfig's epochs), then swapyard's.
HYPERPARAMETER_FIELDS: dict[str, str] = {
    "n_epochs": "epochs", "batch_size": "batch_size", "learning_rate_multiplier": "learning_rate_multiplier",
    **{name: name for name in ("learning_rate", "gradient_accumulation_steps", "warmup_ratio", "lr_scheduler",
                               "weight_decay", "max_seq_len", "dtype")},
}
# Adapter fields that set how it trains, not its shape (a continued adapter keeps its shape).
TRAINING_ONLY = frozenset({"loraplus_lr_ratio"})
# DPO's: OpenAI's beta, then swapyard's.
DPO_FIELDS: dict[str, str] = {**HYPERPARAMETER_FIELDS, "beta": "beta", "sft_weight": "sft_weight"}
# Fields of TrainConfig the server sets itself; no request may.
SERVER_FIELDS = frozenset({"method", "objective", "data", "validation", "out", "model", "init_adapter", "cache_dir",
                           "resume"})
# Strict: `true` is no number of epochs and "3" no batch size (lax pydantic read them as 1 and 3).
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


def _fields_of(names: dict[str, str]) -> dict[str, Any]:
    return {api: (TrainConfig.model_fields[field].annotation, TrainConfig.model_fields[field])
            for api, field in names.items()}


SupervisedHyperparameters = create_model("SupervisedHyperparameters", __config__=_STRICT,
                                         **_fields_of(HYPERPARAMETER_FIELDS))
DPOHyperparameters = create_model("DPOHyperparameters", __config__=_STRICT, **_fields_of(DPO_FIELDS))
# One model for every kind (a tagged union would put the tag into error paths); train_fields refuses a field
# of another kind.
AdapterSpec = create_model("AdapterSpec", __config__=_STRICT, type=(Method, "lora"),
                           **_fields_of({api: field for fields in ADAPTER_FIELDS.values()
                                         for api, field in fields.items()}))


class _Section(BaseModel):
    model_config = _STRICT
    adapter: AdapterSpec = AdapterSpec()
    """swapyard's extension: the kind of adapter to train (LoRA by default) and its shape."""


class Supervised(_Section):
    hyperparameters: SupervisedHyperparameters = SupervisedHyperparameters()


class DPO(_Section):
    hyperparameters: DPOHyperparameters = DPOHyperparameters()


class JobMethod(BaseModel):
    """OpenAI's `{"type": "supervised", "supervised": {...}}` or `{"type": "dpo", "dpo": {...}}`, or swapyard's
    first shape, kept as an alias: the adapter kind as the type and any training field under `hyperparameters`."""

    model_config = _STRICT
    type: Literal["supervised", "dpo", Method] = "supervised"
    supervised: Supervised | None = None
    dpo: DPO | None = None
    hyperparameters: dict[str, Any] | None = None

    def section(self) -> Supervised | DPO | None:
        """The body of the OpenAI shape this method names (None for swapyard's alias shape)."""
        if self.type == "dpo":
            return self.dpo or DPO()
        return self.supervised or Supervised() if self.type == "supervised" else None


MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class CreateJob(BaseModel):
    model_config = _STRICT
    model: str
    training_file: str  # a file id from POST /v1/files, or a server path inside --adapter-roots
    validation_file: str | None = None
    method: JobMethod = JobMethod()
    hyperparameters: SupervisedHyperparameters | None = None
    """OpenAI's deprecated place for the supervised hyperparameters."""
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    integrations: Annotated[list[Any], Field(max_length=0)] | None = None
    """OpenAI's Weights & Biases integration is not offered: none may be given."""

    def train_fields(self, start_kind: str | None = None) -> dict[str, Any]:
        """The TrainConfig fields this request sets; a 400 naming the field where it breaks a rule. `start_kind`:
        the kind of the adapter `model` names, which the job continues (its kind and shape are the job's)."""
        method = self.method
        section = method.section()
        if section is None:
            if method.supervised is not None or method.dpo is not None or self.hyperparameters is not None:
                raise APIError(400, f"method `{method.type}` takes its hyperparameters in `method.hyperparameters`",
                               param="method.supervised" if method.supervised is not None else
                               "method.dpo" if method.dpo is not None else "hyperparameters")
            hyper = dict(method.hyperparameters or {})
            if "n_epochs" in hyper:
                hyper["epochs"] = hyper.pop("n_epochs")
            if forbidden := SERVER_FIELDS & hyper.keys():
                raise APIError(400, f"hyperparameters may not set {sorted(forbidden)}", param="method.hyperparameters")
            fields = {"method": method.type, **hyper}
            if start_kind is not None and method.type != start_kind:
                raise APIError(400, f"`{self.model}` is a {start_kind} adapter: the job continues it as one",
                               param="method.type")
            if start_kind is not None and (shaped := sorted(SHAPE_FIELDS & hyper.keys())):
                raise APIError(400, f"`{self.model}` is continued in its own shape: `{shaped[0]}` cannot change it",
                               param=f"method.hyperparameters.{shaped[0]}")
        else:
            other = "dpo" if method.type == "supervised" else "supervised"
            if method.hyperparameters is not None or getattr(method, other) is not None:
                wrong = "method.hyperparameters" if method.hyperparameters is not None else f"method.{other}"
                raise APIError(400, f"{method.type} hyperparameters go in `method.{method.type}.hyperparameters`",
                               param=wrong)
            if self.hyperparameters is not None and (method.type == "dpo" or section.hyperparameters.model_fields_set):
                raise APIError(400, f"give hyperparameters in `method.{method.type}.hyperparameters` only (the "
                                    "top-level field is OpenAI's deprecated alias for supervised ones)",
                               param="hyperparameters")
            hyper, adapter = self.hyperparameters or section.hyperparameters, section.adapter
            names = DPO_FIELDS if method.type == "dpo" else HYPERPARAMETER_FIELDS
            where = f"method.{method.type}.adapter"
            if start_kind is not None:  # the job continues that adapter: its kind and shape
                if "type" in adapter.model_fields_set and adapter.type != start_kind:
                    raise APIError(400, f"`{self.model}` is a {start_kind} adapter: the job continues it as one",
                                   param=f"{where}.type")
                adapter = adapter.model_copy(update={"type": start_kind})
            own = ADAPTER_FIELDS[adapter.type]
            if foreign := sorted(adapter.model_fields_set - own.keys() - {"type"}):
                raise APIError(400, f"a {adapter.type} adapter has no field `{foreign[0]}` (its fields: "
                                    f"{', '.join(own)})", param=f"{where}.{foreign[0]}")
            if start_kind is not None and (shaped := sorted(adapter.model_fields_set - {"type", *TRAINING_ONLY})):
                raise APIError(400, f"`{self.model}` is continued in its own shape: `{shaped[0]}` cannot change it",
                               param=f"{where}.{shaped[0]}")
            fields = {"method": adapter.type, "objective": "dpo" if method.type == "dpo" else "sft",
                      **{names[k]: getattr(hyper, k) for k in hyper.model_fields_set},
                      **{own[k]: getattr(adapter, k) for k in adapter.model_fields_set if k != "type"}}
        if self.seed is not None:
            if fields.get("seed", self.seed) != self.seed:
                raise APIError(400, "`seed` and `method.hyperparameters.seed` differ; give one", param="seed")
            fields["seed"] = self.seed
        fields.setdefault("seed", secrets.randbelow(2**31))  # as OpenAI: one is drawn when none is given
        return fields

    def param_of(self, field: str) -> str:
        """The request path of TrainConfig field `field`, for error messages."""
        kind = self.method.type
        if kind not in ("supervised", "dpo"):
            return f"method.hyperparameters.{field}"
        api = {v: k for k, v in DPO_FIELDS.items()}.get(field, field)
        where = "hyperparameters" if self.hyperparameters is not None else f"method.{kind}.hyperparameters"
        return f"{where}.{api}"


def train_config(request: CreateJob, start_kind: str | None = None, **server_fields: Any) -> TrainConfig:
    try:
        # Strict, as the request models are: the alias shape's hyperparameters arrive as a plain dict.
        return TrainConfig.model_validate({**request.train_fields(start_kind), **server_fields}, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = request.param_of(str(first["loc"][0])) if first["loc"] else "method"
        raise APIError(400, f"{param}: {first['msg']}", param=param) from exc


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def of(cls, r: FileRecord) -> "FileObject":
        return cls(id=r.id, bytes=r.bytes, created_at=r.created_at, filename=r.filename, purpose=r.purpose)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    status: str
    method: dict
    hyperparameters: dict
    """OpenAI's three (each "auto" until the training file is validated) and swapyard's training fields."""
    training_file: str
    validation_file: str | None
    result_files: list[str]
    fine_tuned_model: str | None
    error: JobError | None
    trained_tokens: int | None
    created_at: int
    finished_at: int | None
    estimated_finish: int | None = None
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    organization_id: str = "swapyard"
    integrations: list = []

    @classmethod
    def of(cls, r: JobRecord) -> "JobObject":
        config = TrainConfig.model_validate(r.config)
        kind = "dpo" if config.objective == "dpo" else "supervised"
        hyper = {api: getattr(config, field)
                 for api, field in (DPO_FIELDS if kind == "dpo" else HYPERPARAMETER_FIELDS).items()}
        hyper |= r.hyperparameters or {}
        # A continued adapter's shape is its own, not the config's defaults: only what the job set is shown.
        shown = {api: field for api, field in ADAPTER_FIELDS[config.method].items()
                 if config.init_adapter is None or api in TRAINING_ONLY}
        adapter = {"type": config.method, **{api: getattr(config, field) for api, field in shown.items()}}
        return cls(id=r.id, model=r.model, status=r.status, hyperparameters=hyper,
                   method={"type": kind, kind: {"hyperparameters": hyper, "adapter": adapter}},
                   training_file=r.training_file, validation_file=r.validation_file, result_files=r.result_files,
                   fine_tuned_model=r.fine_tuned_model, error=JobError(**r.error) if r.error else None,
                   trained_tokens=r.trained_tokens, created_at=r.created_at, finished_at=r.finished_at,
                   seed=config.seed, suffix=r.suffix, metadata=r.metadata)


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict | None
    type: Literal["message", "metrics"]

    @classmethod
    def of(cls, r: EventRecord) -> "EventObject":
        kind = "metrics" if r.data and "train_loss" in r.data else "message"
        return cls(id=f"ftevent-{r.seq}", created_at=r.created_at, level=r.level, message=r.message, data=r.data,
                   type=kind)


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str  # the checkpoint's folder: registrable with POST /v1/adapters
    fine_tuning_job_id: str
    step_number: int
    metrics: dict

    @classmethod
    def of(cls, r: CheckpointRecord) -> "CheckpointObject":
        return cls(id=f"ftckpt-{r.seq}", created_at=r.created_at, fine_tuned_model_checkpoint=r.path,
                   fine_tuning_job_id=r.job_id, step_number=r.step, metrics={**r.metrics, "epoch": r.epoch})


class Page(BaseModel):
    object: Literal["list"] = "list"
    data: list
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, items: list, limit: int) -> "Page":
        """A page from `limit + 1` items (the extra one only says whether more follow)."""
        data = items[:limit]
        return cls(data=data, has_more=len(items) > limit, first_id=data[0].id if data else None,
                   last_id=data[-1].id if data else None)
