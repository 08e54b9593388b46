"""`trl-pplmask score` and `mask` on bad input: a clear error before any work, no silent data loss, atomic outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import tiny_llama
from datasets import Dataset, load_from_disk

from trl_pplmask.cli import main as cli_main


ROWS = [
    {"prompt": "What is 2 + 3? ", "completion": "2 + 3 = 5. The answer is 5."},
    {"prompt": "What is 4 * 6? ", "completion": "4 * 6 = 24. The answer is 24."},
    {"prompt": "What is 9 - 7? ", "completion": "9 - 7 = 2. The answer is 2."},
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama saved with the embedded tokenizer: its perplexities are high, so most tokens mask."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _private_score_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_PPLMASK_CACHE", str(tmp_path / "cache"))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(argv: list[str], capsys, *expected: str) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model_dir) -> Path:
    """The ROWS scored by the tiny model (`trl-pplmask score`)."""
    folder = tmp_path_factory.mktemp("scored")
    data = _jsonl(folder / "rows.jsonl", ROWS)
    out = folder / "scored"
    assert cli_main(["score", "--dataset", str(data), "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    return out


def _score(data, model, out, *extra) -> int:
    return cli_main(["score", "--dataset", str(data), "--model", str(model), "--output", str(out), *extra])


# Item 1: re-scoring a masked dataset must not destroy its mask
def test_rescoring_a_masked_dataset_keeps_its_mask(scored, tiny_model_dir, tmp_path, capsys):
    masked = tmp_path / "masked"
    assert cli_main(["mask", "--input", str(scored), "--output", str(masked)]) == 0
    first = json.loads(capsys.readouterr().out.split("\nMasked dataset")[0])
    assert first["masked_tokens"] > 0
    rescored = tmp_path / "rescored"
    assert _score(masked, tiny_model_dir, rescored) == 0
    again = tmp_path / "again"
    capsys.readouterr()
    assert cli_main(["mask", "--input", str(rescored), "--output", str(again)]) == 0
    second = json.loads(capsys.readouterr().out.split("\nMasked dataset")[0])
    assert second["masked_tokens"] == first["masked_tokens"]
    # The masked tokens were scored again (not left at 0.0), and the labels came through unchanged
    before, after = load_from_disk(str(scored)), load_from_disk(str(rescored))
    for a, b in zip(before["token_nll"], after["token_nll"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert after["labels"] == load_from_disk(str(masked))["labels"]
    # --max-length is not silently ignored for an already tokenized dataset
    longest = max(len(ids) for ids in after["input_ids"])
    _fails(["score", "--dataset", str(masked), "--model", str(tiny_model_dir), "--output", str(tmp_path / "x"),
            "--max-length", str(longest - 1)], capsys, f"--max-length {longest}")  # fmt: skip
    assert not (tmp_path / "x").exists()


# Item 2: the NLLs never overwrite training columns
@pytest.mark.parametrize("column", ["labels", "input_ids", "trainable_mask", "prompt"])
def test_output_column_cannot_overwrite_a_data_column(column, tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    _fails([*_argv(data, tiny_model_dir, tmp_path / "out"), "--output-column", column], capsys, "--output-column")
    assert not (tmp_path / "out").exists()


def _argv(data, model, out) -> list[str]:
    return ["score", "--dataset", str(data), "--model", str(model), "--output", str(out)]


# Item 3: a non-positive --max-length is refused like `build` refuses it
@pytest.mark.parametrize("value", ["-5", "0"])
def test_max_length_must_be_positive(value, tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    _fails([*_argv(data, tiny_model_dir, tmp_path / "out"), "--max-length", value], capsys, "--max-length")
    assert not (tmp_path / "out").exists()


# Item 4: outputs are never written over in place, and nothing is written beside the input
def test_non_empty_output_is_refused_without_overwrite(scored, tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous results")
    _fails(_argv(data, tiny_model_dir, out), capsys, "not empty", "--overwrite")
    _fails(["mask", "--input", str(scored), "--output", str(out)], capsys, "not empty", "--overwrite")
    assert _snapshot(out) == {"keep.txt": b"previous results"}
    # With --overwrite the folder is replaced as a whole, and no staging folder is left behind
    assert cli_main(["mask", "--input", str(scored), "--output", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and len(load_from_disk(str(out))) == len(ROWS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # An empty folder is fine
    (tmp_path / "empty").mkdir()
    assert cli_main(["mask", "--input", str(scored), "--output", str(tmp_path / "empty")]) == 0


def test_inputs_are_never_modified(scored, tmp_path, tiny_model_dir):
    source = tmp_path / "source"
    shutil.copytree(scored, source)  # fresh: no cache files from other tests' runs
    before = _snapshot(source)
    assert cli_main(["mask", "--input", str(source), "--output", str(tmp_path / "masked")]) == 0
    assert _score(source, tiny_model_dir, tmp_path / "rescored") == 0
    assert cli_main(["mask", "--input", str(tmp_path / "rescored"), "--output", str(tmp_path / "again")]) == 0
    assert _snapshot(source) == before  # no cache-*.arrow written into the input folder
    assert not list((tmp_path / "rescored").glob("cache-*"))
    assert datasets.is_caching_enabled()  # switched off only while a command runs, not for the rest of the process


def test_output_overlapping_the_input_is_refused(scored, tmp_path, capsys):
    before = _snapshot(scored)
    for output in (scored, scored / "inside", scored.parent):
        _fails(["mask", "--input", str(scored), "--output", str(output), "--overwrite"], capsys, "overlaps the input")
    assert _snapshot(scored) == before


def test_interrupted_save_keeps_the_previous_output(scored, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli_main(["mask", "--input", str(scored), "--output", str(out)]) == 0
    before = _snapshot(out)

    def crash(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"")  # what a kill during the write leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(Dataset, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        cli_main(["mask", "--input", str(scored), "--output", str(out), "--overwrite", "--threshold", "5"])
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# Item 5: inputs that used to be accepted silently
def test_negative_nlls_are_refused(scored, tmp_path, capsys):
    dataset = load_from_disk(str(scored))
    nll = [list(row) for row in dataset["token_nll"]]
    nll[1][-1] = -0.5
    broken = tmp_path / "broken"
    dataset.remove_columns("token_nll").add_column("token_nll", nll).save_to_disk(str(broken))
    _fails(["mask", "--input", str(broken), "--output", str(tmp_path / "out")], capsys, "Row 1", "negative")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("threshold", ["inf", "nan", "-inf"])
def test_threshold_must_be_finite(threshold, scored, tmp_path, capsys):
    _fails(["mask", "--input", str(scored), "--output", str(tmp_path / "out"), f"--threshold={threshold}"], capsys,
           "--threshold must be a finite")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_fraction_needs_the_fraction_strategy(scored, tmp_path, capsys):
    _fails(["mask", "--input", str(scored), "--output", str(tmp_path / "out"), "--fraction", "0.2"], capsys,
           "--fraction applies only to --strategy fraction")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_empty_assistant_turn_is_refused(tmp_path, tiny_model_dir, capsys):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
    ]
    data = _jsonl(tmp_path / "chat.jsonl", rows)
    _fails(_argv(data, tiny_model_dir, tmp_path / "out"), capsys, "Row 1", "empty assistant turn")
    assert not (tmp_path / "out").exists()


def test_rows_dropped_by_truncation_are_reported(tmp_path, tiny_model_dir, capsys):
    long_prompt = "Please read carefully. " * 40
    rows = [*ROWS[:2], {"prompt": long_prompt, "completion": "The answer is 1."}]
    data = _jsonl(tmp_path / "rows.jsonl", rows)
    assert _score(data, tiny_model_dir, tmp_path / "out", "--max-length", "64") == 0
    captured = capsys.readouterr()
    assert "1 of 3 rows dropped by truncation" in captured.err + captured.out
    assert "Scored 2 examples (1 of 3 rows dropped by truncation)" in captured.out
    # Everything dropped: say so, rather than "the dataset is empty"
    _fails(_argv(data, tiny_model_dir, tmp_path / "none") + ["--max-length", "3"], capsys,
           "All 3 rows were dropped", "--max-length 3")  # fmt: skip
