"""``python -m r1vl_fast.eval``: score a model the way the paper does. It generates in the R1-VL answer format
(greedy by default, as the released evaluation), reads the final answer, and judges it with math-verify (gold
first), multiple-choice letters, yes/no, or normalised text. Writes ``predictions.jsonl`` and ``summary.json``.

The trainer's held-out scoring with the training rewards is ``r1vl_fast.heldout``.

    python -m r1vl_fast.eval --model_name_or_path runs/r1vl-2b/checkpoint-13125 --dataset mathvista.jsonl \\
        --image_root images/ --output_dir runs/eval-mathvista
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1vl_fast.config import check_model_path
from r1vl_fast.data import Columns, DataError, held_out_split, image_ref, read_rows
from r1vl_fast.errors import reports_user_errors
from r1vl_fast.processing import MAX_PIXELS, MIN_PIXELS, Processing
from r1vl_fast.rewards import MathVerifier, final_answer, match_key_steps, step_rvr
from r1vl_fast.rewards.answers import default_verifier, same_answer
from r1vl_fast.rollout import ENGINES, make_engine, sample_completions

log = logging.getLogger("r1vl_fast")

_LETTER = re.compile(r"^\(?([A-Ja-j])\)?(?:[.:)\s]|$)")
_OPTION = re.compile(r"(?:^|\s)\(?([A-J])\)(?:\s|$)")


def _letter(text: str) -> str | None:
    """A multiple-choice answer letter: "B", "(B)", "B.", "B) 12", or "(B)" inside the text."""
    text = text.strip()
    if m := _LETTER.match(text):
        return m.group(1).upper()
    if m := _OPTION.search(text):
        return m.group(1)
    return None


def _yes_no(text: str) -> str | None:
    word = re.sub(r"[^a-z]", "", text.strip().lower().split()[0]) if text.strip() else ""
    return word if word in ("yes", "no") else None


def judge(preds: list[str | None], golds: list[str], verifier: MathVerifier | None = None) -> list[bool]:
    """Is each predicted final answer right? Multiple-choice golds compare letters, yes/no golds compare the
    word, anything else normalised text, then math-verify with the gold first."""
    out: list[bool | None] = []
    pending: list[int] = []
    for i, (pred, gold) in enumerate(zip(preds, golds)):
        if not pred:
            out.append(False)
        elif (letter := _letter(gold)) is not None and len(gold.strip().strip("().")) == 1:
            out.append(_letter(pred) == letter)
        elif (yn := _yes_no(gold)) is not None and len(gold.split()) == 1:
            out.append(_yes_no(pred) == yn)
        elif same_answer(pred, gold):
            out.append(True)
        else:
            out.append(None)
            pending.append(i)
    if pending:
        verdicts = (verifier or default_verifier()).check([(golds[i], preds[i] or "") for i in pending])
        for i, ok in zip(pending, verdicts):
            out[i] = ok
    return [bool(x) for x in out]


def load_benchmark(path: str | Path, processing: Processing, image_root: str | Path | None, *,
                   split: str | None = None, columns: Columns | None = None) -> list[dict[str, Any]]:
    """Rows with ``problem``, an ``answer`` (or a ``solution`` ending in the final-answer line), optionally an image
    and ``key_steps``, from any dataset :func:`r1vl_fast.data.read_rows` reads (columns by :class:`Columns`);
    errors name the file and line (or row)."""
    root = Path(image_root) if image_root is not None else (Path(path) if Path(path).is_dir() else Path(path).parent)
    columns = columns or Columns()
    items = []
    rows = read_rows(path, split=split if split is not None else held_out_split(path))
    columns.check(rows)
    for row in rows:
        d = row.data
        prompt_key = columns.key("prompt", row)
        if not isinstance(d, dict) or not isinstance(d.get(prompt_key), str):
            raise DataError(f"{row.where()}: field {prompt_key!r} must be str")
        answer_key, solution_key = columns.key("answer", row), columns.key("solution", row)
        gold = d.get(answer_key, d.get(solution_key))
        if isinstance(gold, (int, float)):
            gold = str(gold)
        if not isinstance(gold, str):
            raise DataError(f"{row.where()}: needs an {answer_key!r} (or {solution_key!r}) string")
        gold = final_answer(gold) or gold.strip()
        image_key = columns.key("image", row)
        image = image_ref(row, image_key, d.get(image_key), root)
        if image is not None and not processing.multimodal:
            raise DataError(f"{row.where()}: field {image_key!r}: the model is text-only")
        items.append({"where": row.where(), "problem": d[prompt_key], "gold": gold, "image": image,
                      "key_steps": d.get(columns.key("key_steps", row))})
    if not items:
        raise DataError(f"{path}: no rows to evaluate")
    return items


def evaluate_file(model_path: str, dataset: str | Path, output_dir: str | Path, *, image_root: str | None = None,
                  split: str | None = None, columns: Columns | None = None, num_samples: int = 1,
                  temperature: float | None = None, max_new_tokens: int = 1024,
                  min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, batch_size: int = 16,
                  rollout_engine: str = "auto", seed: int = 0) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    processing = Processing.from_pretrained(model_path, min_pixels=min_pixels, max_pixels=max_pixels)
    items = load_benchmark(dataset, processing, image_root, split=split, columns=columns)
    temperature = temperature if temperature is not None else (None if num_samples == 1 else 1.0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine = make_engine(rollout_engine, processing, device=device, dtype=dtype, weights_path=model_path,
                         max_model_len=4096 + max_new_tokens,
                         gpu_memory_utilization=0.8 if device.type == "cuda" else 0.2, sleep_mode=False)
    texts, lengths = sample_completions(engine, processing, [(it["problem"], it["image"]) for it in items],
                                        n=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, seed=seed)
    golds = [it["gold"] for it in items for _ in range(num_samples)]
    preds = [final_answer(t) for t in texts]
    correct = np.array(judge(preds, golds), dtype=bool).reshape(len(items), num_samples)
    valid = step_rvr(texts).reshape(len(items), num_samples)
    with_keys = [i for i, it in enumerate(items) if it["key_steps"]]
    recall = np.full((len(items), num_samples), np.nan)
    if with_keys:
        rows = [i * num_samples + j for i in with_keys for j in range(num_samples)]
        found = match_key_steps([texts[r] for r in rows], [items[r // num_samples]["key_steps"] for r in rows],
                                mode="normalized", min_alt_len=1)
        recall[with_keys] = np.asarray(found).reshape(len(with_keys), num_samples)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, it in enumerate(items):
            block = slice(i * num_samples, (i + 1) * num_samples)
            f.write(json.dumps({"sample": it["where"], "problem": it["problem"], "gold": it["gold"],
                                "completions": texts[block], "predictions": preds[block],
                                "correct": correct[i].tolist(), "valid": valid[i].astype(bool).tolist()}) + "\n")
    summary: dict[str, Any] = {
        "n": len(items), "accuracy": float(correct.mean()), "validity": float(valid.mean()),
        "key_step_recall": float(np.nanmean(recall)) if with_keys else None,
        "mean_completion_length": float(np.mean(lengths)), "num_samples": num_samples,
        "temperature": temperature, "model": model_path, "dataset": str(dataset),
    }
    if num_samples > 1:
        summary[f"pass@{num_samples}"] = float(correct.any(axis=1).mean())
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1vl_fast.eval", description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="A checkpoint directory or hub id.")
    parser.add_argument("--dataset", required=True, help="Benchmark rows: a JSON / JSONL file, a parquet file or "
                                                         "folder, a save_to_disk folder, or a hub name org/name.")
    parser.add_argument("--dataset_split", default=None,
                        help="Split of --dataset (default: test, else validation, else its only split).")
    for role, option in Columns.OPTIONS.items():
        parser.add_argument(option, default=None, help=f"Column of the {role.replace('_', ' ')} (default: the "
                                                       f"first of {', '.join(Columns.DEFAULTS[role])} present).")
    parser.add_argument("--image_root", default=None, help="Directory image paths are relative to.")
    parser.add_argument("--output_dir", default=None, help="Where predictions.jsonl and summary.json go "
                                                          "(default: runs/eval-<dataset name>).")
    parser.add_argument("--num_samples", type=int, default=1, help="Completions per prompt (k > 1 adds pass@k).")
    parser.add_argument("--temperature", type=float, default=None,
                        help="Sampling temperature (default: greedy for one sample, 1.0 for several).")
    parser.add_argument("--max_new_tokens", type=int, default=1024, help="Most tokens per completion.")
    parser.add_argument("--min_pixels", type=int, default=MIN_PIXELS, help="Smallest image area after resizing.")
    parser.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help="Largest image area after resizing.")
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per generation call.")
    parser.add_argument("--rollout_engine", choices=ENGINES, default="auto",
                        help="vllm when importable on a GPU (auto), else transformers generate.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error("--num_samples must be >= 1")
    check_model_path(args.model_name_or_path)
    output_dir = args.output_dir or Path("runs") / f"eval-{Path(args.dataset).stem}"
    columns = Columns(**{role: getattr(args, option[2:]) for role, option in Columns.OPTIONS.items()})
    summary = evaluate_file(args.model_name_or_path, args.dataset, output_dir, image_root=args.image_root,
                            split=args.dataset_split, columns=columns,
                            num_samples=args.num_samples, temperature=args.temperature,
                            max_new_tokens=args.max_new_tokens, min_pixels=args.min_pixels,
                            max_pixels=args.max_pixels, batch_size=args.batch_size,
                            rollout_engine=args.rollout_engine, seed=args.seed)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
