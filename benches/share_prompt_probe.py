"""One policy update (forward + backward, fused LM head and GRPO loss) and one reference pass (no grad), with each
prompt repeated G times or run once per group (``--share_prompt``), on CPU at Qwen2-VL-2B's widths with its depth
cut: text 2 layers of 1536 (vocabulary 151,936, tied head), vision 2 blocks of 1280.

    python benches/share_prompt_probe.py {shared|repeated} [--completion 256] [--pixels 400000] [--prompts 1]
        [--arch qwen2-vl|qwen3-vl|qwen3.5]

``--arch qwen3-vl``: Qwen3-VL-2B's widths, 2 decoder layers, 2 vision blocks with deepstack; ``--arch qwen3.5``: a
2B-class Qwen3.5, 4 decoder layers (three Gated DeltaNet, one full attention), 2 vision blocks
(``r1vl_fast.demo.models.build_qwen3_2b_width``).

One image of about ``--pixels`` per prompt (~510 image tokens at 400k), a ~90-token question, G = 4 completions of
``--completion`` tokens. Prints one JSON line: FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` on the
same code path (all of it, and the backbone alone: vision + decoder, without the LM head), the wall time of the
update and of the reference pass, the peak resident memory of the update beyond the model and its inputs, and a
checksum of the log-probs (the same in both layouts).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from loss_memory_probe import _resident  # this folder: run as a script
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from r1vl_fast.demo.models import build_qwen2_vl_2b_width, build_qwen3_2b_width, demo_processing
from r1vl_fast.modeling import completion_hidden, lm_head
from r1vl_fast.ops import GRPOConfig, linear_grpo_loss, linear_log_probs
from r1vl_fast.processing import batch_inputs, shared_inputs

G = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("layout", choices=("shared", "repeated"))
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--pixels", type=int, default=400_000)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--arch", default="qwen2-vl", choices=("qwen2-vl", "qwen3-vl", "qwen3.5"))
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (depth cut); default 2, and 4 for qwen3.5 (its 3 + 1 pattern)")
    args = parser.parse_args()
    processing = demo_processing(3136, args.pixels, arch=args.arch)
    if args.arch == "qwen2-vl":
        model = build_qwen2_vl_2b_width(processing, layers=2, vision_depth=2).train()
    else:
        layers = args.layers or (4 if args.arch == "qwen3.5" else 2)
        model = build_qwen3_2b_width(processing, args.arch, layers=layers, vision_depth=2).train()
    side = int(args.pixels**0.5)
    question = ("Look at the figure. How many triangles are there in total, counting those formed by the crossing "
                "lines? Explain each step, then give the final answer. ") * 2
    prompts = [processing.encode_prompt(question, Image.new("RGB", (side, side), (40 * i, 90, 160)))
               for i in range(args.prompts)]
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(100, 140_000, (args.completion,), generator=g).tolist()  # within every vocabulary
                 for _ in range(args.prompts * G)]
    ids = torch.tensor(responses)
    mask = torch.ones_like(ids, dtype=torch.bool)
    rewards = torch.rand(len(responses), generator=g)
    if args.layout == "shared":
        batch = shared_inputs(processing, prompts, responses, G)
    else:
        batch = batch_inputs(processing, [p for p in prompts for _ in range(G)], responses)
    config = GRPOConfig(beta=0.0, group_size=G)

    def update() -> torch.Tensor:
        hidden = completion_hidden(model, batch, ids.shape[1])
        weight, _ = lm_head(model)
        loss, metrics = linear_grpo_loss(hidden, weight, ids, mask, config=config, rewards=rewards)
        loss.backward()
        return metrics["logp"]

    def backbone() -> None:
        completion_hidden(model, batch, ids.shape[1]).sum().backward()

    @torch.no_grad()
    def reference() -> torch.Tensor:
        hidden = completion_hidden(model, batch, ids.shape[1])
        return linear_log_probs(hidden, lm_head(model)[0], ids)  # type: ignore[return-value]

    with FlopCounterMode(display=False) as counter:
        update()
    flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        backbone()
    backbone_flops = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _resident()
    start = time.perf_counter()
    logp = update()
    update_s = time.perf_counter() - start
    peak = _resident("VmHWM") - base - sum(p.numel() * 4 for p in model.parameters())  # minus the gradients
    start = time.perf_counter()
    ref = reference()
    reference_s = time.perf_counter() - start
    prompt_tokens = len(prompts[0].input_ids)
    print(json.dumps({"layout": args.layout, "arch": args.arch, "prompt_tokens": prompt_tokens,
                      "image_tokens": int((torch.tensor(prompts[0].input_ids) == processing.image_token_id).sum()),
                      "completion_tokens": args.completion, "group": G, "prompts": args.prompts,
                      "update_TFLOP": flops / 1e12, "backbone_TFLOP": backbone_flops / 1e12,
                      "update_seconds": update_s, "reference_seconds": reference_s,
                      "update_peak_extra_MB": peak / 2**20, "logp_sum": float(logp.detach().double().sum()),
                      "ref_logp_sum": float(ref.double().sum())}))


if __name__ == "__main__":
    main()
