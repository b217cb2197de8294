"""Cross-entropy over a large vocabulary, a chunk of rows at a time, with its gradient computed on the way.

`F.cross_entropy(logits.float(), targets)` on (tokens x 49k-150k vocabulary) logits materialises the fp32 copy,
the log-softmax, then in the backward a zero-filled gradient and the softmax gradient: four tensors of
tokens x vocab x 4 bytes (~220 MB each for a 4-sample batch of the bundled model), each one written to memory
that is not in any cache. On CPU that took 1.6 s of a 3.8 s LoRA step (docs/benchmarks.md). Here each chunk of
~4M logits is upcast, reduced and turned into its gradient (softmax - one_hot) while it is in cache; the gradient
is stored once, in the logits' own dtype (what the backward of `logits.float()` would hand back anyway).
The loss is the same sum, in fp32.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22  # ~16 MB of fp32 logits per chunk: stays in cache on common CPUs


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        rows, vocab = logits.shape
        step = max(1, CHUNK_ELEMENTS // vocab)
        with torch.autocast(logits.device.type, enabled=False):
            total = torch.zeros((), dtype=torch.float32, device=logits.device)
            grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
            for start in range(0, rows, step):
                x = logits[start:start + step].float()
                t = targets[start:start + step, None]
                lse = torch.logsumexp(x, dim=-1, keepdim=True)
                total += (lse - x.gather(1, t)).sum()
                if grad is not None:
                    x.sub_(lse).exp_()  # softmax
                    x.scatter_add_(1, t, torch.full_like(t, -1, dtype=x.dtype))  # - one_hot
                    grad[start:start + step] = x
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over rows of -log softmax(logits)[target], in fp32. logits: (rows, vocab); every target is a class id."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (rows, vocab) and targets (rows,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    return _ChunkedCrossEntropy.apply(logits, targets)
