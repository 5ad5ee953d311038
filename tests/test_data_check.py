"""``python -m r1vl_fast.data check``: every planted fault is reported with its line, the good rows are described."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from r1vl_fast.data import check_dataset, main, read_rows
from r1vl_fast.processing import Processing


def _planted(tiny: dict[str, Path], tmp_path: Path) -> tuple[Path, list[int]]:
    rows = [r.data for r in read_rows(tiny["rl"])][:8]
    for r in rows:
        r["image_path"] = str(tiny["rl"].parent / r["image_path"])
    rows[1]["problem"] = 7  # wrong type
    rows[3]["image_path"] = str(tmp_path / "nope.png")  # missing image
    rows[4]["key_steps"] = {"Steps": [[]]}  # empty group
    rows[6]["problem"] = "word " * 200  # over-long prompt
    path = tmp_path / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [2, 4, 5, 7]  # their lines


def test_check_reports_every_planted_fault(tiny: dict[str, Path], tmp_path: Path) -> None:
    path, bad_lines = _planted(tiny, tmp_path)
    processing = Processing.from_pretrained(str(tiny["model"]), min_pixels=3136, max_pixels=3136, multimodal=True)
    report = check_dataset(path, processing, max_length=64)
    assert report["kind"] == "rl" and report["rows"] == 8 and report["valid"] == 4
    assert [int(e.split(":")[1]) for e in report["errors"]] == bad_lines
    assert report["skipped"] == {"invalid rows": 3, "over-long prompts": 1}
    assert report["image_tokens"] == {"min": 4, "median": 4.0, "p95": 4.0, "max": 4}  # 56 x 56 at 3136 pixels
    assert report["image_width"]["max"] == 56 and 10 < report["prompt_tokens"]["median"] < 64
    assert check_dataset(tiny["sft"], processing, max_length=512)["kind"] == "sft"


def test_check_command_line(tiny: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path, _ = _planted(tiny, tmp_path)
    assert main(["check", str(path), "--model_name_or_path", str(tiny["model"]), "--max_pixels", "3136",
                 "--max_length", "64"]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: sample 1: field 'problem' must be str, got int" in out
    assert "image_tokens" in out and "8 rows, 4 valid" in out
    # a clean file exits 0; the module runs as a command
    proc = subprocess.run([sys.executable, "-m", "r1vl_fast.data", "check", str(tiny["rl"]), "--max_pixels", "3136",
                           "--max_length", "64", "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["valid"] == 24
