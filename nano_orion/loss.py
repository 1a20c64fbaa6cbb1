"""The training loss: cross-entropy over the vocabulary, without ever holding every logit.

A language model learns to predict each next token. For a position whose final hidden
vector is h (dim numbers) and whose true next token is y:

    logits = W h                                  # (vocab_size,): a score for every token
    loss   = logsumexp(logits) - logits[y]        # = -log softmax(logits)[y]

averaged over the N positions of a batch. Its gradients are short enough to write down:

    g          = softmax(logits) - onehot(y)      # d loss / d logits (times 1/N for the mean)
    d loss / dh = W^T g                           # back into the model
    d loss / dW = g h^T                           # for the output layer

The plain way, F.cross_entropy(lm_head(h), y), materialises N x vocab_size logits and keeps
them for the backward pass, plus a log-softmax and a gradient of the same size. For a batch
of 16 x 1024 tokens over Orion's 113,664-token vocabulary, each such float32 copy is 7.4 GB.

`cross_entropy` walks through the positions in chunks instead. For each chunk it computes
the logits, the loss and, right away, both gradients (the formulas above), then drops the
logits: nothing of size N x vocab_size ever exists. The backward pass has nothing left to
do but scale the stored gradients by the incoming one. On a CPU the small working set is
also faster (measured in docs/08_training.md): a chunk's logits stay in the cache.
"""

import torch

from .moe import compute_dtype


def chunk_size_for(device: torch.device) -> int:
    """Positions per chunk. On a CPU few enough that a chunk's logits stay in the cache (512:
    8 MB of float32 logits for a 4096-token vocabulary); on a GPU enough that each chunk's
    kernels have plenty to do and a step launches few of them (4096: 1.9 GB of float32
    logits for Orion's 113,664-token vocabulary, a quarter of a 16 x 1024 batch's 7.45 GB)."""
    return 512 if device.type == "cpu" else 4096


def cross_entropy(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """mean over i of -log softmax(w h_i)[y_i]: h (N, dim), w (vocab_size, dim), y (N,) -> 0-d float32.

    The value and the gradients of F.cross_entropy(F.linear(h, w), y), computed chunk by
    chunk (module docstring; chunk_size None: chunk_size_for(h.device)). Under autocast the
    matmuls run in autocast's dtype and the softmax in float32, as they would for F.linear
    followed by F.cross_entropy.
    """
    chunk_size = chunk_size or chunk_size_for(h.device)
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        return LinearCrossEntropy.apply(h, w, y, chunk_size)
    return loss_and_grads(h, w, y, chunk_size, grads=False)[0]


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy's autograd: the forward pass computes the gradients, the backward scales them."""

    @staticmethod
    def forward(ctx, h, w, y, chunk_size):
        loss, grad_h, grad_w = loss_and_grads(h, w, y, chunk_size, grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None


def loss_and_grads(h, w, y, chunk_size: int, grads: bool):
    """The mean loss, and (if grads) its gradients with respect to h and w, chunk by chunk."""
    N = len(h)
    dtype = compute_dtype(h)  # the matmuls' dtype
    w_c = w.to(dtype)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grads else None
    for start in range(0, N, chunk_size):
        h_c, y_c = h[start:start + chunk_size].to(dtype), y[start:start + chunk_size]
        logits = (h_c @ w_c.T).float()  # (n, vocab_size): this chunk's logits only
        # Shifting a row by its maximum changes neither softmax nor the loss, and keeps exp finite.
        # In place from here on: no other chunk-sized tensor is allocated.
        logits -= logits.amax(dim=-1, keepdim=True)
        target = logits.gather(1, y_c[:, None])  # (n, 1): logits[y]
        p = logits.exp_()  # (n, vocab_size), unnormalised
        total = p.sum(dim=-1, keepdim=True)  # (n, 1): log(total) = logsumexp(logits)
        loss += (total.log() - target).sum()
        if grads:
            g = p.div_(total * N)  # softmax(logits), times the mean's 1/N
            g[torch.arange(len(y_c), device=g.device), y_c] -= 1 / N  # minus onehot(y) / N
            g = g.to(dtype)
            grad_h[start:start + chunk_size] = g @ w_c
            grad_w += g.T @ h_c
    return loss / N, grad_h, None if grad_w is None else grad_w.to(w.dtype)
