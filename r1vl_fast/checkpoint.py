"""Checkpoints: a ``save_pretrained`` directory (model + tokenizer/processor, loadable by transformers and vLLM) plus
the trainer state (optimizer, scheduler, every library's RNG, data position, step), written atomically.

A checkpoint is assembled in a hidden ``.tmp-checkpoint-N`` directory and renamed to ``checkpoint-N`` only when
complete, with ``trainer_state.json`` written last; ``latest`` only considers directories that have it. A kill during
a save therefore never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(
    output_dir: str | Path, step: int, *, model: Any, processing: Any, state: dict[str, Any],
    tensors: dict[str, Any], save_total_limit: int | None = None, model_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-{step}`` atomically; ``state`` is JSON, ``tensors`` go through torch.save.
    ``model_state`` is the full state dict when the model itself is sharded (FSDP2)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
        processing.save_pretrained(tmp)
        torch.save({**tensors, "rng": rng_state()}, tmp / TENSORS_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
        _fsync_tree(tmp)
    except Exception as e:  # a full disk is OSError (open), RuntimeError (torch.save), SafetensorError (weights)
        shutil.rmtree(tmp, ignore_errors=True)
        message = _write_failure(output_dir, final, e)
        if message is None:  # not a write failure: a bug, with its traceback
            raise
        raise CheckpointWriteError(message) from e
    if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(output_dir, save_total_limit)
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, I/O error); its partial directory is removed and the
    previous checkpoints are kept."""


def _write_failure(output_dir: Path, final: Path, error: BaseException) -> str | None:
    """What to tell the user when writing ``final`` failed with ``error`` (None: not a write failure)."""
    free = shutil.disk_usage(output_dir).free if output_dir.is_dir() else None
    full = ((isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT))
            or "No space left" in str(error) or (free is not None and free < 64 * 2**20))
    kept = latest_checkpoint(output_dir)
    after = f"; the previous checkpoint {kept.name} is kept" if kept is not None else ""
    if full:
        return f"no space left on {output_dir}: {final.name} is not written (its partial files are removed){after}"
    if isinstance(error, (OSError, RuntimeError)) or "I/O error" in str(error):
        return f"could not write {final} ({error}); its partial files are removed{after}"
    return None


def _complete(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file() and (p / TENSORS_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(output_dir: Path, limit: int | None) -> None:
    if limit is None:
        return
    for _, path in _complete(output_dir)[:-limit] if limit > 0 else []:
        shutil.rmtree(path)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = _complete(Path(output_dir))
    return found[-1][1] if found else None


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """``latest`` (the newest complete checkpoint in ``output_dir``) or a checkpoint directory."""
    if spec == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        return path
    path = Path(spec)
    if not (path / STATE_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a complete checkpoint "
                                f"(no {STATE_FILE} / {TENSORS_FILE})")
    return path


# What the trainer state holds beyond tensors and Python containers: numpy arrays (the NumPy RNG state, the rewards of
# a rollout buffer kept for reuse). Nothing else may be unpickled: no callable, no class of anyone's choosing.
_NUMPY_ARRAYS = [np.ndarray, np.dtype, (getattr(np, "_core", None) or np.core).multiarray._reconstruct,
                 *(type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                               np.uint32, np.uint64, np.float16, np.float32, np.float64))]


class UnsafeCheckpointError(ValueError):
    """A trainer state that would need arbitrary objects (code) to load."""


def load_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON state and the tensor state of a checkpoint. The tensor state is unpickled with ``weights_only``
    (tensors, Python containers and numbers, and numpy arrays only): a checkpoint from elsewhere cannot run code."""
    state = json.loads((path / STATE_FILE).read_text())
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAYS):
            tensors = torch.load(path / TENSORS_FILE, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path / TENSORS_FILE}: refusing to load: it holds objects other than tensors, numbers, containers and "
            f"numpy arrays, which could run code ({str(e).splitlines()[0][:300]})") from None
    return state, tensors
