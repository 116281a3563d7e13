"""The planner's layout: the runtime's parallel degrees plus the knobs only the planner models.

One vocabulary for both sides (DESIGN §6): the degrees are a `longcat.parallel.ParallelLayout`
(`dp_replicate`, `dp_shard`, `ep`, `tp`, `cp`, `pp`, `pp_schedule`, `pp_microbatches`,
`pp_stages_per_rank`), exactly what `longcat train --parallel` runs, with the same folding:
ranks are numbered tp innermost, then ep, cp, dp_shard/ep, dp_replicate, pp (outermost), and
expert parallelism borrows its ranks from `dp_shard`, so `ep` divides `dp_shard` and every EP rank
reads its own data. Experts are replicated across the tp ranks (expert tensor parallelism 1).

The planner adds what the degrees do not say:
- `zero`: which state the `dp_shard*cp` ranks shard (experts: the `dp_shard/ep*cp` ranks that
  hold the same experts). 0 nothing, 1 optimizer state and fp32 master, 2 also gradients, 3 also
  weights. The runtime is FSDP2, i.e. zero=3; 1 and 2 are planned for other frameworks.
  `dp_replicate` copies are never sharded (HSDP across them, plain DDP when `dp_shard*cp` is 1).
- `recompute`: activation recomputation: none | norm_up (the norms and the MLA up-projections,
  DeepSeek-V3's recipe) | selective (attention scores) | full (block inputs only). The runtime keeps
  all activations (none).
- `ep_schedule`: what hides the expert all-to-all: none (it is exposed: the runtime), dualbatch
  (each micro-batch split in two, one half's all-to-all overlapping the other half's compute:
  SGLang/DeepEP two-batch overlap, DeepSeek's DualPipe), shortcut (LongCat's ScMoE: the dense FFN
  and the second attention, which do not depend on the MoE, run during its all-to-all). Printed
  whenever ep > 1; left out of a complete --layout, the fastest is taken (none with --runnable).
- `microbatch`: sequences per micro-batch on each data-parallel rank. The micro-batch count
  follows from the global batch; with pp > 1 it is `pp_microbatches`.

Spelling: `dp_shard=8,ep=8,tp=1,cp=1,pp=1,zero=3,recompute=none,microbatch=1`; the runtime's
part alone is `Layout.parallel`, whose `str()` `--parallel` accepts as is.
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError
from ..parallel.layout import SCHEDULES, ParallelLayout

RECOMPUTE = ("none", "norm_up", "selective", "full")
EP_SCHEDULES = ("none", "dualbatch", "shortcut")
DEGREES = ("dp_replicate", "dp_shard", "ep", "tp", "cp", "pp")
PIPELINE = ("pp_schedule", "pp_microbatches", "pp_stages_per_rank")
KNOBS = ("zero", "recompute", "microbatch", "ep_schedule")
# Older planner spellings: `dp` is the whole data-parallel degree (dp_replicate*dp_shard, split by
# zero: zero=0 replicates, otherwise dp_shard=dp), `schedule=interleaved:V` sets both pipeline
# fields, `vpp` is pp_stages_per_rank.
ALIASES = {"schedule": "pp_schedule", "vpp": "pp_stages_per_rank", "vp": "pp_stages_per_rank",
           "virtual": "pp_stages_per_rank", "mbs": "microbatch", "micro_batch": "microbatch",
           "zero_stage": "zero", "pp_microbatch": "pp_microbatches"}
KEYS = DEGREES + PIPELINE + KNOBS + ("dp",)
_VALID = (f"{', '.join(DEGREES + PIPELINE)} (as --parallel), {', '.join(KNOBS)} (planner only); "
          f"aliases: dp, schedule, vpp, mbs")


class Layout:
    """A `ParallelLayout` plus the planner-only knobs. Hashable: treat it as immutable (`.replace`).

    Keyword arguments take either vocabulary: `Layout(dp_shard=8, ep=8, zero=3)` or the older
    `Layout(tp=8, pp=4, dp=16, zero=1, schedule="interleaved", vpp=2)`; `Layout(parallel=...)`
    wraps a runtime layout."""

    # the degrees are copied out of `parallel` into plain slots: the search reads them millions of times
    __slots__ = ("parallel", "zero", "recompute", "microbatch", "ep_schedule", "tp", "pp", "ep", "cp", "dp_shard", "dp_replicate", "dp",
                 "schedule", "vpp", "chips", "shard_group", "expert_shard_group")

    def __init__(self, parallel: ParallelLayout | None = None, *, tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1,
                 dp: int | None = None, dp_shard: int | None = None, dp_replicate: int | None = None,
                 zero: int = 1, recompute: str = "none", microbatch: int = 1, schedule: str = "1f1b",
                 vpp: int = 1, pp_microbatches: int = 0, ep_schedule: str = "none") -> None:
        if parallel is None:
            dp_shard, dp_replicate = split_dp(dp, dp_shard, dp_replicate, ep=ep, zero=zero)
            parallel = ParallelLayout(dp_shard=dp_shard, dp_replicate=dp_replicate, ep=ep, tp=tp, cp=cp, pp=pp,
                                      pp_schedule=schedule, pp_microbatches=pp_microbatches, pp_stages_per_rank=vpp)
        p = parallel
        self.parallel, self.zero, self.recompute, self.microbatch = p, zero, recompute, microbatch
        self.ep_schedule = ep_schedule
        self.tp, self.pp, self.ep, self.cp = p.tp, p.pp, p.ep, p.cp
        self.dp_shard, self.dp_replicate = p.dp_shard, p.dp_replicate
        self.dp = p.dp_replicate * p.dp_shard  # data-parallel ranks
        self.schedule, self.vpp = p.pp_schedule, p.pp_stages_per_rank
        self.chips = p.pp * self.dp * p.cp * p.tp
        # ranks that shard the dense state (the ZeRO/FSDP group), and those that hold the same
        # experts and shard theirs
        self.shard_group = p.dp_shard * p.cp
        self.expert_shard_group = max(1, p.dp_shard // p.ep) * p.cp

    def _key(self) -> tuple:
        return (self.parallel, self.zero, self.recompute, self.microbatch, self.ep_schedule)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Layout({self})"

    def replace(self, *, zero: int | None = None, recompute: str | None = None, microbatch: int | None = None,
                ep_schedule: str | None = None, **parallel: Any) -> "Layout":
        return Layout(self.parallel.replace(**parallel) if parallel else self.parallel,
                      zero=self.zero if zero is None else zero,
                      recompute=self.recompute if recompute is None else recompute,
                      microbatch=self.microbatch if microbatch is None else microbatch,
                      ep_schedule=self.ep_schedule if ep_schedule is None else ep_schedule)

    def __str__(self) -> str:
        text = f"{self.parallel},zero={self.zero},recompute={self.recompute},microbatch={self.microbatch}"
        # with expert parallelism always said, so that a printed layout given back is evaluated as printed
        return text if self.ep <= 1 and self.ep_schedule == "none" else f"{text},ep_schedule={self.ep_schedule}"

    def to_dict(self) -> dict[str, Any]:
        p = self.parallel
        return {**{k: getattr(p, k) for k in DEGREES + PIPELINE}, "zero": self.zero, "recompute": self.recompute,
                "microbatch": self.microbatch, "ep_schedule": self.ep_schedule}


def split_dp(dp: int | None, dp_shard: int | None, dp_replicate: int | None, *, ep: int, zero: int) -> tuple[int, int]:
    """(dp_shard, dp_replicate) from whichever of dp, dp_shard, dp_replicate are given.

    With only `dp`: zero=0 replicates (dp_shard as small as the experts allow: ep), otherwise
    every data rank shards (dp_shard=dp)."""
    if dp_shard is not None and dp_replicate is not None:
        return dp_shard, dp_replicate
    if dp is None:
        return dp_shard or 1, dp_replicate or 1
    if dp_shard is not None:
        return dp_shard, max(1, dp // dp_shard)
    if dp_replicate is not None:
        return max(1, dp // dp_replicate), dp_replicate
    if zero == 0 and dp % ep == 0:
        return ep, dp // ep
    return dp, 1


def canonical_key(key: str) -> str:
    key = key.strip().lower().replace("-", "_")
    return ALIASES.get(key, key)


def normalize_fixed(fixed: dict[str, Any]) -> dict[str, Any]:
    """Fixed fields under the canonical names (accepts the aliases too)."""
    out: dict[str, Any] = {}
    for key, value in fixed.items():
        key = canonical_key(key)
        if key not in KEYS:
            raise ConfigError(f"unknown --layout key '{key}'; valid: {_VALID}")
        if key == "pp_schedule":
            name, _, v = str(value).lower().partition(":")
            name = {"interleaved-1f1b": "interleaved", "1f1b-interleaved": "interleaved"}.get(name, name)
            if name not in SCHEDULES:
                raise ConfigError(f"--layout pp_schedule must be one of {', '.join(SCHEDULES)} "
                                  f"(interleaved:V sets pp_stages_per_rank too), got '{value}'")
            out["pp_schedule"] = name
            if v:
                out["pp_stages_per_rank"] = _int("pp_stages_per_rank", v)
            elif name != "interleaved":
                out["pp_stages_per_rank"] = 1
            continue
        out[key] = value
    return out


def parse_layout(text: str) -> dict[str, Any]:
    """'tp=8,pp=4,pp_schedule=interleaved,pp_stages_per_rank=2' -> the fields given, canonical
    names (the rest stay free for the search). Takes the `--parallel` names, the planner knobs and
    the older aliases (dp, schedule=interleaved:V, vpp, mbs)."""
    raw: dict[str, Any] = {}
    if not text:
        return raw
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"--layout item '{item}' must look like KEY=VALUE; keys: {_VALID}")
        key, value = item.split("=", 1)
        key = canonical_key(key)
        if key not in KEYS:
            raise ConfigError(f"unknown --layout key '{key}'; valid: {_VALID}")
        if key == "recompute":
            if value not in RECOMPUTE:
                raise ConfigError(f"--layout recompute must be one of {', '.join(RECOMPUTE)}, got '{value}'")
            raw[key] = value
        elif key == "ep_schedule":
            if value not in EP_SCHEDULES:
                raise ConfigError(f"--layout ep_schedule must be one of {', '.join(EP_SCHEDULES)}, got '{value}'")
            raw[key] = value
        elif key == "pp_schedule":
            raw[key] = value
        else:
            n = _int(key, value)
            if key == "zero" and not 0 <= n <= 3:
                raise ConfigError(f"--layout zero must be 0, 1, 2 or 3, got {value}")
            if key == "pp_microbatches" and n < 0:
                raise ConfigError(f"--layout pp_microbatches must be >= 0 (0: from the global batch), got {value}")
            if key not in ("zero", "pp_microbatches") and n < 1:
                raise ConfigError(f"--layout {key} must be >= 1, got {value}")
            raw[key] = n
    return normalize_fixed(raw)


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--layout {key} must be an integer, got '{value}'") from None


__all__ = ["Layout", "parse_layout", "normalize_fixed", "split_dp", "RECOMPUTE", "EP_SCHEDULES", "SCHEDULES", "DEGREES", "KNOBS", "KEYS"]
