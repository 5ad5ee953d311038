"""Key-step extraction: Mulberry SFT rows (``messages`` with the reference CoT, ``images``) → R1-VL-10K rows
(``image_path``, ``problem``, ``solution``, ``key_steps: {"Steps": [[alt, ...], ...]}``) for StepGRPO.

Two extractors: ``rules`` (offline, deterministic; :mod:`.rules`) and ``llm`` (any OpenAI-compatible endpoint;
:mod:`.llm`). Every row is checked before it is written: its own reference CoT must match all of its key-step
groups (k = 1) with the matcher the trainer will use. Rows that cannot be converted are written, with the
reason, to ``<output stem>.rejected.jsonl``, never to the output. Rows are appended as they finish, so an interrupted
run resumes where it stopped.

    python -m r1vl_fast.keysteps --input mulberry.jsonl --output train.jsonl
    python -m r1vl_fast.keysteps --input mulberry.jsonl --output train.jsonl --extractor llm \\
        --endpoint http://localhost:8000/v1 --model Qwen/Qwen2.5-72B-Instruct --concurrency 32
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1vl_fast.data import DataError, Report, image_path, mulberry_turns, read_rows
from r1vl_fast.keysteps.llm import EndpointError, LLMExtractor, parse_answer
from r1vl_fast.keysteps.rules import equivalent_forms, extract_key_steps, step_sections
from r1vl_fast.rewards import final_answer, match_key_step_groups
from r1vl_fast.rewards.step_rar import preset_matching

__all__ = ["ConvertResult", "EndpointError", "LLMExtractor", "SourceRow", "convert", "equivalent_forms",
           "extract_key_steps", "parse_answer", "read_sources", "unmatched_groups"]

log = logging.getLogger("r1vl_fast")


@dataclass
class SourceRow:
    """One SFT row to convert: where it is, the problem, the reference CoT and its image as the output names it."""

    index: int
    where: str
    problem: str
    cot: str
    image_path: str | None


def read_sources(path: str | Path, *, output: str | Path, image_root: str | Path | None = None,
                 skip_invalid: bool = False) -> tuple[list[SourceRow], Report]:
    """Mulberry rows of ``path``, validated (fields, types, the image exists). Image paths are rewritten relative to
    the output file's folder, so the trainer finds them from there."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    out_dir = Path(output).resolve().parent
    rows: list[SourceRow] = []
    report = Report()
    for row in read_rows(path, keep_invalid=True):
        try:
            problem, cot, rel = mulberry_turns(row)
            image = None
            if rel is not None:
                image = os.path.relpath(image_path(row, "images[0]", rel, root).resolve(), out_dir)
        except DataError as e:
            if not skip_invalid:
                raise
            report.skip(e, "invalid rows")
            continue
        rows.append(SourceRow(row.index, row.where(), problem.strip(), cot, image))
    report.kept = len(rows)
    return rows, report


def unmatched_groups(cot: str, groups: list[list[str]], reward_preset: str = "paper") -> list[int]:
    """Indices of the groups that the CoT itself does not match with the trainer's matcher (empty: k = 1)."""
    if not groups:
        return []
    mode, min_alt_len = preset_matching(reward_preset)
    found = match_key_step_groups([cot], [{"Steps": groups}], mode=mode, scope="steps", min_alt_len=min_alt_len)[0]
    return [g for g, ok in enumerate(found) if not ok]


def _cot_problem(cot: str) -> str | None:
    if not step_sections(cot):
        return "the reference CoT has no '### Step N:' sections"
    if not final_answer(cot):
        return "the reference CoT has no '### The final answer is:' line with an answer"
    return None


@dataclass
class Outcome:
    row: SourceRow
    groups: list[list[str]] | None
    reason: str | None = None  # why it was rejected, in full
    kind: str = ""  # the reason's short form, for the counts
    replies: list[str] = field(default_factory=list)


@dataclass
class ConvertResult:
    """What a conversion did. ``written`` counts this run's rows, ``resumed`` the rows found from earlier runs."""

    written: int = 0
    resumed: int = 0
    rejected: Counter = field(default_factory=Counter)
    skipped_invalid: int = 0
    groups: int = 0
    output: str = ""
    rejected_file: str = ""

    @property
    def ok(self) -> bool:
        return not self.rejected and not self.skipped_invalid


