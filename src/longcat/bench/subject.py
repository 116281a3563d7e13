"""The model a validation run measures: a preset (fresh weights from seed 0) or a model directory
(a checkpoint or a run directory, whatever `longcat generate --model` reads)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PRESETS, ModelConfig, load_config, preset
from ..errors import UserError


@dataclass
class Subject:
    spec: str  # as the user gave it
    name: str
    kind: str  # "preset" or "directory"
    config: ModelConfig
    path: Path | None = None  # the weights directory, for a directory

    @property
    def config_hash(self) -> str:
        """sha256 of the architecture (the config as JSON, keys sorted): equal hashes, same model shape."""
        text = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def trained(self) -> bool:
        return self.kind == "directory"

    def build(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The model in fp32 on `device`: a preset from seed 0, a directory's weights as saved."""
        if self.path is None:
            from ..model import build_model

            return build_model(self.config, seed=0).to(device)
        from ..interop.loader import load

        return load(self.path, device=torch.device(device))

    def describe(self) -> dict:
        from ..model import count_parameters

        counts = count_parameters(self.config)
        return {"name": self.name, "source": self.kind, "path": str(self.path) if self.path else None,
                "config_hash": self.config_hash, "total_params": counts.total,
                "active_params": round(counts.active_params), "weights": "fp32",
                "mtp_heads": self.config.mtp_num_layers, "experts": self.config.n_routed_experts,
                "identity_experts": self.config.zero_expert_num, "top_k": self.config.moe_topk,
                "config": self.config.to_dict()}


def resolve_subject(spec: str, *, setting: str = "--model") -> Subject:
    """A preset name or a model/run directory -> Subject; a clear error for anything else."""
    if spec in PRESETS:
        return Subject(spec, spec, "preset", preset(spec))
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{setting} {spec}: neither a preset ({', '.join(PRESETS)}) nor an existing directory")
    from ..infer.cli import resolve_model_dir

    weights = resolve_model_dir(path)
    return Subject(spec, path.name or str(path), "directory", load_config(weights), weights)


__all__ = ["Subject", "resolve_subject"]
