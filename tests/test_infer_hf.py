"""The engine against the reference: transformers' LongcatFlashForCausalLM `generate`, same weights.

transformers' LongcatFlash has no n-gram embedding, sparse attention or MTP, so the model here has
none either. Random weights give near-uniform logits where greedy ties are fragile, so the output
head is sharpened until the argmax margins are far above fp32 rounding.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from longcat.config import preset
from longcat.infer import Engine, SamplingParams
from longcat.interop.hf import save_hf
from longcat.model import build_model

transformers = pytest.importorskip("transformers")
from transformers import LongcatFlashForCausalLM  # noqa: E402

from longcat.reference import transformers_wants_identity_rows  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_greedy_continuations_equal_transformers_generate(tmp_path):
    config = preset("tiny", oe_vocab_size_ratio=0.0, index_n_heads=0, mtp_num_layers=0, initializer_range=0.2)
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
        for layer in model.layers:  # a non-zero router bias: selection != plain top-k of probs
            layer.mlp.router.e_score_correction_bias.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    save_hf(model, tmp_path, identity_expert_rows=transformers_wants_identity_rows())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LongcatFlashForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 40, 1, 29)]
    ours = Engine(model, prefill_chunk=16).generate(prompts, SamplingParams(max_new_tokens=64, temperature=0))
    for prompt, result in zip(prompts, ours):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)[0, len(prompt):]
        # both stop at the end-of-text token (config.eos_token_id) or after 64 tokens
        assert result.token_ids == theirs.tolist()
        assert len(result.token_ids) == 64 or result.token_ids[-1] == config.eos_token_id