def _rules_outcome(row: SourceRow, reward_preset: str, max_steps: int, max_forms: int) -> Outcome:
    groups = extract_key_steps(row.cot, max_steps=max_steps, max_forms=max_forms)
    if not groups:
        return Outcome(row, None, "no numbers, equations or key phrases in the Step sections", "no key steps")
    if missing := unmatched_groups(row.cot, groups, reward_preset):
        listed = ", ".join(json.dumps(groups[g][0]) for g in missing)
        return Outcome(row, None, f"the reference CoT does not match its own key steps {listed}", "self-check failed")
    return Outcome(row, groups)


def _with_our_forms(group: list[str], max_forms: int) -> list[str]:
    """The model's forms of a key step first, then the rules' forms it missed (case-insensitively)."""
    forms = list(group)
    seen = {f.lower() for f in forms}
    for form in equivalent_forms(group[0], max_forms):
        if len(forms) < max_forms and form.lower() not in seen:
            forms.append(form)
            seen.add(form.lower())
    return forms


def _llm_outcome(row: SourceRow, extractor: LLMExtractor, reward_preset: str, max_forms: int) -> Outcome:
    def check(groups: list[list[str]]) -> str | None:
        missing = unmatched_groups(row.cot, groups, reward_preset)
        if not missing:
            return None
        listed = ", ".join(json.dumps(groups[g][0]) for g in missing)
        return f"these key steps are not written in the Step sections of the solution: {listed}"

    attempt = extractor.extract(row.problem, row.cot, check)
    if attempt.groups is None:
        tries = len(attempt.problems)
        return Outcome(row, None, f"no usable answer in {tries} attempt{'s' * (tries != 1)}: {attempt.problems[-1]}",
                       "no usable LLM answer", attempt.replies)
    return Outcome(row, [_with_our_forms(g, max_forms) for g in attempt.groups], replies=attempt.replies)


def _read_done(output: Path, n_rows: int) -> set[int]:
    """Source indices already in ``output``. A torn last line (the run was killed mid-write) is cut off."""
    done: set[int] = set()
    if not output.exists():
        return done
    data = output.read_bytes()
    good = 0
    for line_no, line in enumerate(data.splitlines(keepends=True), 1):
        try:
            index = json.loads(line)["source_index"]
            if not line.endswith(b"\n"):
                raise ValueError("torn")
        except (ValueError, KeyError, TypeError):
            if good + len(line) == len(data):  # only the last line may be incomplete
                log.warning("%s:%d: incomplete last row (interrupted write) removed; it will be redone", output,
                            line_no)
                with open(output, "r+b") as f:
                    f.truncate(good)
                break
            raise DataError(f"{output}:{line_no}: not a row written by this tool; pass --overwrite to start "
                            f"over") from None
        if not isinstance(index, int) or not 0 <= index < n_rows:
            raise DataError(f"{output}:{line_no}: source_index {index!r} is not a row of the input; pass --overwrite "
                            f"to start over")
        done.add(index)
        good += len(line)
    return done


def _settings_file(output: Path) -> Path:
    return output.with_name(output.stem + ".settings.json")


