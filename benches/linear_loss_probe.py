"""Peak memory and time of one GRPO loss forward + backward from the final hidden states, LM head included, on CPU
at Qwen2-VL-2B's widths (H = 1536, V = 151,936, tied head in fp32).

    python benches/linear_loss_probe.py {fused|materialised|trl|liger} TOKENS

- ``fused``: ``r1vl_fast.ops.linear_grpo_loss`` (the trainer's default): logits formed a block of tokens at a time.
- ``materialised``: ``hidden @ W.T`` then our ``grpo_loss`` (``--fused_lm_head false`` on CPU: the reference).
- ``trl``: TRL's eager recipe: logits, ``log_softmax``, ``gather``, ratio, clip, per-sequence mean.
- ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (chunked PyTorch), when it is installed.

Peak memory is the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) beyond the inputs and
the two gradients (hidden's and the weight's), which every path must produce; glibc's mmap threshold is fixed by the
caller so freed buffers leave the resident set at once. Prints one JSON line with the gradients' checksums.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from loss_memory_probe import _resident  # this folder: run as a script

from r1vl_fast.ops import GRPOConfig, grpo_loss, linear_grpo_loss

VOCAB, HIDDEN, GROUP = 151_936, 1536, 4


def inputs(tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    length = tokens // GROUP
    return {"hidden": torch.randn(GROUP, length, HIDDEN, generator=g),
            "weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02,
            "ids": torch.randint(0, VOCAB, (GROUP, length), generator=g),
            "mask": torch.ones(GROUP, length, dtype=torch.bool), "rewards": torch.rand(GROUP, generator=g)}


def run(path: str, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One loss forward + backward from the leaves ``x['hidden']`` and ``x['weight']``; returns their gradients."""
    hidden, weight = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
    config = GRPOConfig(beta=0.0, group_size=GROUP)
    if path == "fused":
        loss, _ = linear_grpo_loss(hidden, weight, x["ids"], x["mask"], config=config, rewards=x["rewards"])
    elif path == "materialised":
        loss, _ = grpo_loss(hidden @ weight.T, x["ids"], x["mask"], config=config, rewards=x["rewards"],
                            validate=False, impl="torch")
    elif path == "trl":
        logits = hidden @ weight.T
        logp = torch.gather(logits.log_softmax(-1), 2, x["ids"].unsqueeze(-1)).squeeze(-1)
        r = x["rewards"].view(-1, GROUP)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        ratio = torch.exp(logp - logp.detach())
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
        m = x["mask"].float()
        loss = ((per_token * m).sum(1) / m.sum(1)).mean()
    elif path == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        r = x["rewards"].view(-1, GROUP)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
        fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo", compiled=False)  # eager on CPU
        out = fn(hidden, weight, x["ids"], x["mask"].long(), adv)
        loss = out[0] if isinstance(out, tuple) else out
    else:
        raise SystemExit(f"unknown path {path!r}")
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    return hidden.grad, weight.grad


def main() -> None:
    path, tokens = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(torch.get_num_threads())
    run(path, inputs(GROUP * 4))  # warm-up (allocator, kernels), tiny
    x = inputs(tokens)
    grads_bytes = x["hidden"].numel() * 4 + x["weight"].numel() * 4
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _resident()
    start = time.perf_counter()
    grad_h, grad_w = run(path, x)
    seconds = time.perf_counter() - start
    peak = _resident("VmHWM") - base - grads_bytes
    logits_bytes = tokens * VOCAB * 4
    print(json.dumps({"path": path, "tokens": tokens, "seconds": seconds, "peak_extra_MB": peak / 2**20,
                      "logits_MB": logits_bytes / 2**20, "peak_extra_in_logits": peak / logits_bytes,
                      "grad_hidden_sum": float(grad_h.double().abs().sum()),
                      "grad_weight_sum": float(grad_w.double().abs().sum())}))


if __name__ == "__main__":
    main()
