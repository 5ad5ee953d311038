"""Datasets through Hugging Face ``datasets`` (issue 27, item 3): parquet files and ``save_to_disk`` folders with the
images embedded as PNG bytes, built here from the demo's JSONL rows (nothing is downloaded). Row for row they give
the same prompts, image tokens, pixels and rewards as their JSONL twin; StepGRPO trains the same steps from either;
SFT, eval and ``data check`` read them; columns are found by name or by option; bad rows are named by row and
column; embedded images stay in the Arrow table until a batch needs them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from test_trainer import _args as trainer_args

from r1vl_fast.data import Columns, DataError, encode_prompt, load_rl_dataset, load_sft_dataset
from r1vl_fast.data import main as data_main
from r1vl_fast.demo.models import demo_processing
from r1vl_fast.eval import main as eval_main
from r1vl_fast.processing import EmbeddedImage, PromptCache
from r1vl_fast.rewards.step_rewards import StepRewards
from r1vl_fast.sft import main as sft_main
from r1vl_fast.train import main as train_main

FEATURES = datasets.Features({
    "problem": datasets.Value("string"), "solution": datasets.Value("string"),
    "key_steps": {"Steps": datasets.List(datasets.List(datasets.Value("string")))}, "image": datasets.Image(),
})


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _embedded(rows: list[dict], root: Path) -> dict[str, list]:
    """The RL rows as columns, each image file's bytes embedded (HF's Image feature: {"bytes", "path"})."""
    return {"problem": [r["problem"] for r in rows], "solution": [r["solution"] for r in rows],
            "key_steps": [r["key_steps"] for r in rows],
            "image": [{"bytes": (root / r["image_path"]).read_bytes(), "path": None} for r in rows]}


@pytest.fixture(scope="module")
def embedded(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    rl = Path(tiny["rl"])
    table = datasets.Dataset.from_dict(_embedded(_jsonl(rl), rl.parent), features=FEATURES)
    table.to_parquet(root / "rl.parquet")
    datasets.DatasetDict({"train": table, "test": table.select(range(4))}).save_to_disk(root / "rl-saved")
    # SFT rows, Mulberry's messages with the image embedded in a list (as EasyR1's SFT data holds it)
    sft = Path(tiny["sft"])
    rows = _jsonl(sft)[:16]
    features = datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                             "content": datasets.Value("string")}),
                                  "images": datasets.List(datasets.Image())})
    datasets.Dataset.from_dict({"messages": [r["messages"] for r in rows],
                                "images": [[{"bytes": (sft.parent / r["images"][0]).read_bytes(), "path": None}]
                                           for r in rows]},
                               features=features).save_to_disk(root / "sft-saved")
    return {"root": root, "parquet": root / "rl.parquet", "saved": root / "rl-saved", "sft": root / "sft-saved"}


def test_a_parquet_row_is_its_jsonl_twin(tiny: dict[str, Path], embedded: dict[str, Path]) -> None:
    """Same prompt ids, image tokens, pixels and rewards, row for row; embedded images stay in the Arrow table."""
    processing = demo_processing(3136, 3136)
    plain, _ = load_rl_dataset(tiny["rl"], processing, max_prompt_length=64)
    for source in (embedded["parquet"], embedded["saved"]):
        packed, report = load_rl_dataset(source, processing, max_prompt_length=64)
        assert report.kept == len(plain) == len(packed) == 24
        for a, b in zip(plain, packed):
            assert isinstance(b.image, EmbeddedImage) and isinstance(a.image, Path)
            assert (a.problem, a.solution, a.key_steps) == (b.problem, b.solution, b.key_steps)
            assert (a.image_size, a.image_tokens, a.prompt_tokens) == (b.image_size, b.image_tokens, b.prompt_tokens)
            x, y = encode_prompt(processing, a.problem, a.image), encode_prompt(processing, b.problem, b.image)
            assert x.input_ids == y.input_ids and torch.equal(x.pixel_values, y.pixel_values)
            assert torch.equal(x.image_grid_thw, y.image_grid_thw)
        assert packed[0].where == f"{source}: row 0"
        texts = ["### Step 1: there are 3\n### The final answer is: 3", "### The final answer is: 5"] * 12
        ids = list(range(24))
        mine = StepRewards([s.solution for s in plain], [s.key_steps for s in plain])(texts, ids)
        theirs = StepRewards([s.solution for s in packed], [s.key_steps for s in packed])(texts, ids)
        assert (mine.total == theirs.total).all() and (mine.key_steps == theirs.key_steps).all()

    # the prompt cache keys embedded images by their bytes: each is decoded once per run, shared with the file
    cache = PromptCache(processing)
    packed, _ = load_rl_dataset(embedded["parquet"], processing, max_prompt_length=64)
    for _ in range(2):
        for s in packed:
            cache.get(s.problem, s.image)
    distinct = len({(s.problem, (Path(tiny["rl"]).parent / r["image_path"]).read_bytes())
                    for s, r in zip(packed, _jsonl(Path(tiny["rl"])))})
    assert cache.images_processed == distinct


def test_easyr1_columns_and_options(tiny: dict[str, Path], tmp_path: Path) -> None:
    """EasyR1's column names (prompt, answer, images: a list of one image) are found without options; the solution
    is then the answer's final-answer line, and the rows have no key steps. Other names by option; an option naming a
    column that does not exist lists the ones that do."""
    rl = Path(tiny["rl"])
    rows = _jsonl(rl)[:6]
    columns = {"prompt": [r["problem"] for r in rows], "answer": [r["solution"].rsplit(": ", 1)[1] for r in rows],
               "images": [[{"bytes": (rl.parent / r["image_path"]).read_bytes(), "path": None}] for r in rows]}
    features = datasets.Features({"prompt": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image())})
    datasets.Dataset.from_dict(columns, features=features).to_parquet(tmp_path / "easyr1.parquet")
    processing = demo_processing(3136, 3136)
    samples, _ = load_rl_dataset(tmp_path / "easyr1.parquet", processing, max_prompt_length=64)
    plain, _ = load_rl_dataset(rl, processing, max_prompt_length=64)
    for s, p in zip(samples, plain):
        assert s.problem == p.problem and s.key_steps == {"Steps": []}
        assert s.solution == f"### The final answer is: {p.solution.rsplit(': ', 1)[1]}"
        assert s.image_tokens == p.image_tokens and isinstance(s.image, EmbeddedImage) and s.image.item == 0

    renamed = datasets.Dataset.from_dict({"q": columns["prompt"], "gold": columns["answer"],
                                          "pic": [c[0] for c in columns["images"]]},
                                         features=datasets.Features({"q": datasets.Value("string"),
                                                                     "gold": datasets.Value("string"),
                                                                     "pic": datasets.Image()}))
    renamed.to_parquet(tmp_path / "renamed.parquet")
    keys = Columns(prompt="q", answer="gold", image="pic")
    again, _ = load_rl_dataset(tmp_path / "renamed.parquet", processing, max_prompt_length=64, columns=keys)
    assert [s.solution for s in again] == [s.solution for s in samples]
    with pytest.raises(DataError, match=r"renamed.parquet: --prompt_key 'question': no such column; it has q, gold, "
                                        r"pic"):
        load_rl_dataset(tmp_path / "renamed.parquet", processing, max_prompt_length=64,
                        columns=Columns(prompt="question"))
    with pytest.raises(DataError, match=r"renamed.parquet: row 0: field 'problem' is missing"):
        load_rl_dataset(tmp_path / "renamed.parquet", processing, max_prompt_length=64)


def test_bad_rows_are_named_by_row_and_column(tiny: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rl = Path(tiny["rl"])
    columns = _embedded(_jsonl(rl)[:5], rl.parent)
    columns["image"][1] = {"bytes": b"not a png", "path": None}
    columns["image"][3] = None  # a text-only row is fine
    columns["solution"][2] = None
    datasets.Dataset.from_dict(columns, features=FEATURES).to_parquet(tmp_path / "bad.parquet")
    processing = demo_processing(3136, 3136)
    with pytest.raises(DataError, match=r"bad.parquet: row 1: field 'image': image does not decode: the embedded "
                                        r"image \(cannot identify image file"):
        load_rl_dataset(tmp_path / "bad.parquet", processing, max_prompt_length=64)
    samples, report = load_rl_dataset(tmp_path / "bad.parquet", processing, max_prompt_length=64, skip_invalid=True)
    assert len(samples) == 3 and report.skipped["invalid rows"] == 2 and samples[1].image is None  # row 3
    assert [e.split(": field")[0] for e in report.errors] == [f"{tmp_path / 'bad.parquet'}: row 1",
                                                            f"{tmp_path / 'bad.parquet'}: row 2"]
    assert "field 'solution' is missing" in report.errors[1]
    # data check reads it the same way, every bad row listed
    assert data_main(["check", str(tmp_path / "bad.parquet")]) == 1
    out = capsys.readouterr().out
    assert "5 rows, 3 valid" in out and "row 1: field 'image': image does not decode" in out
    # a split that is not there, and a path that is not a dataset
    with pytest.raises(DataError, match=r"no split 'dev'; it has train"):
        load_rl_dataset(tmp_path / "bad.parquet", processing, max_prompt_length=64, split="dev")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a folder with no parquet files and no save_to_disk dataset"):
        load_rl_dataset(tmp_path / "empty", processing, max_prompt_length=64)


def test_train_sft_eval_and_check_from_hf_datasets(tiny: dict[str, Path], embedded: dict[str, Path],
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """StepGRPO from the parquet file takes the very steps it takes from the JSONL twin; SFT trains from a
    save_to_disk folder with images in a list; eval scores the saved dataset's test split; data check reads it."""
    from test_trainer import _metrics, _without_time

    runs = {}
    for name, dataset in (("jsonl", tiny["rl"]), ("parquet", embedded["parquet"])):
        out = tmp_path / name
        assert train_main(trainer_args(tiny, out, dataset=dataset, max_steps=2, gradient_accumulation_steps=1,
                                       max_completion_length=48)) == 0
        runs[name] = _without_time(_metrics(out))
    assert runs["parquet"] == runs["jsonl"]

    sft = tmp_path / "sft"
    assert sft_main(["--model_name_or_path", str(tiny["model"]), "--dataset", str(embedded["sft"]), "--output_dir",
                     str(sft), "--preset", "demo", "--max_steps", "2", "--report_to", "none"]) == 0
    assert [json.loads(line)["step"] for line in (sft / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    processing = demo_processing(3136, 3136)
    samples, _ = load_sft_dataset(embedded["sft"], processing, max_length=160)
    assert len(samples) == 16 and all(isinstance(s.image, EmbeddedImage) for s in samples)

    scored = tmp_path / "eval"
    assert eval_main(["--model_name_or_path", str(tiny["model"]), "--dataset", str(embedded["saved"]),
                      "--output_dir", str(scored), "--max_new_tokens", "48", "--min_pixels", "3136",
                      "--max_pixels", "3136"]) == 0
    summary = json.loads((scored / "summary.json").read_text())
    assert summary["n"] == 4  # the test split, chosen by default
    predictions = [json.loads(line) for line in (scored / "predictions.jsonl").read_text().splitlines()]
    assert predictions[0]["sample"] == f"{embedded['saved']}: row 0"

    capsys.readouterr()
    assert data_main(["check", str(embedded["saved"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == report["valid"] == 24 and report["text_only_rows"] == 0


def test_an_embedded_image_is_read_back_from_the_table(embedded: dict[str, Path]) -> None:
    processing = demo_processing(3136, 3136)
    samples, _ = load_rl_dataset(embedded["parquet"], processing, max_prompt_length=64)
    ref = samples[5].image
    assert isinstance(ref, EmbeddedImage)
    with Image.open(io.BytesIO(ref.read_bytes())) as im:
        assert im.size == samples[5].image_size
    assert ref.dataset.column_names == ["image"]  # a one-column view: the row's text is not read with it
