"""Cross-entropy of the output head without the (tokens, vocab) logits in memory.

`linear_cross_entropy(hidden, weight, labels)` equals
`F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)` (mean over the labelled
tokens), computed a block of rows at a time: each block's logits are made, turned into its loss
and, at once, into its gradients with respect to the hidden states and the head weight, then
dropped. So the step never holds the fp32 logits, their log-softmax or their gradient (three
(tokens, vocab) fp32 tensors, 134 MB each at 4096 tokens and an 8K vocabulary), and the softmax
is computed once for the loss and the gradient together (the fused linear cross-entropy of Liger
and Apple's Cut Cross-Entropy, without their kernels).

The products run in the dtype of `hidden` (bf16 under autocast, as the unfused head does); the
softmax, the loss and the weight gradient accumulate in fp32.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

# Bytes of one block's (rows, vocab) fp32 logits: small enough that the block's several passes
# (log-sum-exp, softmax, scaling, cast) stay in a CPU's last-level cache, large enough that its
# GEMMs run at full speed; never fewer than MIN_BLOCK_ROWS rows.
BLOCK_BYTES = 8 << 20
MIN_BLOCK_ROWS = 128


def block_rows_for(vocab: int) -> int:
    return max(MIN_BLOCK_ROWS, BLOCK_BYTES // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, block_rows):  # noqa: D102
        # hidden (N, H) in the compute dtype, weight (V, H) as stored, labels (N,) int64
        N = hidden.shape[0]
        w = weight.to(hidden.dtype)
        valid = labels != IGNORE_INDEX
        scale = 1.0 / valid.sum().clamp_min(1).float()  # a tensor: no host sync
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, N, block_rows):
            rows = slice(start, min(start + block_rows, N))
            h, keep = hidden[rows], valid[rows]
            y = labels[rows].clamp_min(0).unsqueeze(1)  # (n, 1)
            logits = (h @ w.T).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += ((lse - logits.gather(1, y).squeeze(1)) * keep).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(mean loss)/d logits = (softmax - onehot) / count on the labelled rows, 0 elsewhere
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, y, torch.full(y.shape, -1.0, device=grad.device))
            grad.mul_((keep * scale).unsqueeze(1))
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad @ w
            if grad_weight is not None:
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = grad_weight * grad_output if grad_weight is not None else None
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         block_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` (IGNORE_INDEX rows left out).

    hidden (..., H), weight (V, H), labels (...) -> scalar fp32. Under autocast the products run in
    the autocast dtype, as an autocast `F.linear` head would.
    """
    H = hidden.shape[-1]
    dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    hidden = hidden.reshape(-1, H).to(dtype)
    block_rows = block_rows or block_rows_for(weight.shape[0])
    if not torch.is_grad_enabled():  # the forward computes gradients for inputs that require them
        hidden, weight = hidden.detach(), weight.detach()
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, labels.reshape(-1), block_rows)


__all__ = ["IGNORE_INDEX", "block_rows_for", "linear_cross_entropy"]
