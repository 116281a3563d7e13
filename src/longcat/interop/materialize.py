"""Build a model on the meta device and give it a state dict: the last step of every loader.

Loading never allocates a random model first: the modules are created on `meta`, the tensors
are checked against the config (names and shapes, every mismatch named), then assigned.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import LongCatForCausalLM
from ..model.layers import RotaryEmbedding
from .safetensors_io import CheckpointError


def materialize(config: ModelConfig, state: dict[str, torch.Tensor], *, device="cpu",
                dtype: torch.dtype | None = None, origin: str = "checkpoint") -> LongCatForCausalLM:
    """A LongCatForCausalLM holding `state` (our parameter names) on `device`.

    `dtype` casts floating-point weights (None keeps the stored dtype); `origin` names the source
    in error messages. Takes ownership of `state`: its tensors are replaced as they are moved.
    """
    with torch.device("meta"):
        model = LongCatForCausalLM(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:5])})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors (e.g. {', '.join(extra[:5])})")
        raise CheckpointError(f"{origin} does not match its config: " + "; ".join(parts))
    for name, t in expected.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{origin}: tensor '{name}' has shape {tuple(state[name].shape)}, the config implies {tuple(t.shape)}"
            )
    # one tensor at a time, so a cast or a move never holds two copies of the whole model
    for k, v in state.items():
        state[k] = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
    model.load_state_dict(state, assign=True)
    # The rotary tables are not in the state dict (non-persistent buffers): build them for real.
    model.rotary = RotaryEmbedding(config, config.qk_rope_head_dim).to(device)
    # Router bias and classifier stay fp32 whatever the weight dtype (routing decisions are fragile).
    for layer in model.layers:
        layer.mlp.router.float()
    return model


__all__ = ["materialize"]
