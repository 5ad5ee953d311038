"""``python -m r1vl_fast.train``: StepGRPO on R1-VL-10K-format data. With no arguments: the built-in CPU demo.

    python -m r1vl_fast.train --model_name_or_path ckpt/sft --dataset r1vl10k.json --image_root images/ \\
        --preset r1vl-2b --output_dir runs/r1vl-2b
"""

from __future__ import annotations

import sys

from r1vl_fast.config import GRPOTrainConfig, parse_config
from r1vl_fast.demo.run import run_demo
from r1vl_fast.errors import reports_user_errors
from r1vl_fast.recipes import run_grpo
from r1vl_fast.runner import setup_logging


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(GRPOTrainConfig, argv, "python -m r1vl_fast.train")
    assert isinstance(config, GRPOTrainConfig)
    if config.is_demo:
        run_demo(config)
    else:
        run_grpo(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