def _check_settings(output: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume an output written with other settings (the rows would mix two extractions)."""
    meta = _settings_file(output)
    if overwrite:
        output.unlink(missing_ok=True)
    elif output.exists():
        if not meta.exists():
            raise DataError(f"{output} exists and was not written by this tool; pass --overwrite to replace it")
        earlier = json.loads(meta.read_text())
        changed = {k: (earlier.get(k), v) for k, v in settings.items() if earlier.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            raise DataError(f"{output} was written with other settings ({listed}); pass --overwrite to start over")
    meta.write_text(json.dumps(settings, indent=1) + "\n")


def _outcomes(rows: list[SourceRow], work: Callable[[SourceRow], Outcome], concurrency: int) -> Iterator[Outcome]:
    """``work`` on every row, at most ``concurrency`` at a time, yielded as they finish. An :class:`EndpointError`
    lets the rows in flight finish (they are yielded) and is raised after them."""
    if concurrency <= 1:
        for row in rows:
            yield work(row)
        return
    pending = iter(rows)
    failure: EndpointError | None = None
    with ThreadPoolExecutor(concurrency) as pool:
        running: set[Future[Outcome]] = set()
        while True:
            while failure is None and len(running) < 2 * concurrency and (queued := next(pending, None)) is not None:
                running.add(pool.submit(work, queued))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    yield future.result()
                except EndpointError as e:
                    failure = failure or e
    if failure is not None:
        raise failure


def convert(input_path: str | Path, output: str | Path, *, extractor: str = "rules", reward_preset: str = "paper",
            image_root: str | Path | None = None, llm: LLMExtractor | None = None, max_key_steps: int = 8,
            max_forms: int = 10, concurrency: int = 8, skip_invalid: bool = False, overwrite: bool = False,
            progress: bool = True) -> ConvertResult:
    """Convert ``input_path`` into ``output``, resuming a partial ``output`` written with the same settings."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    rows, report = read_sources(input_path, output=output, image_root=image_root, skip_invalid=skip_invalid)
    if extractor == "llm" and llm is None:
        raise ValueError("the llm extractor needs an LLMExtractor (--endpoint and --model)")
    if extractor not in ("rules", "llm"):
        raise ValueError(f"extractor must be 'rules' or 'llm', got {extractor!r}")
    settings = {"input": str(Path(input_path).resolve()), "extractor": extractor, "reward_preset": reward_preset,
                "max_key_steps": max_key_steps, "max_forms": max_forms,
                "model": llm.model if llm is not None and extractor == "llm" else None}
    preset_matching(reward_preset)  # an unknown preset fails before any file is touched
    _check_settings(output, settings, overwrite)
    n_rows = max((r.index for r in rows), default=-1) + 1
    done = _read_done(output, n_rows)
    todo = [r for r in rows if r.index not in done]
    result = ConvertResult(resumed=len(done), skipped_invalid=sum(report.skipped.values()), output=str(output))
    rejected_path = output.with_name(output.stem + ".rejected.jsonl")
    result.rejected_file = str(rejected_path)
    if extractor == "llm":
        assert llm is not None
        llm.check_endpoint()
    else:
        concurrency = 1

    def work(row: SourceRow) -> Outcome:
        if problem := _cot_problem(row.cot):
            return Outcome(row, None, problem, "unusable reference CoT")
        if extractor == "llm":
            assert llm is not None
            return _llm_outcome(row, llm, reward_preset, max_forms)
        return _rules_outcome(row, reward_preset, max_key_steps, max_forms)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), initial=len(done), desc=f"key steps ({extractor})", unit="row", disable=not progress,
               dynamic_ncols=True)
    try:
        with open(output, "a", encoding="utf-8") as out, open(rejected_path, "w", encoding="utf-8") as bad:
            for outcome in _outcomes(todo, work, concurrency):
                row = outcome.row
                if outcome.groups is None:
                    result.rejected[outcome.kind] += 1
                    bad.write(json.dumps({"source_index": row.index, "where": row.where, "reason": outcome.reason,
                                          "replies": [r[:2000] for r in outcome.replies]}) + "\n")
                    bad.flush()
                    log.warning("%s: rejected: %s", row.where, outcome.reason)
                else:
                    record: dict[str, Any] = {"image_path": row.image_path} if row.image_path is not None else {}
                    record |= {"problem": row.problem, "solution": row.cot, "key_steps": {"Steps": outcome.groups},
                               "source_index": row.index}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()
                    result.written += 1
                    result.groups += len(outcome.groups)
                bar.update(1)
                bar.set_postfix(written=result.written + result.resumed, rejected=sum(result.rejected.values()))
    finally:
        bar.close()
    _sort_rows(output)
    if not result.rejected:
        rejected_path.unlink(missing_ok=True)
    return result


def _sort_rows(output: Path) -> None:
    """Rows in input order (concurrent extraction appends them as they finish), rewritten atomically."""
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    ordered = sorted(lines, key=lambda line: json.loads(line)["source_index"])
    if ordered != lines:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text("".join(ordered), encoding="utf-8")
        os.replace(tmp, output)


def summary(result: ConvertResult) -> dict[str, Any]:
    return asdict(result) | {"rejected": dict(result.rejected)}
