"""``python -m r1vl_fast.sft``: the SFT warm-up on Mulberry-format data that teaches the step-by-step format
before StepGRPO (same options, checkpoints and resume as the trainer).

    python -m r1vl_fast.sft --model_name_or_path Qwen/Qwen2-VL-2B-Instruct --dataset mulberry.jsonl \\
        --image_root images/ --preset r1vl-2b --output_dir runs/sft-2b
"""

from __future__ import annotations

import sys

from r1vl_fast.config import SFTConfig, parse_config
from r1vl_fast.errors import reports_user_errors
from r1vl_fast.recipes import run_sft
from r1vl_fast.runner import setup_logging


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(SFTConfig, argv, "python -m r1vl_fast.sft")
    assert isinstance(config, SFTConfig)
    run_sft(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
