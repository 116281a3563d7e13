"""Training configuration: the `TrainConfig` dataclass, TOML files and `--set` overrides.

A run is described by two dataclasses: the architecture (`longcat.config.ModelConfig`) and the
recipe (`TrainConfig`). A TOML file holds a `[model]` table (optionally `preset = "small"` plus
fields) and a `[train]` table. Command-line overrides name the table: `model.hidden_size=128`,
`train.lr=1e-3`; a bare name is accepted when it belongs to exactly one of the two. Unknown or
ill-typed names raise `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config import ConfigError, ModelConfig, from_dict, preset


@dataclass
class TrainConfig:
    """The training recipe (DESIGN §3). Every field can be set with `--set train.NAME=VALUE`."""

    # --- data --------------------------------------------------------------------------------------
    data: str | None = None  # text/jsonl file or directory; None = the embedded corpus
    text_field: str = "text"  # jsonl key holding the document text
    tokenizer: str | None = None  # tokenizer.json to use; None = train one (vocab = model.vocab_size)
    max_bytes: int | None = None  # cap on corpus bytes read (None = all)
    cache_dir: str | None = None  # token cache; None = OUT/cache
    # --- length of the run ---------------------------------------------------------------------------
    seed: int = 0
    steps: int = 1000  # optimizer steps (an upper bound when time_budget is set)
    time_budget: float = 0.0  # seconds of training; 0 = no limit. The LR schedule follows it (see optim.py)
    # --- batch ---------------------------------------------------------------------------------------
    seq_len: int = 256
    micro_batch: int = 16  # sequences per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    # --- optimizer and schedule ----------------------------------------------------------------------
    optimizer: str = "adamw"  # "adamw" or "muon" (Muon for hidden matrices, AdamW for the rest)
    lr: float = 3e-3  # peak LR; Muon uses the same value through its RMS-matching LR adjustment
    min_lr_ratio: float = 0.0  # LR at the end of the decay, as a fraction of the peak
    warmup_steps: int = 50
    decay_fraction: float = 0.3  # last share of the run over which the LR decays linearly
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8  # AdamW epsilon (LongCat used tiny values such as 1e-16)
    weight_decay: float = 0.1
    muon_momentum: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    # --- auxiliary losses ----------------------------------------------------------------------------
    mtp_weight: float = 0.3  # weight of the mean MTP loss over depths
    z_loss: float = 1e-5  # hidden z-loss: z_loss * mean(h^2) of the last layer's output (pre-norm)
    balance_loss: float = 0.0  # coefficient of the router balance loss (0 = aux-loss-free only)
    indexer_loss_weight: float = 1.0  # LSA indexer KL loss (its graph is detached from the model)
    lsa_dense_warmup_steps: int = 0  # steps of dense attention while the indexer warms up
    # --- router bias (auxiliary-loss-free balancing with the zero-expert budget) ---------------------
    router_bias_rate: float = 1e-3  # mu; 0 disables the update
    router_bias_update: str = "sign"  # "sign": mu*sign(target-observed); "diff": mu*(target-observed)
    # --- precision and threads -----------------------------------------------------------------------
    precision: str = "auto"  # "bf16" (autocast, fp32 master weights), "fp32", or "auto"
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default. Exact resume needs the same
    device: str = "auto"  # "cpu", "cuda", ... or "auto"
    deterministic: bool = True  # torch.use_deterministic_algorithms (exact resume)
    # --- stability guard -----------------------------------------------------------------------------
    max_skipped_steps: int = 10  # stop after this many consecutive non-finite steps
    # --- evaluation, samples, logging ----------------------------------------------------------------
    eval_every: int = 100  # optimizer steps between held-out evaluations (0 = only at the end)
    eval_batches: int = 8
    sample_every: int = 0  # steps between sample texts (0 = only at the end)
    sample_tokens: int = 48
    sample_prompt: str = "The"
    sample_temperature: float = 0.8
    log_every: int = 10  # steps between console lines when there is no live progress bar
    progress: bool = True  # live rich progress bar
    tensorboard: bool = True  # TensorBoard event files when tensorboard is installed
    peak_tflops: float = 0.0  # MFU denominator per device (times the rank count); 0 = measure a GEMM peak at start
    # --- long-context stages (train/stages.py, docs/LONG_CONTEXT.md) ---------------------------------
    stage: str = "pretrain"  # "pretrain", "finetune", "yarn", "indexer-warmup" or "sparse"
    init_from: str | None = None  # run or checkpoint directory whose weights start the stage (new run)
    freeze: str = "none"  # "none", or "all-but-indexer": only the LSA indexers train
    retrieval_ratio: float = 0.0  # share of training rows replaced by synthetic retrieval examples
    retrieval_tasks: str = "passkey,niah_single,niah_multikey,vt"  # tasks of those rows
    # --- checkpoints ---------------------------------------------------------------------------------
    checkpoint_every: int = 200  # steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 3  # keep the newest k complete checkpoints

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types(self, "train")
        checks = [
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.time_budget >= 0, "time_budget", "must be >= 0"),
            (self.seq_len >= 2, "seq_len", "must be >= 2"),
            (self.micro_batch >= 1, "micro_batch", "must be >= 1"),
            (self.grad_accum >= 1, "grad_accum", "must be >= 1"),
            (self.optimizer in ("adamw", "muon"), "optimizer", "must be 'adamw' or 'muon'"),
            (self.lr > 0, "lr", "must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (0 <= self.decay_fraction <= 1, "decay_fraction", "must be in [0, 1]"),
            (self.grad_clip >= 0, "grad_clip", "must be >= 0"),
            (self.router_bias_update in ("sign", "diff"), "router_bias_update", "must be 'sign' or 'diff'"),
            (self.precision in ("auto", "bf16", "fp32"), "precision", "must be 'auto', 'bf16' or 'fp32'"),
            (self.threads >= 0, "threads", "must be >= 0"),
            (self.max_skipped_steps >= 1, "max_skipped_steps", "must be >= 1"),
            (self.eval_every >= 0, "eval_every", "must be >= 0"),
            (self.eval_batches >= 1, "eval_batches", "must be >= 1"),
            (self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1"),
            (self.peak_tflops >= 0, "peak_tflops", "must be >= 0"),
            (self.stage in ("pretrain", "finetune", "yarn", "indexer-warmup", "sparse"), "stage",
             "must be 'pretrain', 'finetune', 'yarn', 'indexer-warmup' or 'sparse'"),
            (self.freeze in ("none", "all-but-indexer"), "freeze", "must be 'none' or 'all-but-indexer'"),
            (0 <= self.retrieval_ratio <= 1, "retrieval_ratio", "must be in [0, 1]"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ConfigError(f"train config field '{name}' {rule}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "TrainConfig":
        return train_from_dict({**self.to_dict(), **overrides})


@dataclass
class RunConfig:
    """Everything that defines a training run: architecture plus recipe."""

    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


# ---------------------------------------------------------------------------------------------------
# types


def _allowed_types(hint: Any) -> tuple[type, ...]:
    """`int | None` -> (int, NoneType); `float` -> (float,)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(typing.get_args(hint))
    return (hint,)


