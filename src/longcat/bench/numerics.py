"""Numerics: how far lower precisions move the model from an fp32 reference, and bf16 training from fp32.

Inference (llama.cpp's perplexity-tool statistics, per next-token distribution over held-out tokens):
- `bf16`: the model cast to bf16 (weights and activations; router logits stay fp32 as the model does);
- `fp8`: every linear and expert weight of a copy block-quantized to e4m3 with one scale per 128x128
  block (`model.fp8.quantize_blockwise`) and dequantized back, run in fp32: the error of FP8 weights
  alone (fake quantization).
Against fp32: mean and p99 KL(fp32 || other), top-1 agreement, ln(PPL_other / PPL_fp32), RMS of the
probability differences, and per decoder layer the relative drift ||h - h_ref|| / ||h_ref|| of its
output hidden states.

Training: N steps from the same init on the same batches, fp32 vs bf16 autocast: the relative area
between the two loss curves, and loss spikes (a loss >= k x the running median of the losses before it).
"""

from __future__ import annotations

import copy
import math
import statistics

import torch
import torch.nn.functional as F

HELD_OUT_TEXT = (
    "The river runs past the old mill and under the stone bridge before it reaches the sea. In spring the "
    "water rises and the fields along its banks turn green; by late summer the level falls and children "
    "wade across where the current is slow. The town grew around the crossing: first an inn, then a market, "
    "then the church whose bell still marks the hours. Records from the archive show that the bridge was "
    "rebuilt three times, each time a little wider, as carts gave way to coaches and coaches to lorries. "
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"
)


def held_out_tokens(subject, tokens: int, seed: int = 1234) -> tuple[torch.Tensor, str]:
    """(1, tokens) ids to score and what they are: the model's tokenizer over a fixed English and code
    passage (repeated to length) when the model directory has one, else random ids from `seed`."""
    if subject.path is not None:
        from ..infer.cli import find_tokenizer, load_tokenizer

        found = find_tokenizer(subject.path)
        if found is not None:
            tok = load_tokenizer(found)
            ids = tok.encode(HELD_OUT_TEXT)
            ids = (ids * (tokens // max(1, len(ids)) + 1))[:tokens]
            return torch.tensor([ids]), f"the built-in English/code passage through {found.name}, {tokens} tokens"
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(3, subject.config.vocab_size, (1, tokens), generator=g),
            f"random token ids (seed {seed}, {tokens} tokens): the model has no tokenizer")


def fake_quantize_fp8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose 2-D+ weights (linears, stacked experts; not embeddings, norms or the router) went
    through block-scaled e4m3 and back."""
    from ..model.fp8 import dequantize_blockwise, quantize_blockwise

    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if p.dim() < 2 or "embed" in name or "router" in name or "ngram" in name:
                continue
            w, scale = quantize_blockwise(p.data)
            p.data.copy_(dequantize_blockwise(w, scale, p.dtype))
    return q


def _layer_outputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (T, V) fp32 and each decoder layer's output hidden state (T, H) fp32."""
    hidden: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: hidden.append(out[0].float()[0]))
             for layer in model.layers]
    try:
        with torch.inference_mode():
            logits = model(ids, mtp=False).logits.float()[0]
    finally:
        for h in hooks:
            h.remove()
    return logits, hidden


