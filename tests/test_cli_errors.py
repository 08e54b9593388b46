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
from testing_utils import folder_bytes

from trl_pplmask.cli import main as cli_main


ROWS = [
    {"prompt": "What is 2 + 3? ", "completion": "2 + 3 = 5. The answer is 5."},
    {"prompt": "What is 4 * 6? ", "completion": "4 * 6 = 24. The answer is 24."},
    {"prompt": "What is 9 - 7? ", "completion": "9 - 7 = 2. The answer is 2."},
]


@pytest.fixture(autouse=True)
def _private_score_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_PPLMASK_CACHE", str(tmp_path / "cache"))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


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


# re-scoring a masked dataset must not destroy its mask
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


# the NLLs never overwrite training columns
@pytest.mark.parametrize("column", ["labels", "input_ids", "trainable_mask", "prompt"])
def test_output_column_cannot_overwrite_a_data_column(column, tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    _fails([*_argv(data, tiny_model_dir, tmp_path / "out"), "--output-column", column], capsys, "--output-column")
    assert not (tmp_path / "out").exists()


def _argv(data, model, out) -> list[str]:
    return ["score", "--dataset", str(data), "--model", str(model), "--output", str(out)]


# a non-positive --max-length is refused like `build` refuses it
@pytest.mark.parametrize("value", ["-5", "0"])
def test_max_length_must_be_positive(value, tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    _fails([*_argv(data, tiny_model_dir, tmp_path / "out"), "--max-length", value], capsys, "--max-length")
    assert not (tmp_path / "out").exists()


# outputs are never written over in place, and nothing is written beside the input
def test_non_empty_output_is_refused_without_overwrite(scored, tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous results")
    _fails(_argv(data, tiny_model_dir, out), capsys, "not empty", "--overwrite")
    _fails(["mask", "--input", str(scored), "--output", str(out)], capsys, "not empty", "--overwrite")
    assert folder_bytes(out) == {"keep.txt": b"previous results"}
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
    before = folder_bytes(source)
    assert cli_main(["mask", "--input", str(source), "--output", str(tmp_path / "masked")]) == 0
    assert _score(source, tiny_model_dir, tmp_path / "rescored") == 0
    assert cli_main(["mask", "--input", str(tmp_path / "rescored"), "--output", str(tmp_path / "again")]) == 0
    assert folder_bytes(source) == before  # no cache-*.arrow written into the input folder
    assert not list((tmp_path / "rescored").glob("cache-*"))
    assert datasets.is_caching_enabled()  # switched off only while a command runs, not for the rest of the process


def test_output_overlapping_the_input_is_refused(scored, tmp_path, capsys):
    before = folder_bytes(scored)
    for output in (scored, scored / "inside", scored.parent):
        _fails(["mask", "--input", str(scored), "--output", str(output), "--overwrite"], capsys, "overlaps the input")
    assert folder_bytes(scored) == before


def test_interrupted_save_keeps_the_previous_output(scored, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli_main(["mask", "--input", str(scored), "--output", str(out)]) == 0
    before = folder_bytes(out)

    def crash(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"")  # what a kill during the write leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(Dataset, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        cli_main(["mask", "--input", str(scored), "--output", str(out), "--overwrite", "--threshold", "5"])
    assert folder_bytes(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# inputs that used to be accepted silently
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


# Items 9, 10, 12: every bad input is one clear message (what, where, how to fix) before any expensive work, with no
# output and no change to the inputs. Each case: command line (built from the fixture folder `w`), expected phrases,
# exit status, whether a model may be loaded (the adapter cases need the base model).
def _bad_input_files(w: Path, tiny_model_dir: Path) -> None:
    (w / "trunc.jsonl").write_text(json.dumps(ROWS[0]) + '\n{"prompt": "What is 1 + 1?", "compl')
    (w / "empty.jsonl").write_text("")
    _jsonl(w / "types.jsonl", [{"prompt": 1, "completion": 2}])
    _jsonl(w / "nocontent.jsonl", [{"messages": [{"role": "user"}, {"role": "assistant", "content": "Hi"}]}])
    _jsonl(w / "rows.jsonl", ROWS)
    Dataset.from_dict({"input_ids": [], "labels": [], "token_nll": []}).save_to_disk(str(w / "zero"))
    Dataset.from_dict({"input_ids": [[1, 2, 3, 4]], "labels": [[1, 2]], "token_nll": [[0.1] * 4]}).save_to_disk(
        str(w / "short")
    )
    for name, info in (("empty-info", {}), ("bad-json", None)):
        (w / name / "cfg").mkdir(parents=True)
        (w / name / "README.md").write_text("---\n---\n")
        text = "{not json" if info is None else json.dumps(info)
        (w / name / "cfg" / "build_info.json").write_text(text)
    good = {"kind": "pplmasked", "built_at": "2025-01-01T00:00:00Z", "source": {"dataset": "gsm8k"}}
    header = "---\nconfigs:\n- config_name: cfg\n  data_files:\n  - split: train\n    path: cfg/train-*\n---\n"
    shard = {"files": ["cfg/train-00000-of-00001.parquet"], "stats": {}}
    for name, card, splits in (
        ("built", header, {}),
        ("built-missing-shard", header, {"train": shard}),  # the one shard its record lists is not there
        ("built-broken-card", "---\nconfigs: [\n---\n", {}),
        ("built-card-without-configs", "---\nlicense: mit\n---\n", {}),
    ):
        (w / name / "cfg").mkdir(parents=True)
        (w / name / "README.md").write_text(card)
        (w / name / "cfg" / "build_info.json").write_text(json.dumps({**good, "settings": {}, "splits": splits}))
    # Misleading-error cases of issue 18 item 6
    _jsonl(w / "qa.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])
    (w / "latin1.jsonl").write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"prompt": "caf\xe9?", "completion": "A"}\n')
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    _jsonl(w / "mixed.jsonl", [*ROWS[:2], chat])
    (w / "no-tokenizer").mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (w / "no-tokenizer" / name).symlink_to(tiny_model_dir / name)
    (w / "bad.yaml").write_text("model: tiny\narms: [base, gt\n")
    (w / "tag.yaml").write_text('model: !!python/object/apply:os.system ["echo hi"]\narms: [base]\n')
    (w / "latin1.yaml").write_bytes(b"model: caf\xe9\n")
    study = {
        "model": str(tiny_model_dir),
        "output_dir": "study-out",
        "data": {"path": str(w / "rows.jsonl")},
        "training": {"max_steps": 1, "use_cpu": True, "bf16": False},
        "arms": ["base", "gt", "stm"],
        "eval": {"tasks": ["gsm8k"], "limit": 2},
    }
    (w / "bert").mkdir()
    (w / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    (w / "study-arm.yaml").write_text(json.dumps({**study, "arms": ["base", "gt", "stn"]}))
    (w / "study-task.yaml").write_text(json.dumps({**study, "eval": {"tasks": ["gsm8k", "gsm9k"]}}))
    (w / "study-training.yaml").write_text(json.dumps({**study, "training": {"max_steps": 1, "learning_rat": 1e-4}}))
    (w / "study-threshold.yaml").write_text(json.dumps({**study, "mask": {"threshold": "2.5x"}}))


BAD_INPUTS = {
    # score
    "score-truncated-jsonl": (["score", "--dataset", "{w}/trunc.jsonl"], ["line 2 is not valid JSON", "cut off"]),
    "score-empty-jsonl": (["score", "--dataset", "{w}/empty.jsonl"], ["empty.jsonl is empty"]),
    "score-wrong-type": (["score", "--dataset", "{w}/types.jsonl"], ["Row 0", "'prompt'", "not a string"]),
    "score-message-without-content": (["score", "--dataset", "{w}/nocontent.jsonl"], ["Row 0", "`content`"]),
    "score-missing-file": (["score", "--dataset", "./nope.jsonl"], ["nope.jsonl does not exist"]),
    "score-missing-model": (["score", "--dataset", "{w}/rows.jsonl", "--model", "./nomodel"], ["model folder"]),
    "score-unknown-task": (["score", "--dataset", "gsm9k"], ["Unknown task 'gsm9k'", "did you mean 'gsm8k'"]),
    "score-missing-adapter": (["score", "--dataset", "{w}/rows.jsonl", "--adapter", "./nope"], ["adapter folder"]),
    "score-masked-lm-model": (
        ["score", "--dataset", "{w}/rows.jsonl", "--model", "{w}/bert"],
        ["BertForMaskedLM", "not a causal language model"],
    ),
    "score-non-utf8-jsonl": (
        ["score", "--dataset", "{w}/latin1.jsonl"],
        ["latin1.jsonl is not UTF-8: line 2, column 16 (byte offset", "0xe9"],
    ),
    "score-messages-row-among-prompt-rows": (
        ["score", "--dataset", "{w}/mixed.jsonl"],
        ["Row 2 is in the 'messages' format", "row 0 is 'prompt_completion'"],
    ),
    "score-model-without-tokenizer-files": (
        ["score", "--dataset", "{w}/rows.jsonl", "--model", "{w}/no-tokenizer"],
        ["no-tokenizer has no tokenizer files", "tokenizer.json", "holds config.json"],
    ),
    "score-output-is-the-current-directory": (
        ["score", "--dataset", "{w}/rows.jsonl", "--output-dir", ".", "--overwrite"],
        ["--output-dir . is the current directory"],
    ),
    # mask
    "mask-zero-rows": (["mask", "--input", "{w}/zero"], ["saved dataset with no rows"]),
    "mask-short-labels": (["mask", "--input", "{w}/short"], ["Row 0", "`labels` has 2 values", "4 tokens"]),
    "mask-config-of-a-file": (["mask", "--input", "{w}/short", "--dataset-config", "x"], ["--dataset-config", "x"]),
    "mask-built-folder-missing-a-shard": (
        ["mask", "--input", "{w}/built-missing-shard", "--dataset-config", "cfg"],
        ["lacks 1 data file", "cfg/train-00000-of-00001.parquet"],
    ),
    # build
    "build-truncated-jsonl": (["build", "--dataset", "{w}/trunc.jsonl"], ["line 2 is not valid JSON"]),
    "build-unknown-task": (["build", "--dataset", "gsm9k"], ["did you mean 'gsm8k'"]),
    "build-nan-threshold": (["build", "--dataset", "{w}/rows.jsonl", "--threshold", "nan"], ["finite"]),
    "build-missing-model": (["build", "--dataset", "{w}/rows.jsonl", "--models", "./nomodel"], ["model folder"]),
    "build-config-name-glob": (
        ["build", "--dataset", "{w}/rows.jsonl", "--config-names", "*"],
        ["Invalid config name '*'", "[A-Za-z0-9][A-Za-z0-9._-]*"],
    ),
    "build-config-name-readme": (
        ["build", "--dataset", "{w}/rows.jsonl", "--config-names", "README.md"],
        ["Invalid config name 'README.md'", "the folder's own entries"],
    ),
    "build-bad-repo-id": (
        ["build", "--dataset", "{w}/rows.jsonl", "--repo-id", "my org/data set"],
        ["--repo-id 'my org/data set' is not a valid Hub repo id"],
    ),
    "build-config-file-invalid-yaml": (
        ["build", "--dataset", "{w}/rows.jsonl", "--config", "{w}/bad.yaml"],
        ["bad.yaml, line 3, column 1 is not valid YAML"],
    ),
    # self-output
    "self-output-truncated-jsonl": (
        ["self-output", "--dataset", "{w}/trunc.jsonl", "--verifier", "gsm8k"],
        ["line 2 is not valid JSON"],
    ),
    "self-output-unknown-task": (["self-output", "--dataset", "gsm9k"], ["did you mean 'gsm8k'"]),
    "self-output-nan-threshold": (["self-output", "--dataset", "gsm8k", "--ppl-threshold", "nan"], ["finite"]),
    "self-output-rows-lack-the-verifier-field": (
        ["self-output", "--dataset", "{w}/rows.jsonl", "--verifier", "gsm8k"],
        ["Row 0", "gsm8k verifier needs the row field 'answer'"],
    ),
    # push
    "push-empty-build-info": (["push", "{w}/empty-info", "--dry-run", "--repo-id", "o/n"], ["has no 'kind'"]),
    "push-build-info-not-json": (["push", "{w}/bad-json", "--dry-run", "--repo-id", "o/n"], ["not valid JSON"]),
    "push-dry-run-bad-repo-id": (["push", "{w}/built", "--dry-run", "--repo-id", "not a repo!"], ["--repo-id"]),
    "push-dry-run-missing-shard": (
        ["push", "{w}/built-missing-shard", "--dry-run", "--repo-id", "o/n"],
        ["lacks 1 data file", "cfg/train-00000-of-00001.parquet"],
    ),
    "push-dry-run-broken-card-header": (
        ["push", "{w}/built-broken-card", "--dry-run", "--repo-id", "o/n"],
        ["README.md: its YAML header is not valid YAML"],
    ),
    "push-dry-run-card-without-the-config": (
        ["push", "{w}/built-card-without-configs", "--dry-run", "--repo-id", "o/n"],
        ["does not list the config(s) ['cfg']"],
    ),
    # eval: every setting is checked before any model is loaded
    "eval-unknown-task": (["eval", "--tasks", "gsm8k,gsm9k"], ["Unknown task 'gsm9k'", "did you mean 'gsm8k'"]),
    "eval-confidence": (["eval", "--tasks", "gsm8k", "--confidence", "1.5"], ["--confidence", "1.5", "0.95"]),
    "eval-output-is-a-file": (
        ["eval", "--tasks", "gsm8k", "--output-dir", "{w}/rows.jsonl"],
        ["--output-dir", "is a file"],
    ),
    "eval-bad-split": (["eval", "--tasks", "mbpp", "--split", "mbpp"], ["--split takes DATASET=SPLIT", "'mbpp'"]),
    "eval-unknown-reference": (["eval", "--tasks", "gsm8k", "--reference", "gt"], ["reference model 'gt'"]),
    # sft (TRL's parser): refused before any model or data is loaded
    "sft-unknown-strategy": (
        ["sft", "--pplmask_strategy", "bogus"],
        ["--pplmask_strategy", "invalid choice: 'bogus'"],
    ),
    "sft-threshold-one": (["sft", "--pplmask_threshold", "1.0"], ["threshold=1.0", "above 1"]),
    "sft-threshold-inf": (["sft", "--pplmask_threshold", "inf"], ["pplmask_threshold=inf", "finite"]),
    "sft-packing": (["sft", "--packing", "true"], ["packing=true is not supported", "packing=false"]),
    "sft-anchor-without-mask": (
        ["sft", "--pplmask_strategy", "none", "--pplmask_anchor", "true"],
        ["pplmask_anchor=true", "pplmask_strategy=none"],
    ),
    "sft-question-answer-jsonl": (
        ["sft", "--dataset_name", "{w}/qa.jsonl"],
        ["qa.jsonl", "columns ['answer', 'question']", "`prompt`+`completion`", "`messages`", "`text`"],
    ),
    "sft-non-utf8-jsonl": (["sft", "--dataset_name", "{w}/latin1.jsonl"], ["latin1.jsonl is not UTF-8: line 2"]),
    "sft-messages-row-among-prompt-rows": (
        ["sft", "--dataset_name", "{w}/mixed.jsonl"],
        ["Row 2 is in the 'messages'"],
    ),
    "sft-model-without-tokenizer-files": (
        ["sft", "--model_name_or_path", "{w}/no-tokenizer"],
        ["no-tokenizer has no tokenizer files"],
    ),
    "sft-built-folder-missing-a-shard": (
        ["sft", "--dataset_name", "{w}/built-missing-shard", "--dataset_config", "cfg"],
        ["lacks 1 data file", "cfg/train-00000-of-00001.parquet"],
    ),
    "sft-config-python-tag": (["sft", "--config", "{w}/tag.yaml"], ["line 1, column 8", "tags are not allowed"]),
    "sft-config-invalid-yaml": (["sft", "--config", "{w}/bad.yaml"], ["bad.yaml, line 3, column 1 is not valid YAML"]),
    "sft-masked-lm-model": (
        ["sft", "--model_name_or_path", "{w}/bert"],
        ["The model", "BertForMaskedLM", "not a causal language model"],
    ),
    "sft-masked-lm-reference": (
        ["sft", "--pplmask_reference", "{w}/bert"],
        ["pplmask_reference", "BertForMaskedLM", "not a causal language model"],
    ),
    "sft-missing-reference": (["sft", "--pplmask_reference", "./noref"], ["pplmask_reference folder ./noref"]),
    # study: the YAML is checked whole before any stage runs
    "study-unknown-arm": (["study", "--config", "{w}/study-arm.yaml"], ["unknown arm 'stn'", "did you mean 'stm'"]),
    "study-unknown-eval-task": (["study", "--config", "{w}/study-task.yaml"], ["eval: Unknown task 'gsm9k'"]),
    "study-unknown-training-key": (["study", "--config", "{w}/study-training.yaml"], ["learning_rat"]),
    "study-invalid-yaml": (["study", "--config", "{w}/bad.yaml"], ["bad.yaml, line 3, column 1 is not valid YAML"]),
    "study-python-tag": (
        ["study", "--config", "{w}/tag.yaml"],
        ["tag.yaml, line 1, column 8", "!!python/object/apply:os.system is not allowed", "nothing was run"],
    ),
    "study-non-utf8-yaml": (["study", "--config", "{w}/latin1.yaml"], ["latin1.yaml is not UTF-8: line 1, column 11"]),
    "study-threshold-not-a-number": (
        ["study", "--config", "{w}/study-threshold.yaml"],
        ["mask.threshold: expected a number, got '2.5x'"],
    ),
}
_OUTPUT_OPTION = {
    "score": "--output-dir",
    "mask": "--output-dir",
    "build": "--output-dir",
    "self-output": "--output-dir",
    "eval": "--output-dir",
    "sft": "--output_dir",
    "study": "--output-dir",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_message_before_any_work(case, tmp_path, tiny_model_dir, monkeypatch, capsys):
    import transformers

    w = tmp_path / "w"
    w.mkdir()
    _bad_input_files(w, tiny_model_dir)
    argv, expected = BAD_INPUTS[case]
    argv = [arg.format(w=w) for arg in argv]
    command = argv[0]
    if command in _OUTPUT_OPTION and _OUTPUT_OPTION[command] not in argv:
        argv += [_OUTPUT_OPTION[command], str(tmp_path / "out")]
    if command == "sft":
        for option, value in (("--model_name_or_path", tiny_model_dir), ("--dataset_name", w / "rows.jsonl")):
            argv += [option, str(value)] if option not in argv else []
        argv += ["--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
    if command == "eval":
        argv += ["--base", str(tiny_model_dir), "--limit", "1"]
    if command in ("score",) and "--model" not in argv:
        argv += ["--model", str(tiny_model_dir)]
    if command == "build":
        argv += ["--no-cache", *(["--models", str(tiny_model_dir)] if "--models" not in argv else [])]

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.chdir(tmp_path)
    before = folder_bytes(w)
    try:
        code = cli_main(argv)
    except SystemExit as exit:  # an argparse error (TRL's parser raises it out of `sft`)
        code = exit.code
    err = capsys.readouterr().err
    assert code != 0, err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no staging, cache or checkpoint folder either
    assert folder_bytes(w) == before


def test_adapter_of_another_shape_is_refused(tmp_path, tiny_model_dir, capsys):
    """An adapter saved for the same model name but trained on weights of another shape (score and eval load it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tiny_llama().config.to_dict()
    other = LlamaForCausalLM(LlamaConfig(**{**base, "hidden_size": 32, "intermediate_size": 64}))
    other.config.name_or_path = str(tiny_model_dir)
    adapter = tmp_path / "adapter"
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    argv = [*_argv(data, tiny_model_dir, tmp_path / "out"), "--adapter", str(adapter)]
    err = _fails(argv, capsys, "does not fit the model", "other shapes", "load it on that model")
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_mask_selects_a_config_of_a_multi_config_folder(tmp_path, capsys):
    """`mask --dataset-config` picks one scoring model's config of a Hub-layout folder."""
    folder = tmp_path / "gsm8k-pplmasked"
    for name, rows in (("a", 1), ("b", 2)):
        (folder / name).mkdir(parents=True)
        nll = [[0.1, 5.0, 0.2]] * rows
        data = {"input_ids": [[1, 2, 3]] * rows, "labels": [[-100, 2, 3]] * rows, "token_nll": nll}
        Dataset.from_dict(data).to_parquet(folder / name / "train-00000-of-00001.parquet")
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train-*.parquet\n" for name in "ab"
    )
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    out = tmp_path / "masked"
    assert cli_main(["mask", "--input", str(folder), "--dataset-config", "b", "--output", str(out)]) == 0
    masked = load_from_disk(str(out))
    assert len(masked) == 2 and masked["labels"][0] == [-100, -100, 3]


# The same for the collator API: one ValueError naming what, where and how to fix, and the batch left as it was
_SCORED = {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4], "token_nll": [0.0, 0.0, 1.5, 0.2]}
_UNSCORED = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
BAD_COLLATOR_INPUTS = {
    "collator-mixed-scored-and-unscored": (
        {},
        [_SCORED, _UNSCORED],
        ["Some examples of the batch have `token_nll` and others do not", "score the whole dataset"],
    ),
    "collator-unscored-without-reference-model": (
        {},
        [_UNSCORED],
        ["no `token_nll` column", "trl-pplmask score", "remove_unused_columns=False", "reference_model="],
    ),
    "collator-nll-of-another-length": (
        {},
        [_SCORED, {**_SCORED, "token_nll": [0.0, 1.0, 2.0]}],
        ["Example 1:", "`token_nll` has 3 values", "4 tokens"],
    ),
    "collator-non-finite-nll": (
        {},
        [{**_SCORED, "token_nll": [0.0, 0.0, float("nan"), 0.2]}],
        ["Example 0:", "non-finite value", "token 2"],
    ),
    "collator-empty-batch": ({}, [], ["empty batch"]),
    "collator-entropy-strategy-without-entropies": (
        {"strategy": "stm_entropy"},
        [_SCORED],
        ["'stm_entropy'", "'token_entropy'", "trl-pplmask score"],
    ),
    "collator-dpf-without-its-column": ({"strategy": "dpf"}, [_SCORED], ["'dpf'", "'token_nll_dpf'"]),
    "collator-threshold-one": ({"threshold": 1.0}, [_SCORED], ["threshold=1.0", "above 1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_COLLATOR_INPUTS))
def test_collator_bad_input_is_one_clear_value_error(case, tokenizer):
    import copy

    from trl_pplmask import PplMaskCollator

    kwargs, examples, expected = BAD_COLLATOR_INPUTS[case]
    before = copy.deepcopy(examples)
    with pytest.raises(ValueError) as raised:
        PplMaskCollator(tokenizer, **kwargs)(examples)
    message = str(raised.value)
    assert "\n" not in message.strip(), message
    for text in expected:
        assert text in message, message
    assert examples == before  # nothing was masked or dropped in place


def test_bad_input_tables_cover_every_command():
    """Issue 10: at least 25 kinds of bad input (one case each) across the commands and the collator."""
    commands = {argv[0] for argv, _ in BAD_INPUTS.values()} | {"collator"}
    assert commands >= {"score", "mask", "build", "self-output", "eval", "push", "collator", "sft", "study"}
    assert len(BAD_INPUTS) + len(BAD_COLLATOR_INPUTS) >= 25


# Kill -9 at a random point of `score` and `mask`, then rerun: the output equals that of an uninterrupted run (the
# output is swapped in whole, a dead run's staging folder is removed, a cache entry is never half-written)
def _run_cli(argv: list[str], cache: Path, kill_after: float | None = None) -> tuple[int, float]:
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_PPLMASK_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "trl_pplmask.cli", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=600)
    assert kill_after is not None or process.returncode == 0, err.decode()
    return process.returncode, time.perf_counter() - start


def _dataset_content(folder: Path) -> tuple[dict, dict]:
    dataset = load_from_disk(str(folder))
    return dataset.features.to_dict(), dataset.to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["score", "mask"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(command, tmp_path, tiny_model_dir):
    import random

    data = _jsonl(tmp_path / "rows.jsonl", ROWS * 8)
    scored = tmp_path / "scored"
    score_argv = ["score", "--dataset", str(data), "--model", str(tiny_model_dir), "--max-tokens-per-batch", "64"]
    _, took = _run_cli([*score_argv, "--output", str(scored)], tmp_path / "cache-reference")
    if command == "score":
        argv, inputs = score_argv, data
    else:
        argv, inputs = ["mask", "--input", str(scored)], scored
        _, took = _run_cli([*argv, "--output", str(tmp_path / "reference")], tmp_path / "cache-reference")
    reference = scored if command == "score" else tmp_path / "reference"
    expected = _dataset_content(reference)
    before = folder_bytes(inputs) if inputs.is_dir() else inputs.read_bytes()

    # One kill early, one midway, one near the end (the save); each into a fresh folder and cache, then a rerun
    for attempt, (low, high) in enumerate([(0.2, 0.5), (0.5, 0.8), (0.8, 1.05)]):
        runs, cache = tmp_path / f"runs-{attempt}", tmp_path / f"cache-{attempt}"
        runs.mkdir()
        out = runs / "out"
        kill_after = random.uniform(low, high) * took
        code, _ = _run_cli([*argv, "--output", str(out)], cache, kill_after=kill_after)
        where = f"killed after {kill_after:.2f} s of {took:.2f} s (exit {code})"
        if out.exists():  # killed after the swap, or not killed: the output is complete
            assert _dataset_content(out) == expected, where
        _run_cli([*argv, "--output", str(out), "--overwrite"], cache)
        assert _dataset_content(out) == expected, where
        assert [p.name for p in runs.iterdir()] == ["out"], where  # the dead run's staging folder is gone
        assert (folder_bytes(inputs) if inputs.is_dir() else inputs.read_bytes()) == before, where


# --------------------------------------------------------------------------------------------------------------------
# One writer per output, no overwrite without --overwrite, --no-cache (issue 18)
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["score", "mask"])
def test_second_writer_into_one_output_is_refused_naming_the_holder(command, scored, tmp_path, tiny_model_dir, capsys):
    import os

    from trl_pplmask.utils import OutputLock

    out = tmp_path / "out"
    if command == "score":
        argv = ["score", "--dataset", str(_jsonl(tmp_path / "rows.jsonl", ROWS)), "--model", str(tiny_model_dir)]
    else:
        argv = ["mask", "--input", str(scored)]
    with OutputLock(out):  # another run writing into `out` (this process stands for it)
        _fails([*argv, "--output", str(out)], capsys, f"PID {os.getpid()}", str(out), "another process")
    assert not out.exists()
    assert cli_main([*argv, "--output", str(out)]) == 0  # released: the next run writes
    assert not list(tmp_path.glob(".*.lock"))  # and no lock file is left beside the output


def test_score_no_cache_neither_reads_nor_writes_the_cache(tmp_path, tiny_model_dir):
    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    assert _score(data, tiny_model_dir, tmp_path / "a", "--no-cache") == 0
    assert not list((tmp_path / "cache").rglob("*.npz"))
    assert _score(data, tiny_model_dir, tmp_path / "b") == 0
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 1


def test_eval_does_not_replace_a_report_without_overwrite(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import transformers

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text('{"kept": true}')

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the existing report was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    argv = ["eval", "--tasks", "gsm8k", "--limit", "1", "--base", str(tiny_model_dir), "--output", str(out)]
    _fails(argv, capsys, "already holds a report", "--overwrite")
    assert (out / "report.json").read_text() == '{"kept": true}'


# --------------------------------------------------------------------------------------------------------------------
# Issue 18 item 6: errors said before the work, and a build that commits its configs and card together
# --------------------------------------------------------------------------------------------------------------------
def _read_only(folder: Path, monkeypatch) -> Path:
    """`folder`, made read-only: by its mode, and (root writes anyway) by refusing to create files in it."""
    import os
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(13, os.strerror(13), str(folder))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    return folder


@pytest.mark.parametrize("where", ["output", "cache", "build-cache", "eval-cache"])
def test_read_only_output_or_cache_is_refused_before_scoring(where, tmp_path, tiny_model_dir, monkeypatch, capsys):
    import transformers

    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    read_only = _read_only(tmp_path / "read-only", monkeypatch)
    out = read_only / "out" if where == "output" else tmp_path / "out"
    if where != "output":
        monkeypatch.setenv("TRL_PPLMASK_CACHE", str(read_only))
    argv = _argv(data, tiny_model_dir, out)
    if where == "build-cache":
        argv = ["build", "--dataset", str(data), "--models", str(tiny_model_dir), "--output-dir", str(out)]
    if where == "eval-cache":
        argv = ["eval", "--base", str(tiny_model_dir), "--tasks", "gsm8k_nll", "--limit", "2", "--output", str(out)]

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the read-only folder was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    try:
        expected = ["--output", "cannot be written"] if where == "output" else ["score cache", "--no-cache"]
        if where == "eval-cache":
            expected = ["eval cache", "--no-cache"]
        _fails(argv, capsys, *expected, str(read_only))
    finally:
        read_only.chmod(0o755)
    assert not out.exists() and list(read_only.iterdir()) == []


def _fake_mount_point(out: Path, monkeypatch) -> Path:
    """`out` made as an empty folder that `os.path.ismount` calls a mount point, with model loading forbidden (the
    refusal must come before any model loads)."""
    import os

    import transformers

    out.mkdir()
    ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p).absolute() == out or ismount(p))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the mount point was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    return out


@pytest.mark.parametrize("command", ["score", "mask"])
def test_output_that_is_a_mount_point_is_refused_before_any_work(
    command, scored, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """An (empty) mount point as --output, e.g. a container's volume: the output is renamed into place, which a mount
    point refuses (EBUSY), so the run failed after all the scoring with a bare errno. Refused up front instead (the
    survey mounts a real tmpfs; here `os.path.ismount` says so)."""
    out = _fake_mount_point(tmp_path / "volume", monkeypatch)
    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    argv = (
        _argv(data, tiny_model_dir, out)
        if command == "score"
        else ["mask", "--input", str(scored), "--output-dir", str(out)]
    )
    _fails(argv, capsys, f"--output-dir {out} is a mount point", f"--output-dir {out / 'scored'}")
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "volume"]


@pytest.mark.parametrize("command", ["build", "self-output"])
def test_build_into_a_mount_point_is_refused_before_any_work(
    command, tmp_path, tiny_model_dir, data_dir, monkeypatch, capsys
):
    """`build --output-dir <mount point>` (a container's volume): the build is staged beside the folder and renamed
    into it, which a mount point refuses (EBUSY for a new folder, EXDEV for configs added to one), after all the
    scoring. Refused up front instead (the survey mounts a real tmpfs; here `os.path.ismount` says so)."""
    out = _fake_mount_point(tmp_path / "volume", monkeypatch)
    argv = [command, "--dataset", "gsm8k", "--limit", "2", "--models", str(tiny_model_dir), "--output-dir", str(out)]
    argv += ["--no-cache"] if command == "build" else ["--num-samples", "1", "--max-new-tokens", "4"]
    _fails(argv, capsys, f"Output folder {out} is a mount point", f"--output-dir {out / 'volume'}")
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["volume"]


def test_full_disk_at_the_output_lock_is_one_clear_error_and_leaves_no_lock_file(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """A disk too full for the lock file's PID (the survey's 0-bytes-free build): what, where and how to fix, not a
    bare `[Errno 28]`, and no empty lock file left beside the output."""
    import errno
    import os

    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "out"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", disk_full)
    expected = (f"--output-dir {out} cannot be written", "lock file", "Free space")
    _fails(_argv(data, tiny_model_dir, out), capsys, *expected)
    assert not out.exists() and not list(tmp_path.glob(".*.lock"))


def test_full_disk_names_the_folders_the_command_writes(scored, tmp_path, monkeypatch, capsys):
    """A write to a full disk names no file (`[Errno 28] No space left on device`): the error says which folders the
    command writes and what to do, and the output is not left half-written."""
    import errno
    import os

    def disk_full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Dataset, "save_to_disk", disk_full)
    out = tmp_path / "out"
    err = _fails(["mask", "--input", str(scored), "--output", str(out)], capsys, "No space left on device")
    assert f"the disk holding --output-dir {out}" in err and "Free space there" in err, err
    assert "[Errno" not in err and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging folder left either


def test_study_yaml_reads_yaml_1_2_numbers(tmp_path):
    """`1.0e9` and `1e-4` are strings in YAML 1.1 (PyYAML): read as the numbers they are; a quoted number too."""
    from trl_pplmask.study.config import load_study_config

    _jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "study.yaml").write_text(
        "model: tiny\noutput_dir: out\ndata: {task: gsm8k, path: rows.jsonl}\narms: [base, gt, stm]\n"
        "training: {learning_rate: 1e-4, use_peft: false}\nmask: {threshold: 1.0e9, anchor_weight: '0.5'}\n"
        "eval: {tasks: [gsm8k]}\n"
    )
    config = load_study_config(tmp_path / "study.yaml")
    assert config.mask.threshold == 1e9 and config.mask.anchor_weight == 0.5
    assert config.training["learning_rate"] == 1e-4


def test_study_plan_says_what_the_run_will_do_with_a_finished_arm(tmp_path, monkeypatch):
    """`study --plan` calls an arm finished only where the run reuses it, and refused where the run refuses it."""
    import dataclasses

    from trl_pplmask.study.config import config_from_dict
    from trl_pplmask.study.layout import StudyPaths
    from trl_pplmask.study.plan import arm_trainer_settings
    from trl_pplmask.study.prepare import prepare_data
    from trl_pplmask.study.runner import arm_status
    from trl_pplmask.utils import json_safe

    monkeypatch.chdir(tmp_path)
    raw = {
        "model": "tiny",
        "output_dir": "out",
        "data": {"task": "gsm8k", "path": str(_jsonl(tmp_path / "rows.jsonl", ROWS))},
        "arms": ["base", "gt"],
        "training": {"use_peft": False},
        "eval": {"tasks": ["gsm8k"]},
    }
    config, paths = config_from_dict(raw), StudyPaths("out")
    info, _ = prepare_data(config, paths)
    gt = config.training_arms[0]
    identity = {"arm": "gt", "settings": json_safe(arm_trainer_settings(config, gt)), "data": info["fingerprint"]}
    paths.arm("gt").mkdir(parents=True)
    (paths.arm("gt") / "arm.json").write_text(json.dumps(identity))
    (paths.arm("gt") / "pplmask_config.json").write_text("{}")  # what a finished arm leaves
    assert arm_status(config) == {"gt": "finished"}
    # The YAML now names fewer rows: the run refuses the prepared data, so the plan may not call the arm finished
    fewer = dataclasses.replace(config, data=dataclasses.replace(config.data, limit=2))
    with pytest.raises(ValueError, match="prepared from other data") as refused:
        prepare_data(fewer, paths)
    assert arm_status(fewer) == {"gt": f"refused: {refused.value}"}
    # The data folder deleted: the run prepares the same rows again and reuses the arm, as the plan says
    shutil.rmtree(paths.data)
    assert arm_status(config) == {"gt": "finished"}
    assert not paths.data.exists()  # the plan wrote nothing


def test_disk_full_while_adding_a_config_leaves_the_folder_as_it_was(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A build into an existing folder commits its configs and the card together: when the card cannot be written
    (ENOSPC), the new config goes back out and the replaced one comes back; the rerun completes the folder."""
    import errno
    import os

    from trl_pplmask.hub import card

    data = _jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "built"
    argv = ["build", "--dataset", str(data), "--output-dir", str(out), "--unmasked-splits", "--no-cache"]
    assert cli_main([*argv, "--models", str(tiny_model_dir), "--config-names", "a"]) == 0
    before = folder_bytes(out)
    write = card.atomic_write_text

    def disk_full(path, text):
        if Path(path).name == "README.md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, text)

    monkeypatch.setattr(card, "atomic_write_text", disk_full)
    two = [*argv, "--threshold", "3", "--models", str(tiny_model_dir), str(tiny_model_dir), "--config-names", "a", "b"]
    _fails(two, capsys, "No space left on device")
    assert folder_bytes(out) == before  # config a as it was, no config b, the card as it was
    assert not [p.name for p in tmp_path.iterdir() if "-replaced-" in p.name]
    monkeypatch.setattr(card, "atomic_write_text", write)
    assert cli_main(two) == 0
    infos = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/build_info.json")}
    assert sorted(infos) == ["a", "b"] and infos["a"]["settings"]["threshold"] == 3
    assert "config_name: b" in (out / "README.md").read_text()


def test_resumed_sft_says_its_statistics_count_only_the_steps_after_the_checkpoint(tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "rows.jsonl", ROWS + ROWS[:1])
    out = tmp_path / "out"
    argv = ["sft", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "steps", "--save_steps", "1",
            "--pplmask_strategy", "none", "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
            "--disable_tqdm", "true"]  # fmt: skip
    assert cli_main(argv) == 0
    whole = json.loads((out / "pplmask_config.json").read_text())
    assert whole["mask_stats_scope"] == "every training step (1-2)" and whole["mask_stats"]["examples"] == 4
    capsys.readouterr()
    assert cli_main([*argv, "--resume_from_checkpoint", str(out / "checkpoint-1")]) == 0
    resumed = json.loads((out / "pplmask_config.json").read_text())
    assert resumed["mask_stats"]["examples"] == 2  # step 2's batch only
    assert resumed["mask_stats_scope"].startswith("steps 2-2 only: the run resumed from")
    assert "statistics of steps 1-1 are not counted" in capsys.readouterr().out
