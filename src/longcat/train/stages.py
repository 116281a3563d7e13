"""Context-extension stages: `longcat train --stage yarn|indexer-warmup|sparse --init-from RUN`.

A stage is a new run (its own --out) that starts from another run's weights. The recipe, after
pre-training at a short length (docs/LONG_CONTEXT.md has the published numbers it scales down):

    yarn            RoPE extended by YaRN: yarn_factor F, yarn_original_max_position_embeddings =
                    the positions the checkpoint was trained for, max_position_embeddings = F times
                    that. Dense attention throughout; everything trains.
    indexer-warmup  dense attention; only the LSA indexers train, by KL towards the dense attention
                    distribution (`train.freeze = "all-but-indexer"`; MTP, z-loss and the router-bias
                    update off, as nothing else moves).
    sparse          LSA on with its top-k budget; everything trains, the indexer by KL towards the
                    attention over the tokens it selected.

Each stage sets train defaults (below) over the initial run's recipe; the [train] table, --set and
the flags still override them. A [stage] table in the --config TOML holds the same settings as the
flags: kind, init_from, yarn_factor, freeze, retrieval_ratio, retrieval_tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ConfigError, ModelConfig, from_dict
from .config import RunConfig, TrainConfig, read_toml, run_config_from_dict, split_overrides, train_from_dict

STAGES = ("finetune", "yarn", "indexer-warmup", "sparse")
STAGE_KEYS = ("kind", "init_from", "yarn_factor", "freeze", "retrieval_ratio", "retrieval_tasks")

# Train defaults per stage, as factors of the initial run's peak LR and as fixed fields.
STAGE_LR_FACTOR = {"finetune": 0.1, "yarn": 0.3, "indexer-warmup": None, "sparse": 0.1}
INDEXER_WARMUP_LR = 1e-3  # DeepSeek-V3.2's dense warm-up LR; only the indexer's weights move
STAGE_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    # continued training of any checkpoint the project reads (ours, Hugging Face, published BF16/FP8)
    "finetune": dict(freeze="none", warmup_steps=10),
    "yarn": dict(freeze="none", warmup_steps=10, indexer_loss_weight=1.0),
    "indexer-warmup": dict(freeze="all-but-indexer", warmup_steps=5, mtp_weight=0.0, z_loss=0.0,
                           balance_loss=0.0, router_bias_rate=0.0, indexer_loss_weight=1.0, weight_decay=0.0),
    "sparse": dict(freeze="none", warmup_steps=10, indexer_loss_weight=1.0, lsa_dense_warmup_steps=0),
}
DENSE_STAGES = ("yarn", "indexer-warmup")


def read_stage_table(config_file: str | Path | None) -> dict[str, Any]:
    """The [stage] table of a run TOML ({} without one); unknown keys fail naming the valid ones."""
    if config_file is None:
        return {}
    import tomllib

    try:
        data = tomllib.loads(Path(config_file).read_text()).get("stage", {})
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse {config_file}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"'stage' in {config_file} must be a table ([stage])")
    unknown = sorted(set(data) - set(STAGE_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) in [stage] of {config_file}: {', '.join(unknown)}; "
                          f"valid keys: {', '.join(STAGE_KEYS)}")
    return dict(data)


def initial_run(init_from: str | Path) -> tuple[ModelConfig, TrainConfig | None, Path | None, Path | None]:
    """(model config, the initial run's train config or None, its tokenizer.json or None, its token
    cache folder or None) of a run, checkpoint or model directory."""
    from ..interop.loader import load_model_config
    from ..interop.runs import resolve
    from ..interop.safetensors_io import CheckpointError

    try:
        found = resolve(init_from)
    except CheckpointError as exc:
        raise ConfigError(f"stage init_from: {exc}") from None
    train = tokenizer = cache = None
    step = found.checkpoint
    if step is not None and (step / "train_config.json").is_file():
        saved = run_config_from_dict(json.loads((step / "train_config.json").read_text()), str(step))
        model, train = saved.model, saved.train
        run_dir = step.parent.parent
        if (run_dir / "cache").is_dir():
            cache = run_dir / "cache"
        if train.cache_dir:
            cache = Path(train.cache_dir)
    else:
        try:
            model = load_model_config(found.weights)
        except CheckpointError as exc:
            raise ConfigError(f"stage init_from: {exc}") from None
    for folder in (step, found.weights):
        if folder is not None and (folder / "tokenizer.json").is_file():
            tokenizer = folder / "tokenizer.json"
            break
    return model, train, tokenizer, cache


def extend_with_yarn(model: ModelConfig, factor: float) -> ModelConfig:
    """YaRN by `factor` from the positions the model was trained for: its
    yarn_original_max_position_embeddings when it already uses YaRN (the factor then replaces the
    old one), else its max_position_embeddings."""
    if factor <= 1.0:
        raise ConfigError(f"stage yarn_factor must be > 1 (the context grows by that factor), got {factor}")
    original = model.yarn_original_max_position_embeddings if model.yarn_enabled else model.max_position_embeddings
    return model.replace(yarn_factor=float(factor), yarn_original_max_position_embeddings=original,
                         max_position_embeddings=int(original * factor))


def stage_run_config(
    *,
    kind: str,
    init_from: str | None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    train_values: dict[str, Any] | None = None,
    yarn_factor: float | None = None,
    table: dict[str, Any] | None = None,
) -> RunConfig:
    """The RunConfig of a stage. Layers, lowest first: the initial run's model and recipe, the
    stage's model change (YaRN) and train defaults, the TOML [model]/[train], --set, the flags."""
    if kind not in STAGES:
        raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {kind!r}")
    table = dict(table or {})
    init_from = init_from or table.get("init_from")
    if not init_from:
        raise ConfigError(f"stage '{kind}' starts from another run's weights: give --init-from RUN_DIR "
                          "(or init_from in the [stage] table)")
    model, saved_train, tokenizer, cache = initial_run(init_from)
    factor = yarn_factor if yarn_factor is not None else table.get("yarn_factor")
    if kind == "yarn":
        if factor is None:
            raise ConfigError("stage 'yarn' needs --yarn-factor F (or yarn_factor in the [stage] table): the "
                              "context grows F-fold")
        model = extend_with_yarn(model, float(factor))
    elif factor is not None:
        raise ConfigError(f"yarn_factor belongs to the 'yarn' stage, not '{kind}'; run --stage yarn first")

    base = saved_train.to_dict() if saved_train is not None else TrainConfig().to_dict()
    lr_factor = STAGE_LR_FACTOR[kind]
    train: dict[str, Any] = {
        **base, **STAGE_TRAIN_DEFAULTS[kind],
        "lr": INDEXER_WARMUP_LR if lr_factor is None else base["lr"] * lr_factor,
        "stage": kind, "init_from": str(init_from),
        "tokenizer": str(tokenizer) if tokenizer is not None else base.get("tokenizer"),
        "cache_dir": str(cache) if cache is not None else base.get("cache_dir"),
        "time_budget": 0.0,
    }
    for key in ("freeze", "retrieval_ratio", "retrieval_tasks"):
        if key in table:
            train[key] = table[key]
    explicit: set[str] = set()
    model_values = model.to_dict()
    if config_file is not None:
        _, file_model, file_train = read_toml(config_file)
        model_values.update(file_model)
        train.update(file_train)
        explicit |= set(file_train)
    model_over, train_over = split_overrides(overrides or [])
    model_values.update(model_over)
    train.update(train_over)
    explicit |= set(train_over)
    given = {k: v for k, v in (train_values or {}).items() if v is not None}
    train.update(given)
    explicit |= set(given)
    if kind in DENSE_STAGES and "lsa_dense_warmup_steps" not in explicit:
        train["lsa_dense_warmup_steps"] = train["steps"]  # dense attention for the whole stage
    run = RunConfig(model=from_dict(model_values, source="stage model config"), train=train_from_dict(train))
    if run.train.seq_len > run.model.max_position_embeddings:
        hint = ("extend it first with --stage yarn --yarn-factor F" if not run.model.yarn_enabled else
                f"raise the yarn stage's factor (now {run.model.yarn_factor:g})")
        raise ConfigError(f"train.seq_len ({run.train.seq_len}) exceeds model.max_position_embeddings "
                          f"({run.model.max_position_embeddings}) of the stage's model; {hint} or lower seq_len")
    if kind in ("indexer-warmup", "sparse") and not run.model.lsa_enabled:
        raise ConfigError(f"stage '{kind}' trains the LSA indexer, and the model of {init_from} has none "
                          "(index_n_heads = 0); pre-train with model.index_n_heads > 0")
    return run


