"""``python -m r1vl_fast.keysteps``: Mulberry SFT rows → R1-VL-10K rows with key steps (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from r1vl_fast.data import DataError
from r1vl_fast.keysteps import EndpointError, LLMExtractor, convert, summary
from r1vl_fast.rewards.step_rar import PRESETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m r1vl_fast.keysteps", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Turn Mulberry-format SFT rows (messages with the assistant CoT, images) into R1-VL-10K rows "
                    "(image_path, problem, solution, key_steps) for StepGRPO. Rows are appended as they finish; "
                    "rerunning the same command resumes. Rows that cannot be converted go to "
                    "<output stem>.rejected.jsonl (train.rejected.jsonl for train.jsonl) with the reason.")
    parser.add_argument("--input", required=True, help="Mulberry SFT file (JSON array or JSONL).")
    parser.add_argument("--output", required=True, help="R1-VL-10K JSONL file to write.")
    parser.add_argument("--extractor", choices=("rules", "llm"), default="rules",
                        help="rules: offline and deterministic; llm: an OpenAI-compatible chat endpoint.")
    parser.add_argument("--image_root", default=None, help="Folder the input's image paths are relative to "
                        "(default: the input's folder). Output paths are relative to the output's folder.")
    parser.add_argument("--reward_preset", choices=PRESETS, default="paper",
                        help="The matcher the self-check uses: the trainer's for this --reward_preset.")
    parser.add_argument("--max_key_steps", type=int, default=8, help="Most key-step groups per row.")
    parser.add_argument("--max_forms", type=int, default=10, help="Most alternatives per group.")
    parser.add_argument("--skip_invalid", action="store_true", help="Skip malformed input rows (counted) "
                        "instead of stopping at the first.")
    parser.add_argument("--overwrite", action="store_true", help="Start over instead of resuming OUTPUT.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    llm = parser.add_argument_group("llm extractor")
    llm.add_argument("--endpoint", default=None, help="Base URL of the OpenAI-compatible API, e.g. "
                     "http://localhost:8000/v1 for `vllm serve`.")
    llm.add_argument("--model", default=None, help="Model name the endpoint serves.")
    llm.add_argument("--api_key", default=None, help="API key (default: $OPENAI_API_KEY, else 'EMPTY').")
    llm.add_argument("--concurrency", type=int, default=8, help="Requests in flight.")
    llm.add_argument("--max_attempts", type=int, default=3,
                     help="Answers asked per row; an unusable one is sent back with what was wrong.")
    llm.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature of the first attempt.")
    llm.add_argument("--retry_temperature", type=float, default=0.7, help="Sampling temperature of later attempts.")
    llm.add_argument("--max_tokens", type=int, default=1024, help="Longest answer.")
    llm.add_argument("--timeout", type=float, default=120.0, help="Seconds per request.")
    llm.add_argument("--http_retries", type=int, default=3,
                     help="Retries of a failed request (connection errors, 429, 5xx) before the run stops.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    llm = None
    if args.extractor == "llm":
        if not args.endpoint or not args.model:
            parser.error("--extractor llm needs --endpoint and --model")
        api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        llm = LLMExtractor(args.endpoint, args.model, api_key=api_key, max_steps=args.max_key_steps,
                           max_attempts=args.max_attempts, temperature=args.temperature,
                           retry_temperature=args.retry_temperature, max_tokens=args.max_tokens,
                           timeout=args.timeout, http_retries=args.http_retries)
    try:
        result = convert(args.input, args.output, extractor=args.extractor, reward_preset=args.reward_preset,
                         image_root=args.image_root, llm=llm, max_key_steps=args.max_key_steps,
                         max_forms=args.max_forms, concurrency=args.concurrency, skip_invalid=args.skip_invalid,
                         overwrite=args.overwrite, progress=not args.no_progress)
    except (DataError, EndpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, EndpointError):
            print("The rows written so far are kept; run the same command again to resume.", file=sys.stderr)
        return 2
    report = summary(result)
    print(json.dumps(report, indent=1))
    if result.rejected:
        print(f"{sum(result.rejected.values())} rows rejected, with reasons: {result.rejected_file}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