def _type_name(hint: Any) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in _allowed_types(hint))


def _check_types(obj: Any, table: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        allowed = _allowed_types(hints[f.name])
        if value is None and type(None) in allowed:
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, f.name, float(value))
            continue
        if int in allowed and isinstance(value, float) and value.is_integer() and float not in allowed:
            setattr(obj, f.name, int(value))
            continue
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, tuple(t for t in allowed if t is not type(None)))
        if not ok:
            raise ConfigError(
                f"{table} config field '{f.name}' must be {_type_name(hints[f.name])}, got {value!r} "
                f"({type(value).__name__})"
            )


def _parse_value(raw: str, hint: Any, where: str) -> Any:
    """A command-line string -> a value of the field's type."""
    allowed = _allowed_types(hint)
    if type(None) in allowed and raw.lower() in ("none", "null", ""):
        return None
    for kind in allowed:
        if kind is type(None):
            continue
        try:
            if kind is bool:
                if raw.lower() in ("true", "1", "yes", "on"):
                    return True
                if raw.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(raw)
            if kind is int:
                value = float(raw)
                if not value.is_integer():
                    raise ValueError(raw)
                return int(value)
            if kind is float:
                return float(raw)
            return kind(raw)
        except ValueError:
            continue
    raise ConfigError(f"{where}: value '{raw}' is not a valid {_type_name(hint)}")


