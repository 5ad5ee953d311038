"""Run logging: ``metrics.jsonl`` (one object per optimizer step), TensorBoard events, W&B on request, a progress
bar with ETA and the current reward, sample completions in ``completions.jsonl``, and the reward-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def _truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop records past ``after_step``: a resumed run appends the steps after its checkpoint, once. (A new run
    never gets here with another run's file: ``runner.prepare_output_dir`` refuses such a directory.)"""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= after_step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)  # a kill here leaves the old file or the new one, never half of one


def json_line(record: dict[str, Any]) -> str:
    """One strict-JSON line: NaN and +-inf, which JSON has no words for, are written as null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(record), allow_nan=False)


class RunLog:
    def __init__(self, output_dir: Path, *, trackers: list[str], total_steps: int, start_step: int,
                 logging_steps: int, config: dict[str, Any], desc: str, progress: bool = True,
                 write: bool = True) -> None:
        """``write=False`` (ranks other than 0): keeps nothing, shows nothing."""
        self.output_dir, self.write = output_dir, write
        self.metrics_path = output_dir / "metrics.jsonl"
        self.completions_path = output_dir / "completions.jsonl"
        if write:
            for path in (self.metrics_path, self.completions_path):
                _truncate_jsonl(path, start_step)
        self.logging_steps = logging_steps
        self.tb = None
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        self.wandb = None
        if "wandb" in trackers:
            try:
                import wandb
            except ImportError:
                raise ImportError("--report_to wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(config=config, dir=str(output_dir), resume="allow")
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                        disable=not (progress and write))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.write:
            return
        step = int(metrics["step"])
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json_line(metrics) + "\n")
        if step % self.logging_steps == 0:
            scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
            if self.tb is not None:
                for k, v in scalars.items():
                    self.tb.add_scalar(k, v, step)
            if self.wandb is not None:
                self.wandb.log(scalars, step=step)
        shown = {k: f"{metrics[k]:.3f}" for k in ("reward", "loss") if k in metrics}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def log_completions(self, step: int, records: list[dict[str, Any]]) -> None:
        if not self.write:
            return
        with open(self.completions_path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json_line({"step": step, **r}) + "\n")

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


PLOTTED = ("reward", "rewards/step_rar", "rewards/step_rvr", "rewards/accuracy", "rewards/key_steps")


def plot_rewards(metrics_path: Path, out: Path, keys: tuple[str, ...] = PLOTTED) -> Path | None:
    """The training curves of ``metrics.jsonl`` (raw and a moving average) as a PNG: the reward and its two parts,
    and what the reward is for: the answer accuracy and the key-step recall of the sampled completions."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    window = max(1, len(rows) // 20)
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not points:
            continue
        steps, values = zip(*points)
        line = ax.plot(steps, values, alpha=0.25)[0]
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, color=line.get_color(), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("reward; accuracy and key-step recall (0-1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
