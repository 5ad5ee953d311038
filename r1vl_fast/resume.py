"""Resume fits the checkpoint, or says why not.

Every checkpoint carries ``run.json``: the run's resolved options, its number of ranks, and what identifies its
dataset (path, size, SHA-256 of the bytes) and its starting model. A resume, from ``latest`` or an explicit path,
takes every option from there that the command line (or ``--config``) does not give, so
``--resume_from_checkpoint <dir>`` alone is a complete command. An option given again must agree with the
checkpoint unless it is one of :data:`CHANGEABLE` (where and how often to save, log and evaluate, how long to train,
and the exact speed paths); a disagreement is one :class:`~r1vl_fast.errors.ConfigError` naming every option, the
checkpoint's value and the given one, raised before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from r1vl_fast.checkpoint import RUN_FILE, STATE_FILE, checkpoints, hash_into
from r1vl_fast.errors import ConfigError

log = logging.getLogger("r1vl_fast")

# Options a resume may change. The rest (model, data, batch and group sizes, the loss and its settings, sampling,
# the optimizer and its schedule, the seed, the precision, image sizes, DDP vs FSDP2, the number of ranks) must
# match the checkpoint.
CHANGEABLE = frozenset({
    # where the run writes, and what it resumes
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir",
    # how long it trains (--max_steps past the checkpoint's step continues exactly)
    "max_steps", "num_train_epochs",
    # saving, logging, evaluation
    "save_steps", "save_total_limit", "logging_steps", "report_to", "eval_dataset", "eval_dataset_split", "eval_steps",
    "log_completions_steps", "num_completions_to_log",
    # where the images are found (the rows themselves are checked by content)
    "image_root",
    # memory and speed paths that compute the same step
    "gradient_checkpointing", "fused_lm_head", "share_prompt", "loss_impl", "vllm_gpu_memory_utilization",
    "max_tokens_per_micro_batch", "max_tokens_per_forward",
    "vllm_sleep_mode",
})
# Compared by what they hold, not by how they are spelled.
BY_CONTENT = frozenset({"model_name_or_path", "dataset"})


def _sha256_tree(path: Path) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        hash_into(digest, file)
    return digest.hexdigest()


def dataset_identity(dataset: str) -> dict[str, Any]:
    """Path, size and SHA-256 of a dataset file (or of every file under a dataset directory)."""
    path = Path(dataset)
    if not path.exists():
        return {"path": dataset}
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"path": os.path.abspath(dataset), "bytes": size, "sha256": _sha256_tree(path)}


def model_identity(model: str) -> dict[str, Any]:
    """A local model directory: its path, the SHA-256 of its config.json and its files' sizes (hashing the weights
    would cost minutes for a 7B model); a hub id: the id."""
    path = Path(model)
    if not path.is_dir():
        return {"path": model}
    config = path / "config.json"
    return {"path": os.path.abspath(model), "config_sha256": _sha256_tree(config) if config.is_file() else None,
            "sizes": {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()
                      and p.suffix in (".safetensors", ".bin")}}


def run_record(config: Any, world_size: int) -> dict[str, Any]:
    """What ``run.json`` holds: the recipe, the resolved options, the number of ranks, the dataset and the model."""
    return {"kind": config.run_kind, "options": dataclasses.asdict(config), "world_size": world_size,
            "dataset": dataset_identity(config.dataset) if config.dataset else None,
            "model": model_identity(config.model_name_or_path) if config.model_name_or_path else None}


def saved_record(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's ``run.json``; for a checkpoint from before it, the run's ``config.json`` (options only)."""
    for path, legacy in ((checkpoint / RUN_FILE, False), (checkpoint.parent / "config.json", True)):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if legacy:
                return {"kind": None, "options": data, "world_size": None, "dataset": None, "model": None}
            return dict(data)
    return None


def checkpoint_to_resume(spec: str, output_dir: str | None) -> Path | None:
    """The checkpoint a ``--resume_from_checkpoint`` names, before it is verified (None: none there)."""
    if spec == "latest":
        found = checkpoints(output_dir) if output_dir is not None else []
        return found[-1][1] if found else None
    path = Path(spec)
    return path if path.is_dir() else None