def train_from_dict(values: dict[str, Any], *, source: str = "train config") -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown field(s) in {source}: {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}"
        )
    return TrainConfig(**values)


# ---------------------------------------------------------------------------------------------------
# building a RunConfig from presets, files and overrides

_MODEL_HINTS = typing.get_type_hints(ModelConfig)
_TRAIN_HINTS = typing.get_type_hints(TrainConfig)


def split_overrides(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`["model.hidden_size=128", "train.lr=1e-3", "seq_len=64"]` -> (model fields, train fields)."""
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like model.FIELD=VALUE or train.FIELD=VALUE")
        name, raw = item.split("=", 1)
        name = name.strip().replace("-", "_")
        table, _, field_name = name.rpartition(".")
        if table not in ("", "model", "train"):
            raise ConfigError(f"override '{item}': the table must be 'model' or 'train', got '{table}'")
        in_model, in_train = field_name in _MODEL_HINTS, field_name in _TRAIN_HINTS
        if table == "":
            if in_model and in_train:
                raise ConfigError(f"override '{item}': '{field_name}' is ambiguous; write model.{field_name} or train.{field_name}")
            table = "model" if in_model else "train" if in_train else ""
        if table == "model" and in_model:
            model[field_name] = _parse_value(raw.strip(), _MODEL_HINTS[field_name], f"override '{item}'")
        elif table == "train" and in_train:
            train[field_name] = _parse_value(raw.strip(), _TRAIN_HINTS[field_name], f"override '{item}'")
        else:
            where = f"{table} config" if table else "the model or train config"
            raise ConfigError(f"unknown field '{field_name}' in override '{item}': no such field in {where}")
    return model, train


def read_toml(path: str | Path) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """A run TOML -> (preset name or None, model fields, train fields)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    unknown = sorted(set(data) - {"model", "train", "preset", "stage"})
    if unknown:
        raise ConfigError(f"unknown table(s) in {path}: {', '.join(unknown)}; expected [model], [train] and [stage]")
    model = dict(data.get("model", {}))
    name = model.pop("preset", data.get("preset"))
    return name, model, dict(data.get("train", {}))


def build_run_config(
    *,
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    train_values: dict[str, Any] | None = None,
    base: RunConfig | None = None,
    default_preset: str = "small",
    train_defaults: dict[str, Any] | None = None,
) -> RunConfig:
    """Layering, lowest first: `base` (a resumed run) or the preset, `train_defaults` (a command's
    own defaults, e.g. the demo's), the TOML file, `--set`, then the dedicated flags
    (`train_values`: --data, --steps, ...)."""
    model_values: dict[str, Any] = {}
    train_dict: dict[str, Any] = dict(train_defaults or {})
    name = preset_name
    if config_file is not None:
        file_preset, file_model, file_train = read_toml(config_file)
        name = name or file_preset
        model_values.update(file_model)
        train_dict.update(file_train)
    if base is not None and name is None and config_file is None:
        model_values = {**base.model.to_dict(), **model_values}
        train_dict = {**base.train.to_dict(), **train_dict}
    else:
        base_model = preset(name or default_preset)
        model_values = {**base_model.to_dict(), **model_values}
    model_over, train_over = split_overrides(overrides or [])
    model_values.update(model_over)
    train_dict.update(train_over)
    train_dict.update({k: v for k, v in (train_values or {}).items() if v is not None})
    return RunConfig(model=from_dict(model_values, source="model config"), train=train_from_dict(train_dict))


def run_config_from_dict(data: dict[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig(
            model=from_dict(data["model"], source=f"{source} [model]"),
            train=train_from_dict(data["train"], source=f"{source} [train]"),
        )
    except KeyError as exc:
        raise ConfigError(f"{source} lacks the '{exc.args[0]}' table") from None


def describe_train_fields() -> str:
    return "\n".join(f"  train.{f.name} ({_type_name(_TRAIN_HINTS[f.name])})" for f in fields(TrainConfig))


__all__ = [
    "TrainConfig", "RunConfig", "build_run_config", "split_overrides", "read_toml", "train_from_dict",
    "run_config_from_dict", "describe_train_fields",
]