# ---------------------------------------------------------------------------------------------------
# what the Trainer does with a stage


def indexer_parameter(name: str) -> bool:
    return ".indexer." in name


def prepare_model(model: nn.Module, cfg: TrainConfig, *, initialise: bool) -> None:
    """Before the optimizers are built: load the stage's initial weights (a new run, not a resume)
    and freeze what the stage does not train."""
    if initialise and cfg.init_from:
        from ..interop.runs import MODEL, resolve
        from ..interop.safetensors_io import CheckpointError
        from .checkpoint import load_model_state

        try:
            found = resolve(cfg.init_from)
            if found.kind == MODEL and found.checkpoint is not None:
                load_model_state(model, found.checkpoint)  # a one-process training checkpoint, exact bits
            else:
                from ..interop.loader import load

                # FP8 weights dequantized straight to fp32, the master weights' dtype (as each rank's
                # sharded read does), not through the bf16 a generation would use
                model.load_state_dict(load(cfg.init_from, weights_dtype="fp32").state_dict())
        except (CheckpointError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"train.init_from {cfg.init_from} does not fit this model ({exc}); "
                              "a stage keeps the architecture of the run it starts from") from None
    if cfg.freeze == "all-but-indexer":
        trainable = 0
        for name, p in model.named_parameters():
            p.requires_grad_(indexer_parameter(name))
            trainable += p.numel() if p.requires_grad else 0
        if trainable == 0:
            raise ConfigError("train.freeze = 'all-but-indexer' leaves nothing to train: the model has no LSA "
                              "indexer (index_n_heads = 0)")


def mix_retrieval(batches, cfg: TrainConfig, tokenizer):
    """The batch source with `retrieval_ratio` of its rows replaced by synthetic retrieval examples
    (filler cut from the same training tokens)."""
    if cfg.retrieval_ratio <= 0:
        return batches
    if tokenizer is None:
        raise ConfigError("train.retrieval_ratio > 0 needs the run's tokenizer to write the tasks")
    from ..data.longctx import RetrievalMix, RetrievalTasks, parse_tasks

    tasks = RetrievalTasks(tokenizer, getattr(batches, "tokens", None), seed=cfg.seed)
    return RetrievalMix(batches, tasks, cfg.retrieval_ratio, parse_tasks(cfg.retrieval_tasks), seed=cfg.seed)


__all__ = ["STAGES", "STAGE_KEYS", "stage_run_config", "read_stage_table", "extend_with_yarn", "prepare_model",
           "mix_retrieval", "initial_run"]
