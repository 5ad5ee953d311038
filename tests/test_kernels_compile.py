"""Every Triton kernel specialization the ops can launch compiles for real GPUs (sm_80, sm_90) with no register
spills, under the installed Triton and under Triton 3.6 (the oldest supported: the GPU machines' image has it).

The interpreter (which the other kernel tests use) is more lenient than the compiler: a kernel that only passes it
may not compile at all. The launches come from ``r1vl_fast.ops.launch``, the builders the ops call, applied to
``meta`` tensors as a GPU would see them, so this cannot drift from what runs. No GPU is needed:
``tools/compile_kernels.py`` compiles with ``triton.compile`` for a ``GPUTarget`` and reads the cubin's resource
usage with the ``cuobjdump`` of the triton wheel.

CI sets ``R1VL_TRITON36_PYTHON`` to a virtualenv's python that holds only ``triton==3.6.*`` (see ``.ci/run``).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from r1vl_fast.ops import GRPOConfig
from r1vl_fast.ops import launch as L

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "compile_kernels.py"
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# (B, T, V): the headline shape, and one whose [B, T + 1, V] logits have strides past 2^31 (64-bit arguments)
SHAPES = ((8, 1024, 151_936), (2, 16_384, 151_936))


def reachable_launches() -> list[dict[str, Any]]:
    """Every distinct (kernel, signature, constexprs, options) the ops launch on a GPU, over logits dtypes, 32- and
    64-bit strides, and every constexpr flag."""
    seen: dict[str, dict[str, Any]] = {}

    def add(launch: L.Launch) -> None:
        spec = {"kernel": launch.name, "signature": launch.signature(), "constexprs": launch.constexprs,
                "options": launch.options}
        seen.setdefault(json.dumps(spec, sort_keys=True), spec)

    meta = dict(device="meta")
    for dtype, (batch, length, vocab) in itertools.product(DTYPES, SHAPES):
        logits = torch.empty(batch, length + 1, vocab, dtype=dtype, **meta)  # the model's buffer (trainer layout)
        ids = torch.empty(batch, length, dtype=torch.int64, **meta)
        rows = torch.empty(batch, length, dtype=torch.float32, **meta)
        for entropy in (False, True):
            launch, _, lse, ent = L.log_probs_fwd(logits, ids, 1.0, entropy, device_type="cuda")
            add(launch)
            add(L.log_probs_bwd(logits, ids, 1.0, lse, ent, rows, rows if entropy else None, logits,
                                device_type="cuda"))
        add(L.scale_rows(logits, length, torch.empty(1, **meta), device_type="cuda"))
        for entropy, write_grad in itertools.product((False, True), (False, True)):
            launch, _ = L.grpo_fwd(logits, ids, rows, GRPOConfig(group_size=4), advantages=None,
                                   rewards=torch.empty(batch, **meta), batch_std=None, old_logp=rows, ref_logp=rows,
                                   is_weights=rows, loss_scale=1.0, entropy=entropy,
                                   grad=logits if write_grad else None, device_type="cuda")
            add(launch)
    # the LM head fused in (linear_log_probs): Qwen2-VL-2B's and 7B's widths, 8 x 1024 tokens
    for dtype, width, bias, entropy in itertools.product(DTYPES[:3], (1536, 3584), (False, True), (False, True)):
        hidden = torch.empty(8 * 1024, width, dtype=dtype, **meta)
        weight = torch.empty(151_936, width, dtype=dtype, **meta)
        launch, _ = L.linear_lse_fwd(hidden, weight, torch.empty(151_936, dtype=dtype, **meta) if bias else None,
                                     torch.empty(8 * 1024, dtype=torch.int64, **meta), 1.0, entropy,
                                     device_type="cuda")
        add(launch)
    return list(seen.values())


def _compile(python: str, tmp_path: Path) -> list[dict[str, Any]]:
    specs = tmp_path / "launches.json"
    specs.write_text(json.dumps(reachable_launches()))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    out = subprocess.run([python, str(TOOL), str(specs), "--arch", "80", "90", "--jobs", str(os.cpu_count() or 1)],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _check(results: list[dict[str, Any]]) -> None:
    launches = reachable_launches()
    assert len(results) == 2 * len(launches)
    assert {r["kernel"] for r in results} == {"selective_log_probs_fwd_kernel", "selective_log_probs_bwd_kernel",
                                              "scale_rows_kernel", "grpo_loss_fwd_kernel", "linear_lse_fwd_kernel"}
    failed = [f"{r['kernel']} {r['arch']} {r['constexprs']}: {r['error']}" for r in results if "error" in r]
    assert not failed, "\n".join(failed)
    spilled = [r for r in results if r["local_bytes"] != 0 or r["stack_bytes"] != 0 or r["registers"] > 255]
    assert not spilled, json.dumps(spilled, indent=1)[:3000]


def test_reachable_launches_cover_every_constexpr_combination() -> None:
    launches = reachable_launches()
    flags = {(s["kernel"], tuple(sorted((k, v) for k, v in s["constexprs"].items() if k != "BLOCK_V")))
             for s in launches}
    assert len([f for f in flags if f[0] == "grpo_loss_fwd_kernel"]) == 4  # ENTROPY x WRITE_GRAD
    assert len([f for f in flags if f[0] == "selective_log_probs_fwd_kernel"]) == 2
    assert len([f for f in flags if f[0] == "selective_log_probs_bwd_kernel"]) == 2
    linear = [s for s in launches if s["kernel"] == "linear_lse_fwd_kernel"]
    assert len({(s["signature"]["h_ptr"], s["constexprs"]["HAS_BIAS"], s["constexprs"]["ENTROPY"])
                for s in linear}) == 12  # 3 dtypes x bias x entropy
    types = {s["signature"]["logits_ptr"] for s in launches if "logits_ptr" in s["signature"]}
    assert types == {"*bf16", "*fp16", "*fp32", "*fp64"}
    assert {s["signature"]["stride_b"] for s in launches if "stride_b" in s["signature"]} == {"i32", "i64"}


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    _check(_compile(sys.executable, tmp_path))


def test_every_kernel_compiles_under_triton_3_6(tmp_path: Path) -> None:
    python = os.environ.get("R1VL_TRITON36_PYTHON")
    if not python:
        pytest.skip("set R1VL_TRITON36_PYTHON to a python with triton==3.6.* (.ci/run makes one)")
    version = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    assert version.startswith("3.6"), version
    results = _compile(python, tmp_path)
    assert {r["triton"] for r in results} == {version}
    _check(results)
