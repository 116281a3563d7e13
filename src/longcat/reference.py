"""The reference implementation to measure and check against: transformers' LongcatFlashForCausalLM.

Used by the benchmarks (`longcat bench`, package `longcat.bench`) as their baseline; it sits
above `interop` because it builds a transformers model through the HF checkpoint writer.
"""

from __future__ import annotations

import tempfile
import warnings

import torch

from .interop.hf import save_hf
from .model import LongCatForCausalLM


def transformers_wants_identity_rows() -> bool:
    """Whether the installed transformers sizes LongcatFlash's gate_up_proj with N+Z rows (5.0-5.24)."""
    from transformers import LongcatFlashConfig
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashExperts

    config = LongcatFlashConfig(hidden_size=4, expert_ffn_hidden_size=2, n_routed_experts=2, zero_expert_num=1)
    with torch.device("meta"):
        return LongcatFlashExperts(config).gate_up_proj.shape[0] > 2


def transformers_reference(model: LongCatForCausalLM, log=print):
    """The same weights in transformers' LongcatFlashForCausalLM (fp32), or None without transformers.

    n-grams, LSA and MTP must be off (transformers' LongcatFlash has none of them).
    """
    try:
        from transformers import LongcatFlashForCausalLM
    except ImportError:
        log("transformers is not installed: measuring ours only (pip install transformers)")
        return None
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # transformers warns about config keys it does not use; the weights are what matter here
        warnings.simplefilter("ignore")
        save_hf(model, tmp, identity_expert_rows=transformers_wants_identity_rows())
        return LongcatFlashForCausalLM.from_pretrained(tmp, dtype=torch.float32)


__all__ = ["transformers_reference", "transformers_wants_identity_rows"]
