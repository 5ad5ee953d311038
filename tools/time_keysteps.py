"""Throughput of the rules key-step extractor through the command's own path (read, extract, self-check, write):
2,000 Mulberry rows whose CoTs are built from the adversarial fragments of tests/test_keysteps.py.

    python tools/time_keysteps.py [WORK_DIR]
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_keysteps import _PIECES, cot  # noqa: E402

from r1vl_fast.keysteps import convert  # noqa: E402

ROWS = 2000


def main() -> None:
    rng = random.Random(0)
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/time-keysteps")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "sft.jsonl", "w") as f:
        for i in range(ROWS):
            steps = [" ".join(rng.choice(_PIECES) for _ in range(rng.randint(2, 8))) for _ in range(rng.randint(2, 6))]
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Q{i}"},
                                             {"role": "assistant", "content": cot(*steps)}]}) + "\n")
    for preset in ("paper", "r1vl"):
        start = time.perf_counter()
        result = convert(root / "sft.jsonl", root / f"out-{preset}.jsonl", reward_preset=preset, overwrite=True,
                         progress=False)
        seconds = time.perf_counter() - start
        print(f"{preset}: {seconds:.2f} s, {ROWS / seconds:.0f} rows/s, written {result.written}, "
              f"rejected {dict(result.rejected)}, groups/row {result.groups / max(result.written, 1):.2f}")


if __name__ == "__main__":
    main()
