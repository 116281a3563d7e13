"""A parallel layout: how a training job splits over chips, and its `tp=8,pp=4,...` spelling."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError

RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("1f1b", "interleaved", "gpipe")
_ALIASES = {"mbs": "microbatch", "micro_batch": "microbatch", "vp": "vpp", "virtual": "vpp", "zero_stage": "zero"}


@dataclass(frozen=True)
class Layout:
    """Ranks are numbered tp (innermost), cp, dp, pp (outermost). Experts fold over tp*cp*dp:
    ep consecutive ranks share one copy of the experts (expert tensor parallelism 1)."""

    tp: int = 1  # tensor parallel (attention heads, FFN columns; sequence parallel outside)
    pp: int = 1  # pipeline stages
    ep: int = 1  # expert parallel (divides n_routed_experts and tp*cp*dp)
    cp: int = 1  # context parallel (sequence split, K/V exchanged)
    dp: int = 1  # data parallel replicas
    zero: int = 1  # 0 DDP, 1 optimizer+master sharded (distributed optimizer), 2 +gradients, 3 +weights (FSDP)
    recompute: str = "none"  # none | selective (attention scores) | full (keep layer inputs only)
    microbatch: int = 1  # sequences per micro-batch
    schedule: str = "1f1b"  # 1f1b | interleaved | gpipe
    vpp: int = 1  # virtual stages per device (interleaved schedule)

    @property
    def chips(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def __str__(self) -> str:
        sched = f"interleaved:{self.vpp}" if self.schedule == "interleaved" else self.schedule
        return (f"tp={self.tp},pp={self.pp},ep={self.ep},cp={self.cp},dp={self.dp},zero={self.zero},"
                f"recompute={self.recompute},microbatch={self.microbatch},schedule={sched}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_layout(text: str) -> dict[str, Any]:
    """'tp=8,pp=4,schedule=interleaved:2' -> the fields given (the rest stay free for the search).

    `schedule=interleaved:V` (or `vpp=V`) fixes the virtual stages per device."""
    fixed: dict[str, Any] = {}
    if not text:
        return fixed
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"--layout item '{item}' must look like KEY=VALUE (keys: tp, pp, ep, cp, dp, zero, recompute, microbatch, schedule, vpp)")
        key, value = item.split("=", 1)
        key = _ALIASES.get(key.lower(), key.lower())
        if key == "recompute":
            if value not in RECOMPUTE:
                raise ConfigError(f"--layout recompute must be one of {', '.join(RECOMPUTE)}, got '{value}'")
            fixed[key] = value
        elif key == "schedule":
            name, _, v = value.lower().partition(":")
            name = {"interleaved-1f1b": "interleaved", "1f1b-interleaved": "interleaved"}.get(name, name)
            if name not in SCHEDULES:
                raise ConfigError(f"--layout schedule must be one of {', '.join(SCHEDULES)} (interleaved:V), got '{value}'")
            fixed["schedule"] = name
            if v:
                fixed["vpp"] = _int(key, v)
            elif name != "interleaved":
                fixed["vpp"] = 1
        elif key in ("tp", "pp", "ep", "cp", "dp", "zero", "microbatch", "vpp"):
            fixed[key] = _int(key, value)
            if key == "zero" and not 0 <= fixed[key] <= 3:
                raise ConfigError(f"--layout zero must be 0, 1, 2 or 3, got {value}")
            if key != "zero" and fixed[key] < 1:
                raise ConfigError(f"--layout {key} must be >= 1, got {value}")
        else:
            raise ConfigError(f"unknown --layout key '{key}' (keys: tp, pp, ep, cp, dp, zero, recompute, microbatch, schedule, vpp)")
    return fixed


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--layout {key} must be an integer, got '{value}'") from None


__all__ = ["Layout", "parse_layout", "RECOMPUTE", "SCHEDULES"]
