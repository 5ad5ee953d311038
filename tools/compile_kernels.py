"""Compile the Triton kernels ahead of time for real GPUs, on a machine without one.

    python tools/compile_kernels.py SPECS.json [--arch 80 90] [--jobs 2]

SPECS.json lists launches as the ops build them (``r1vl_fast.ops.launch``; ``tests/test_kernels_compile.py`` writes
it): kernel name, signature, constexprs and compile options (warps, register bound). Each is compiled with
``triton.compile`` for a ``GPUTarget`` and its cubin's resource usage is read with the ``cuobjdump`` that ships in
the triton wheel: registers, stack and local memory (spills), shared memory. The PTX's ``ex2`` count per element
says how many exponentials each logit costs. Prints one JSON object per launch and architecture.

Needs only ``triton`` (no torch, no GPU, no driver), so it also runs in a bare virtualenv that holds an older
Triton: the kernels file is loaded from its path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

KERNELS = Path(__file__).resolve().parents[1] / "kernels" / "grpo_loss.py"


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("r1vl_fast_kernels_grpo_loss", KERNELS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_one(launch: dict[str, Any], arch: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = getattr(_module(), launch["kernel"])
    result: dict[str, Any] = {"kernel": launch["kernel"], "arch": f"sm_{arch}", "constexprs": launch["constexprs"],
                              "signature": launch["signature"], "options": launch["options"],
                              "triton": triton.__version__}
    try:
        source = triton.compiler.ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constexprs"])
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch["options"])
    except Exception as e:  # any compile error is the result
        return {**result, "error": f"{type(e).__name__}: {e}"[:2000]}
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    block = launch["constexprs"].get("BLOCK_V", 0)
    per_thread = block / (32 * launch["options"]["num_warps"]) if block else 0
    return {**result, "registers": int(fields.get("REG", -1)), "stack_bytes": int(fields.get("STACK", -1)),
            "local_bytes": int(fields.get("LOCAL", -1)), "shared_bytes": int(fields.get("SHARED", -1)),
            "ex2": ptx.count("ex2.approx"), "ex2_per_element": round(ptx.count("ex2.approx") / per_thread, 2)
            if per_thread else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", help="JSON list of launches (kernel, signature, constexprs, options).")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="Compute capabilities, e.g. 80 90.")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="Parallel compiles.")
    args = parser.parse_args(argv)
    launches = json.loads(Path(args.specs).read_text())
    jobs = [(launch, arch) for launch in launches for arch in args.arch]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for result in pool.map(compile_one, *zip(*jobs)):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
