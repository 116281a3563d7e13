"""Simple text generation for periodic samples and the demo: full recompute, no KV cache.

Every new token reruns the model over the whole (windowed) context. That is slow for long
outputs but has no state to get wrong, which is what a training-time sanity check needs. Fast
generation with the latent cache and MTP drafting is `longcat generate` (longcat.infer).
"""

from __future__ import annotations

import contextlib

import torch


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 50,
    eos_id: int | None = None,
    context_len: int | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[int]:
    """Greedy (temperature 0) or temperature/top-k sampling. Returns the new token ids only.

    `context_len` limits the window the model sees (default: max_position_embeddings).
    `generator` keeps sampling off the global RNG, so samples never perturb training.
    """
    device = next(model.parameters()).device
    window = context_len or model.config.max_position_embeddings
    ids = list(prompt_ids) or [model.config.eos_token_id]
    new: list[int] = []
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    try:
        with autocast:
            for _ in range(max_new_tokens):
                context = torch.tensor([ids[-window:]], device=device)  # (1, T)
                logits = model(context, mtp=False, indexer_loss=False, logits_to_keep=1).logits[0, -1].float()  # (V,)
                if temperature <= 0:
                    token = int(logits.argmax())
                else:
                    logits = logits / temperature
                    if 0 < top_k < logits.numel():
                        kth = torch.topk(logits, top_k).values[-1]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = logits.softmax(-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                ids.append(token)
                new.append(token)
                if eos_id is not None and token == eos_id:
                    break
    finally:
        model.train(was_training)
    return new


def sample_text(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    context_len: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> str:
    """Prompt + continuation as text. Seeded with its own generator (reproducible, RNG-neutral)."""
    # The tokenizer's own rule for how a prompt starts, the one the inference engine uses too.
    prompt_ids = tokenizer.prompt_prefix + (tokenizer.encode(prompt) if prompt else [])
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    new = generate_ids(
        model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=tokenizer.eos_id,
        context_len=context_len, generator=generator, autocast_dtype=autocast_dtype,
    )
    if new and new[-1] == tokenizer.eos_id:
        new = new[:-1]
    return prompt + tokenizer.decode(new)


__all__ = ["generate_ids", "sample_text"]
