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
of 16 x 1024 tokens over Orion's 113,664-token vocabulary, each such float32 copy is 7.45 GB.

`cross_entropy` walks through the positions in chunks instead. For each chunk it computes
the logits, the loss and, right away, both gradients (the formulas above), then drops the
logits: nothing of size N x vocab_size ever exists. The backward pass has nothing left to
do but scale the stored gradients by the incoming one. It is also less work: the softmax
is turned into g in place, where the plain way makes a log-softmax, then a gradient of the
same size in the backward pass, each a full pass over memory (docs/08_training.md
measures the difference on a CPU).
"""

import torch


def chunk_size_for(device: torch.device) -> int:
    """Positions per chunk. On a CPU 512 (measured a little faster than larger or smaller
    chunks for the toy model: 8 MB of float32 logits at vocab 4096); on a GPU 4096, so that
    each chunk's kernels have plenty to do and a step launches few of them (1.86 GB of
    float32 logits for Orion's vocabulary, plus a bf16 copy under autocast)."""
    return 512 if device.type == "cpu" else 4096


def cross_entropy(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """mean over i of -log softmax(w h_i)[y_i]: h (N, dim), w (vocab_size, dim), y (N,) -> 0-d float32.

    The value and the gradients of F.cross_entropy(F.linear(h, w), y) (without its options:
    every target counts, no ignore_index, no label smoothing), computed chunk by chunk
    (module docstring; chunk_size None: chunk_size_for(h.device)). Under autocast the matmuls
    run in autocast's dtype and the softmax in float32, as they would for F.linear followed
    by F.cross_entropy.
    """
    if y.shape != h.shape[:1]:
        raise ValueError(f"one target per row of h: h {tuple(h.shape)}, y {tuple(y.shape)}")
    chunk_size = chunk_size or chunk_size_for(h.device)
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        return LinearCrossEntropy.apply(h, w, y, chunk_size)
    return loss_and_grads(h, w, y, chunk_size, want_grad_h=False, want_grad_w=False)[0]


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy's autograd: the forward pass computes the gradients, the backward scales
    them. First derivatives only: the stored gradients are numbers, not functions of h and w."""

    @staticmethod
    def forward(ctx, h, w, y, chunk_size):
        want_grad_h, want_grad_w = ctx.needs_input_grad[:2]  # e.g. a frozen lm_head needs no grad_w
        loss, grad_h, grad_w = loss_and_grads(h, w, y, chunk_size, want_grad_h, want_grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (
            (None if grad_h is None else grad_h * grad_loss),
            (None if grad_w is None else grad_w * grad_loss),
            None,
            None,
        )


def loss_and_grads(h, w, y, chunk_size: int, want_grad_h: bool, want_grad_w: bool):
    """The mean loss, and the gradients asked for (else None) with respect to h and w, chunk by chunk."""
    N = len(h)
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype  # the matmuls' dtype
    # float16 cannot hold the gradient's small entries (p / N flushes to zero): keep it in float32.
    # bf16 has float32's range, so under bf16 autocast the gradient matmuls run in bf16.
    grad_dtype = torch.float32 if dtype == torch.float16 else dtype
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if want_grad_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_grad_w else None
    with torch.autocast(h.device.type, enabled=False):  # from here on each dtype is the one written
        w_c = w.to(dtype)
        w_g = w_c if grad_dtype == dtype else w.to(grad_dtype)  # converted once, not twice
        for start in range(0, N, chunk_size):
            h_c, y_c = h[start : start + chunk_size].to(dtype), y[start : start + chunk_size]
            logits = (h_c @ w_c.T).float()  # (n, vocab_size): this chunk's logits only
            # Shifting a row by its maximum changes neither softmax nor the loss, and keeps exp
            # finite. From here on the float32 logits are turned, in place, into the gradient g.
            logits -= logits.amax(dim=-1, keepdim=True)
            target = logits.gather(1, y_c[:, None])  # (n, 1): logits[y]
            p = logits.exp_()  # (n, vocab_size), unnormalised
            total = p.sum(dim=-1, keepdim=True)  # (n, 1): log(total) = logsumexp(logits)
            loss += (total.log() - target).sum()
            if want_grad_h or want_grad_w:
                g = p.div_(total * N)  # softmax(logits), times the mean's 1/N
                g[torch.arange(len(y_c), device=g.device), y_c] -= 1 / N  # minus onehot(y) / N
                g = g.to(grad_dtype)
                if want_grad_h:
                    grad_h[start : start + chunk_size] = g @ w_g
                if want_grad_w:
                    grad_w += g.T @ h_c.to(grad_dtype)
    return loss / N, grad_h, None if grad_w is None else grad_w.to(w.dtype)
