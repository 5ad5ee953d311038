"""Checkpoints: a ``save_pretrained`` directory (model + tokenizer/processor, loadable by transformers and vLLM) plus
the trainer state (optimizer, scheduler, every library's RNG, data position, step), written atomically.

A checkpoint is assembled in a hidden ``.tmp-checkpoint-N`` directory and renamed to ``checkpoint-N`` only when
complete; a checkpoint that is replaced or pruned is renamed away before it is removed. A kill during a save therefore
never leaves a checkpoint that looks complete.

Each checkpoint ends with ``manifest.json``: the size of every file in it and the SHA-256 of the trainer state
(``trainer_state.json`` / ``.pt``) and of ``run.json``. :func:`verify_checkpoint` checks a checkpoint against it
before anything loads it, so a file lost or cut short afterwards (a disk error, a partial copy, a file deleted by
hand) is found and named instead of surfacing as a loader's traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("r1vl_fast")

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
RUN_FILE = "run.json"  # the run's resolved options, dataset and model (r1vl_fast.resume), as of this checkpoint
HASHED = (STATE_FILE, TENSORS_FILE, RUN_FILE)  # hashed in the manifest; the weights are checked by size
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


def hash_into(digest: Any, path: Path) -> None:
    """Feed a file's bytes to ``digest``, 16 MiB at a time."""
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    hash_into(digest, path)
    return digest.hexdigest()


def _write_manifest(path: Path) -> None:
    files = {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    hashes = {name: sha256(path / name) for name in HASHED if name in files}
    (path / MANIFEST_FILE).write_text(json.dumps({"files": files, "sha256": hashes}, indent=1))


def save_checkpoint(
    output_dir: str | Path, step: int, *, model: Any, processing: Any, state: dict[str, Any],
    tensors: dict[str, Any], save_total_limit: int | None = None, model_state: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-{step}`` atomically; ``state`` is JSON, ``tensors`` go through torch.save.
    ``model_state`` is the full state dict when the model itself is sharded (FSDP2); ``run`` (the run's options,
    dataset and model) goes to ``run.json``. The manifest is written last."""
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
        if run is not None:
            (tmp / RUN_FILE).write_text(json.dumps(run, indent=1))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "manifest": MANIFEST_FILE}, indent=1))
        _write_manifest(tmp)
        _fsync_tree(tmp)
    except Exception as e:  # a full disk is OSError (open), RuntimeError (torch.save), SafetensorError (weights)
        shutil.rmtree(tmp, ignore_errors=True)
        message = _write_failure(output_dir, final, e)
        if message is None:  # not a write failure: a bug, with its traceback
            raise
        raise CheckpointWriteError(message) from e
    if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
        _remove(final)
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


def _remove(path: Path) -> None:
    """Remove a checkpoint: renamed to a hidden name first, so that a kill part-way never leaves a ``checkpoint-N``
    with some of its files."""
    trash = path.with_name(f".removing-{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-N`` directory in ``output_dir`` (complete or not), oldest first."""
    output_dir = Path(output_dir)
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(output_dir: Path, limit: int | None) -> None:
    if limit is None:
        return
    for _, path in checkpoints(output_dir)[:-limit] if limit > 0 else []:
        _remove(path)


class CheckpointError(ValueError):
    """A checkpoint that is damaged (a file missing, cut short or changed since it was written), or not one."""


def verify_checkpoint(path: str | Path, *, hashes: bool = True) -> list[str]:
    """What is wrong with checkpoint ``path`` (empty: nothing): every file of its manifest present, with its size,
    and (``hashes``) the trainer state's SHA-256 as written. A checkpoint from before manifests (its trainer state
    names none) is checked for its trainer state alone."""
    path = Path(path)
    if not path.is_dir():
        return ["not a directory"]
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        if not (path / STATE_FILE).is_file():
            return [f"no {MANIFEST_FILE} and no {STATE_FILE} (not a complete checkpoint)"]
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (ValueError, OSError) as e:
            return [f"{STATE_FILE} is unreadable ({e})"]
        if isinstance(state, dict) and "manifest" in state:
            return [f"{MANIFEST_FILE} is missing"]
        return [] if (path / TENSORS_FILE).is_file() else [f"{TENSORS_FILE} is missing"]
    try:
        manifest = json.loads(manifest_path.read_text())
        files, digests = dict(manifest["files"]), dict(manifest["sha256"])
    except (ValueError, OSError, KeyError, TypeError) as e:
        return [f"{MANIFEST_FILE} is unreadable ({e})"]
    problems = []
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} is {file.stat().st_size} bytes, was {size} when written")
        elif hashes and name in digests and sha256(file) != digests[name]:
            problems.append(f"{name} has changed since it was written (its SHA-256 differs)")
    return problems


def is_complete(path: str | Path, *, hashes: bool = False) -> bool:
    return not verify_checkpoint(path, hashes=hashes)


def latest_checkpoint(output_dir: str | Path, *, hashes: bool = False) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (file sizes checked; ``hashes``: the trainer state's too)."""
    for _, path in reversed(checkpoints(output_dir)):
        if is_complete(path, hashes=hashes):
            return path
    return None


def damaged(path: Path, problems: list[str], *, option: str = "--resume_from_checkpoint") -> CheckpointError:
    """The one-line error for a damaged checkpoint, naming the newest complete checkpoint beside it."""
    good = latest_checkpoint(path.parent, hashes=True)  # never ``path`` itself: it has ``problems``
    instead = (f"; the newest complete checkpoint is {good}: use that one instead" if good is not None
               else f"; {path.parent} holds no complete checkpoint")
    listed = "; ".join(problems[:4]) + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
    return CheckpointError(f"{option} {path}: damaged checkpoint: {listed}{instead}")


def check_checkpoint(path: str | Path, *, option: str = "--resume_from_checkpoint", hashes: bool = True) -> Path:
    """``path`` if it is a complete checkpoint, else the one-line :class:`CheckpointError` (see :func:`damaged`)."""
    path = Path(path)
    problems = verify_checkpoint(path, hashes=hashes)
    if problems:
        raise damaged(path, problems, option=option)
    if not (path / MANIFEST_FILE).is_file():
        log.warning("%s has no %s (written before r1vl_fast recorded one): its files are not verified", path,
                    MANIFEST_FILE)
    return path


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """``latest`` (the newest checkpoint in ``output_dir``) or a checkpoint directory, verified first: a damaged one
    is a :class:`CheckpointError` that names the newest complete checkpoint."""
    if spec == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}")
        return check_checkpoint(found[-1][1])
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such checkpoint")
    return check_checkpoint(path)


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