def compare_logits(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Statistics of `logits` against `ref_logits` (T, V) over next tokens `targets` (T,)."""
    ref_logp, logp = F.log_softmax(ref_logits, -1), F.log_softmax(logits, -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0)  # (T,)
    nll_ref = F.nll_loss(ref_logp, targets)
    nll = F.nll_loss(logp, targets)
    return {
        "kl_mean": kl.mean().item(),
        "kl_p99": torch.quantile(kl, 0.99).item(),
        "top1_agreement": (ref_logits.argmax(-1) == logits.argmax(-1)).float().mean().item(),
        "ln_ppl_ratio": (nll - nll_ref).item(),
        "rms_delta_p": ((logp.exp() - ref_logp.exp()) ** 2).sum(-1).mean().sqrt().item(),
        "ppl_reference": math.exp(nll_ref.item()),
    }


def inference_numerics(model, ids: torch.Tensor) -> dict:
    """bf16 and fp8 (weights) against fp32 on `ids` (1, T): the statistics and per-layer drift."""
    model = model.float().eval()
    inputs, targets = ids[:, :-1], ids[0, 1:]
    ref_logits, ref_hidden = _layer_outputs(model, inputs)
    out = {}
    variants = {"bf16": lambda: copy.deepcopy(model).to(torch.bfloat16), "fp8": lambda: fake_quantize_fp8(model)}
    for name, make in variants.items():
        other = make()
        logits, hidden = _layer_outputs(other, inputs)
        row = compare_logits(ref_logits, logits, targets)
        row["layer_relative_drift"] = [((h - r).norm() / r.norm().clamp(min=1e-30)).item()
                                       for h, r in zip(hidden, ref_hidden)]
        row["precision"] = {"bf16": "bf16 weights and activations",
                            "fp8": "e4m3 weights, 128x128 block scales, fake-quantized, fp32 compute"}[name]
        out[name] = row
        del other
    return out


def loss_spikes(losses: list[float], k: float = 2.0, window: int = 20, min_history: int = 3) -> list[dict]:
    """Steps whose loss is >= k x the median of the (up to `window`) losses before it."""
    spikes = []
    for i, loss in enumerate(losses):
        history = losses[max(0, i - window):i]
        if len(history) < min_history:
            continue
        median = statistics.median(history)
        if median > 0 and loss >= k * median:
            spikes.append({"step": i + 1, "loss": loss, "running_median": median})
    return spikes


def curve_difference(reference: list[float], other: list[float]) -> float:
    """Relative area between two loss curves: sum |other - reference| / sum |reference|."""
    return sum(abs(a - b) for a, b in zip(reference, other)) / max(1e-30, sum(abs(a) for a in reference))


def training_numerics(subject, *, steps: int, seq_len: int, batch: int, lr: float = 1e-3, spike_k: float = 2.0,
                      seed: int = 0) -> dict:
    """fp32 vs bf16 autocast training from the same init on the same batches."""
    from ..model import lm_losses

    curves = {}
    for precision in ("fp32", "bf16-autocast"):
        torch.manual_seed(seed)
        model = subject.build("cpu").float().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(steps):
            tokens = torch.randint(3, subject.config.vocab_size, (batch, seq_len + 1), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
                out = model(tokens[:, :-1], mtp=False)
            loss = lm_losses(out, tokens[:, 1:])["lm"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[precision] = losses
    ref, bf16 = curves["fp32"], curves["bf16-autocast"]
    return {
        "steps": steps, "seq_len": seq_len, "batch": batch, "lr": lr, "optimizer": "AdamW",
        "data": f"random token ids (seed {seed})",
        "loss_fp32": ref, "loss_bf16": bf16,
        "loss_curve_relative_difference": curve_difference(ref, bf16),
        "final_loss_relative_difference": abs(bf16[-1] - ref[-1]) / abs(ref[-1]),
        "spike_rule": f"loss >= {spike_k:g} x running median of the previous losses (window 20, >= 3 of them)",
        "spikes_fp32": loss_spikes(ref, spike_k), "spikes_bf16": loss_spikes(bf16, spike_k),
    }


def run_numerics(subject, *, tokens: int = 256, train_steps: int = 8, train_seq_len: int = 64, train_batch: int = 2,
                 log=print) -> dict:
    ids, data = held_out_tokens(subject, tokens + 1)
    log(f"numerics: scoring {tokens} held-out tokens in fp32, bf16 and fp8 weights ...")
    model = subject.build("cpu")
    inference = inference_numerics(model, ids)
    del model
    log(f"numerics: training {train_steps} steps in fp32 and in bf16 autocast from the same init ...")
    training = training_numerics(subject, steps=train_steps, seq_len=train_seq_len, batch=train_batch)
    note = None if subject.trained else \
        "fresh weights of a preset: the statistics measure rounding on an untrained model; give a trained --model DIR"
    return {"held_out": data, "tokens": tokens, "reference": "fp32", "inference": inference, "training": training,
            "note": note}


def plot_drift(result: dict, path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, row in result["inference"].items():
        drift = row["layer_relative_drift"]
        ax.plot(range(1, len(drift) + 1), drift, "o-", label=name)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative drift of hidden states vs fp32")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    tr = result["training"]
    ax2.plot(range(1, len(tr["loss_fp32"]) + 1), tr["loss_fp32"], label="fp32")
    ax2.plot(range(1, len(tr["loss_bf16"]) + 1), tr["loss_bf16"], label="bf16 autocast")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


__all__ = ["compare_logits", "curve_difference", "fake_quantize_fp8", "inference_numerics", "loss_spikes",
           "run_numerics", "training_numerics"]
