"""Peak memory of one GRPO loss forward + backward beyond its inputs, on CPU, at a real vocabulary.

    python benches/loss_memory_probe.py {trainer|sliced} BATCH LENGTH

The logits [B, T + 1, V = 151,936] come out of an LM head (hidden [B, T + 1, 1536] @ W^T, W frozen), as in the
trainer. ``trainer`` is today's path: the model's buffer as it is, the gradient written over it, the accumulation
scale applied in the kernel. ``sliced`` is the path before it: ``logits[:, :-1]`` handed to the loss, a separate
gradient buffer, ``(loss / 2).backward()``. The kernels run in Triton's interpreter on CPU tensors.

The probe is the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs after a warm-up run),
with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_, set by the caller) so that freed buffers leave the
resident set at once. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from r1vl_fast.ops import GRPOConfig, grpo_loss  # noqa: E402

VOCAB, HIDDEN = 151_936, 1536


def _resident(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def step(path: str, batch: int, length: int, weight: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length + 1, HIDDEN, generator=g).requires_grad_()
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    rewards = torch.rand(batch, generator=g)
    config = GRPOConfig(beta=0.0, group_size=batch)
    logits = hidden @ weight.T  # the LM head's output buffer [B, T + 1, V]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current resident set
    base = _resident()
    if path == "trainer":
        loss, _ = grpo_loss(logits, ids, mask, config=config, rewards=rewards, loss_scale=0.5,
                            last_position_unused=True, grad_inplace=True, validate=False, impl="triton")
        loss.backward()
    else:
        loss, _ = grpo_loss(logits[:, :-1], ids, mask, config=config, rewards=rewards, impl="triton")
        (loss / 2).backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    return hidden.grad, _resident("VmHWM") - base


def main() -> int:
    path, batch, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.02
    step(path, 2, 4, weight)  # warm-up: the interpreter's one-time allocations are not the loss's
    start = time.perf_counter()
    grad, extra = step(path, batch, length, weight)
    logits_bytes = batch * (length + 1) * VOCAB * 4
    print(json.dumps({"path": path, "batch": batch, "length": length, "vocab": VOCAB, "logits_MB": logits_bytes / 1e6,
                      "peak_extra_MB": extra / 1e6, "peak_extra_in_logits": extra / logits_bytes,
                      "grad_hidden_sum": float(grad.double().sum()), "seconds": time.perf_counter() - start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