def resumed_options(cls: type, spec: str, output_dir: str | None) -> dict[str, Any] | None:
    """The options a resume starts from: the checkpoint's, less where to write (for an explicit checkpoint, its own
    run directory unless ``--output_dir`` says otherwise). None: no record of the run to start from."""
    checkpoint = checkpoint_to_resume(spec, output_dir)
    record = saved_record(checkpoint) if checkpoint is not None else None
    if record is None or not isinstance(record.get("options"), dict):
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    options = {k: v for k, v in record["options"].items()
               if k in names and k not in ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")}
    for name, key in (("model_name_or_path", "model"), ("dataset", "dataset")):  # absolute: any working directory
        if name in options and isinstance(record.get(key), dict) and "path" in record[key]:
            options[name] = record[key]["path"]
    assert checkpoint is not None
    options["output_dir"] = output_dir if output_dir is not None else str(checkpoint.parent)
    return options


def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def _short(identity: dict[str, Any], rows: int | None = None) -> str:
    parts = [f"{rows} usable rows"] if rows is not None else []
    if "sha256" in identity:
        parts.append(f"SHA-256 {identity['sha256'][:12]}")
    return identity["path"] + (f" ({', '.join(parts)})" if parts else "")


def _same_model(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    if saved["path"] == now["path"]:
        return True
    keys = ("config_sha256", "sizes")
    return all(k in saved and k in now for k in keys) and all(saved[k] == now[k] for k in keys)


def check_fits(config: Any, checkpoint: Path, world_size: int) -> None:
    """Raise one ConfigError naming every option of ``config`` that the checkpoint's run does not share (the
    checkpoint's value, then this run's), the dataset and model by content, and the number of ranks."""
    record = saved_record(checkpoint)
    where = f"--resume_from_checkpoint {checkpoint}"
    if record is None:
        log.warning("%s: no record of the run's options (%s) beside it: they are not checked", checkpoint, RUN_FILE)
        return
    kind = record.get("kind")
    if kind is not None and kind != config.run_kind:
        command = {"sft": "python -m r1vl_fast.sft", "run": "python -m r1vl_fast.train"}.get(kind, kind)
        raise ConfigError(f"{where}: this checkpoint is from {command}; resume it with that command, or pass it as "
                          f"--model_name_or_path to start a new run from its weights")
    saved = record.get("options") or {}
    differ = []
    for f in dataclasses.fields(config):
        if f.name in CHANGEABLE or f.name in BY_CONTENT or f.name not in saved:
            continue
        now = getattr(config, f.name)
        if not _same(saved[f.name], now):
            differ.append(f"--{f.name} {saved[f.name]} in the checkpoint, {now} now")
    if record.get("model") and config.model_name_or_path is not None:
        now_model = model_identity(config.model_name_or_path)
        if not _same_model(record["model"], now_model):
            differ.append(f"--model_name_or_path {record['model']['path']} in the checkpoint, "
                          f"{config.model_name_or_path} now")
    elif "model_name_or_path" in saved and not _same(saved["model_name_or_path"], config.model_name_or_path):
        differ.append(f"--model_name_or_path {saved['model_name_or_path']} in the checkpoint, "
                      f"{config.model_name_or_path} now")
    if record.get("dataset") and config.dataset is not None:
        then, now_data = record["dataset"], dataset_identity(config.dataset)
        if then.get("sha256") != now_data.get("sha256"):
            rows = _sampler_rows(checkpoint)
            change = "changed since" if then["path"] == now_data["path"] else "differs from the one"
            differ.append(f"--dataset {_short(then, rows)} in the checkpoint, {_short(now_data)} now (its content "
                          f"{change} the checkpoint was written)")
    elif "dataset" in saved and not _same(saved["dataset"], config.dataset):
        differ.append(f"--dataset {saved['dataset']} in the checkpoint, {config.dataset} now")
    if record.get("world_size") not in (None, world_size):
        differ.append(f"ranks (torchrun --nproc_per_node) {record['world_size']} in the checkpoint, {world_size} now")
    if differ:
        raise ConfigError(f"{where} does not fit this run: {'; '.join(differ)}. Drop these options to take the "
                          f"checkpoint's, or start a new run in another --output_dir")


def _sampler_rows(checkpoint: Path) -> int | None:
    try:
        return int(json.loads((checkpoint / STATE_FILE).read_text())["sampler"]["n"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
