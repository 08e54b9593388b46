"""Reliability (issue 18): no secret in any written file, caches that cannot lie, one writer per output."""

from __future__ import annotations

from pathlib import Path

import pytest

from trl_pplmask.cli import main as cli_main
from trl_pplmask.utils import REDACTED, is_secret_name, redact, redact_text


# Planted secrets: an `hf_...` token, and a secret whose value has no recognisable shape
TOKEN = "hf_PLANTEDsecret0123456789abcdef"


def files_holding(folder: Path, secret: str = TOKEN) -> list[str]:
    """Every file under `folder` (hidden ones and binaries included) whose bytes contain `secret`."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()
    )


# --------------------------------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------------------------------
def test_redaction_of_names_values_and_command_lines():
    record = {
        "hub_token": "anything",
        "HF_TOKEN": TOKEN,
        "wandb_api_key": "k",
        "pad_token": "<pad>",
        "max_new_tokens": 8,
        "token_nll": [0.5],
        "unset_token": None,
        "nested": [{"client_secret": "s", "note": f"token {TOKEN} inside"}],
    }
    assert redact(record) == {
        "hub_token": REDACTED,
        "HF_TOKEN": REDACTED,
        "wandb_api_key": REDACTED,
        "pad_token": "<pad>",
        "max_new_tokens": 8,
        "token_nll": [0.5],
        "unset_token": None,
        "nested": [{"client_secret": REDACTED, "note": f"token {REDACTED} inside"}],
    }
    command = "trl-pplmask sft --hub_token abc --max_new_tokens 5 --api-key=xyz --push_to_hub"
    assert redact_text(command) == (
        f"trl-pplmask sft --hub_token {REDACTED} --max_new_tokens 5 --api-key={REDACTED} --push_to_hub"
    )
    assert not any(is_secret_name(n) for n in ("token_entropy", "pplmask_max_tokens_per_batch", "eos_token"))
    # argparse's usage line and help name the flag's metavar, which is no secret (`sft --help` is cached in a file)
    usage = "[--hub_token HUB_TOKEN] [--hub-token=HUB_TOKEN]\n  --hub_token HUB_TOKEN  The token to push with."
    assert redact_text(usage) == usage


def test_atomic_write_text_leaves_ordinary_content_untouched(tmp_path):
    from trl_pplmask.utils import atomic_write_text

    # Text that looks near a secret but is none: a card, a YAML recipe, a JSON record, prose, shell snippets
    ordinary = (
        "---\nlicense: mit\ntags: [hf_datasets, pad_token]\n---\n# GSM8K\n"
        "`huggingface-cli login --token $HF_TOKEN`, `--hub_token <your token>`, `--token ${HF_TOKEN}`\n"
        "The pad-token 5 and the access-token are words here; max_new_tokens: 256; eos_token: <|im_end|>\n"
        '{"token_nll": [0.5, 1.25], "hub_model_id": "org/model", "hf_hub_cache": "~/.cache/hf_hub_abc"}\n'
        "--pplmask_threshold 2.5 --max_length=1024 -x\nünïcode ✓, tabs\tand\r\nCRLF\n"
    )
    path = tmp_path / "README.md"
    atomic_write_text(path, ordinary)
    assert path.read_bytes() == ordinary.encode("utf-8")
    # ... while a real secret in the same file is hidden
    atomic_write_text(path, ordinary + f"--hub_token {TOKEN}\n")
    assert path.read_bytes() == (ordinary + f"--hub_token {REDACTED}\n").encode("utf-8")


@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory, data_dir) -> Path:
    from trl_pplmask.data import load_task

    path = tmp_path_factory.mktemp("data") / "gsm8k4"
    load_task("gsm8k", "train", limit=4).save_to_disk(str(path))
    return path


def sft_argv(output: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return [
        "sft", "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(output),
        "--max_length", "256", "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules",
        "all-linear", "--per_device_train_batch_size", "2", "--use_cpu", "--bf16", "false", "--report_to", "none",
        "--logging_steps", "1", "--disable_tqdm", "true", "--pplmask_threshold", "49152", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished_sft(tmp_path_factory, tiny_model_dir, gsm8k_dir) -> Path:
    """The output_dir of a finished `trl-pplmask sft` run given a planted `--hub_token` (2 steps, a checkpoint
    each)."""
    out = tmp_path_factory.mktemp("sft") / "out"
    argv = sft_argv(out, tiny_model_dir, gsm8k_dir, "--max_steps", "2", "--save_strategy", "steps")
    argv += ["--save_steps", "1", "--hub_token", TOKEN, "--run_name", f"run-{TOKEN}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("HF_TOKEN", raising=False)  # the run moves the token there; restored after it
        assert cli_main(argv) == 0
    return out


def test_no_secret_in_any_file_of_an_sft_run(finished_sft):
    out = finished_sft
    assert (out / "pplmask_config.json").is_file() and list(out.glob("checkpoint-*/training_args.bin"))
    assert files_holding(out) == []
    assert REDACTED in (out / "pplmask_config.json").read_text()  # the command line, recorded without the token
    assert not list(out.parent.glob(".*.lock"))  # the output_dir's lock is gone with the run


def test_failed_sft_rerun_keeps_the_finished_runs_record(finished_sft, tiny_model_dir, tmp_path, capsys):
    """A rerun into a finished run's output_dir whose input is refused leaves every file of the folder as it was
    (`pplmask_config.json` is removed only once the new run's inputs have been checked)."""
    import json

    before = {p: p.read_bytes() for p in finished_sft.rglob("*") if p.is_file()}
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "5"}) + "\n")
    assert cli_main(sft_argv(finished_sft, tiny_model_dir, qa, "--max_steps", "2")) == 2
    assert "Cannot recognise the dataset format" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in finished_sft.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_no_secret_in_any_file_of_a_study(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    from trl_pplmask.study import config_from_dict, run_study

    monkeypatch.delenv("HF_TOKEN", raising=False)
    raw = {
        "model": str(tiny_model_dir),
        "output_dir": str(tmp_path / "study"),
        "data": {"task": "gsm8k", "limit": 4},
        "training": {
            "use_peft": True,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_target_modules": "all-linear",
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "max_length": 256,
            "use_cpu": True,
            "report_to": "none",
            "save_strategy": "no",
            "hub_token": TOKEN,
            "run_name": f"study-{TOKEN}",
        },
        "arms": ["base", "gt"],
        "eval": {
            "tasks": ["gsm8k_nll"],
            "target": "gsm8k_nll",
            "limit": 2,
            "n_resamples": 20,
            "cache_dir": str(tmp_path / "cache"),
        },
    }
    study = run_study(config_from_dict(raw), f"trl-pplmask study --hub_token {TOKEN}")
    assert study["status"] == "complete"
    root = tmp_path / "study"
    for name in ("study.json", "arms/gt/arm.json", "arms/gt/config.yaml", "arms/gt/pplmask_config.json"):
        assert (root / name).is_file(), name
    assert files_holding(root) == [] and files_holding(tmp_path / "cache") == []
    # A rerun reuses the finished arm: the redacted secret is not "another setting"
    again = run_study(config_from_dict(raw))
    assert again["stages"]["train:gt"]["reused"] is True


def test_no_secret_in_any_file_of_a_build(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "built"
    argv = ["build", "--dataset", "gsm8k", "--limit", "3", "--models", str(tiny_model_dir), "--output-dir", str(out)]
    argv += ["--pretty-name", f"GSM8K {TOKEN}", "--no-cache"]
    assert cli_main(argv) == 0
    assert (out / "README.md").is_file()
    assert files_holding(out) == []
    assert not list(tmp_path.glob(".*.lock"))  # the output folder's lock is gone with the build


# --------------------------------------------------------------------------------------------------------------------
# Caches that cannot lie
# --------------------------------------------------------------------------------------------------------------------
def _tokens(n_rows: int = 3, vocab: int = 512):
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(0)
    rows = []
    for n in (20, 31, 9)[:n_rows]:
        ids = rng.integers(1, vocab, n).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return Dataset.from_list(rows)


def _score(dataset, model, cache, **kwargs):
    from trl_pplmask.scoring import score_dataset

    return score_dataset(dataset, model, cache_dir=str(cache), show_progress=False, entropy_column=None, **kwargs)


def test_score_cache_sees_an_edit_anywhere_in_the_weights(tmp_path):
    import torch
    from conftest import tiny_llama

    model, ds = tiny_llama(vocab_size=512), _tokens()
    first = _score(ds, model, tmp_path)
    # One embedding value of a token the rows hold, away from any strided sample of the tensor
    token = ds[1]["input_ids"][5]
    with torch.no_grad():
        model.model.embed_tokens.weight[token, 37] += 5.0
    again = _score(ds, model, tmp_path)
    fresh = _score(ds, model, tmp_path, use_cache=False)
    assert again["token_nll"] == fresh["token_nll"] != first["token_nll"]


@pytest.mark.parametrize("damage", ["empty", "truncated", "short_row", "float64", "row_missing"])
def test_score_cache_entry_that_does_not_fit_its_rows_is_a_miss_and_replaced(tmp_path, damage):
    import numpy as np
    from conftest import tiny_llama

    model, ds = tiny_llama(vocab_size=512), _tokens()
    first = _score(ds, model, tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    good = entry.read_bytes()
    lengths = np.array([len(x) for x in ds["input_ids"]], dtype=np.int64)
    values = np.concatenate([np.asarray(x, dtype=np.float32) for x in first["token_nll"]])
    if damage == "empty":
        entry.write_bytes(b"")
    elif damage == "truncated":
        entry.write_bytes(good[: len(good) // 2])
    else:
        if damage == "short_row":  # the first row 100 NLLs short... of its 20: 10 short, the rest shifted
            lengths, values = np.array([10, *lengths[1:]]), np.concatenate([values[:10], values[20:]])
        elif damage == "float64":
            values = values.astype(np.float64)
        else:
            lengths, values = lengths[:-1], values[: int(lengths[:-1].sum())]
        with open(entry, "wb") as f:
            np.savez(f, lengths=lengths.astype(np.int64), values=values)
    again = _score(ds, model, tmp_path)
    assert again["token_nll"] == first["token_nll"]
    assert [len(x) for x in again["token_nll"]] == [len(x) for x in ds["input_ids"]]
    assert entry.read_bytes() == good  # replaced by a sound entry


def test_eval_cache_identity_sees_an_edit_in_the_middle_of_a_weight_file(tmp_path):
    from conftest import tiny_llama

    from trl_pplmask.evaluation.cache import path_identity

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    weights = folder / "model.safetensors"
    assert weights.stat().st_size > 8 << 20  # larger than the first and last MiB
    before = path_identity(str(folder))
    assert path_identity(str(folder)) == before  # memoised, unchanged
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(4 - i for i in range(4))  # same size
    weights.write_bytes(bytes(data))
    assert path_identity(str(folder)) != before


@pytest.mark.parametrize("damage", ["empty", "truncated", "items_dropped", "other_key", "old_format"])
def test_eval_cache_entry_that_does_not_hold_what_was_saved_is_a_miss(tmp_path, damage):
    import json

    from trl_pplmask.evaluation.cache import ResultCache
    from trl_pplmask.evaluation.results import TaskResult

    cache = ResultCache(tmp_path)
    items = [{"row_id": i, "scores": {"acc": float(i % 2)}} for i in range(4)]
    cache.save("k1", TaskResult(model="m", task="t", metrics={"acc": 0.5}, items=items))
    assert cache.load("k1").items == items
    path = tmp_path / "k1.json"
    entry = json.loads(path.read_text())
    text = {
        "empty": "",
        "truncated": path.read_text()[:40],
        "items_dropped": json.dumps({**entry, "result": {**entry["result"], "items": items[:2]}}),
        "other_key": json.dumps({**entry, "key": "k2"}),
        "old_format": json.dumps(entry["result"]),
    }[damage]
    path.write_text(text)
    assert cache.load("k1") is None


# --------------------------------------------------------------------------------------------------------------------
# One writer per output: build, self-output and sft (score/mask/eval: tests/test_cli_errors.py)
# --------------------------------------------------------------------------------------------------------------------
def _writer_argv(command: str, out: Path, model: Path, data: Path) -> list[str]:
    if command == "sft":
        return sft_argv(out, model, data, "--max_steps", "1", "--save_strategy", "no")
    argv = [command, "--dataset", "gsm8k", "--limit", "2", "--models", str(model), "--output-dir", str(out)]
    if command == "self-output":
        return argv + ["--num-samples", "1", "--max-new-tokens", "4"]
    return argv + ["--no-cache"]


@pytest.mark.parametrize("command", ["build", "self-output", "sft"])
def test_second_writer_into_one_output_is_refused_before_any_work(
    command, tmp_path, tiny_model_dir, gsm8k_dir, monkeypatch, capsys
):
    import os

    import transformers

    from trl_pplmask.utils import OutputLock

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded by the second writer")

    out = tmp_path / "out"
    with OutputLock(out):  # another run writing into `out` (this process stands for it)
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
        assert cli_main(_writer_argv(command, out, tiny_model_dir, gsm8k_dir)) == 2
    err = capsys.readouterr().err
    assert f"PID {os.getpid()}" in err and str(out) in err and "another process" in err, err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging, work or checkpoint folder beside it either


def test_second_study_into_one_output_dir_is_refused_before_any_stage(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import json
    import os

    from trl_pplmask.study import runner
    from trl_pplmask.utils import OutputLock

    def no_stage(*args, **kwargs):
        raise AssertionError("the second study ran a stage")

    monkeypatch.setattr(runner, "prepare_data", no_stage)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 2 + 3? ", "completion": "The answer is 5."}) + "\n")
    root = tmp_path / "study"
    config = {
        "model": str(tiny_model_dir),
        "output_dir": str(root),
        "data": {"task": "gsm8k", "path": str(rows)},
        "arms": ["base", "gt"],
        "training": {"max_steps": 1, "use_cpu": True, "use_peft": False},
        "eval": {"tasks": ["gsm8k_nll"], "target": "gsm8k_nll", "limit": 2},
    }
    (tmp_path / "study.yaml").write_text(json.dumps(config))
    with OutputLock(root, inside=True, what="study output_dir"):  # another study running there
        assert cli_main(["study", "--config", str(tmp_path / "study.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"PID {os.getpid()}" in err and str(root) in err and "another process" in err, err
    assert list(root.iterdir()) == []  # no data, arm or record of the refused study (the lock file went with it)


# --------------------------------------------------------------------------------------------------------------------
# Nothing lost: hand edits of a card
# --------------------------------------------------------------------------------------------------------------------
def test_build_keeps_hand_written_card_text_and_refuses_to_replace_edits_of_the_generated_part(
    tmp_path, tiny_model_dir, data_dir, monkeypatch, capsys
):
    from huggingface_hub import DatasetCard

    from trl_pplmask.hub.card import CARD_END

    out = tmp_path / "gsm8k-pplmasked"
    readme = out / "README.md"

    def build(config: str, *extra: str) -> int:
        argv = ["build", "--dataset", "gsm8k", "--limit", "2", "--models", str(tiny_model_dir), "--no-cache"]
        return cli_main([*argv, "--config-names", config, "--output-dir", str(out), *extra])

    def configs() -> list[str]:
        return [c["config_name"] for c in DatasetCard.load(readme).data.to_dict()["configs"]]

    assert build("a") == 0
    own = "\n## Our notes\n\nHand-written: reviewed by the data team.\n"
    readme.write_text(readme.read_text() + own)  # below the end marker, as the card says
    assert build("b") == 0
    text = readme.read_text()
    assert text.endswith(CARD_END + "\n" + own) and configs() == ["a", "b"]

    # An edit inside the generated part: refused before any model loads, the folder untouched
    edited = text.replace("# gsm8k", "# GSM8K, edited in the generated part", 1)
    assert edited != text
    readme.write_text(edited)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the edited card was reported")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
        assert build("c") == 2
    err = capsys.readouterr().err
    assert str(readme) in err and "generated part" in err and "--overwrite" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # --overwrite replaces the generated part; the text outside the markers is still kept
    assert build("c", "--overwrite") == 0
    text = readme.read_text()
    assert "edited in the generated part" not in text and text.endswith(own) and configs() == ["a", "b", "c"]

    # A card without markers (written by hand) is not replaced either
    readme.write_text("# Our own card\n")
    assert build("c") == 2
    assert "no trl-pplmask card markers" in capsys.readouterr().err
    assert readme.read_text() == "# Our own card\n"


def test_self_output_refuses_to_replace_an_edited_card_unless_overwrite(tmp_path, tiny_model_dir, data_dir, capsys):
    out = tmp_path / "gsm8k-self-output"
    argv = ["self-output", "--dataset", "gsm8k", "--limit", "1", "--models", str(tiny_model_dir), "--output-dir"]
    argv += [str(out), "--num-samples", "1", "--max-new-tokens", "4"]
    assert cli_main(argv) == 0
    readme = out / "README.md"
    readme.write_text(readme.read_text().replace("\n# ", "\n# Edited: ", 1))
    edited = readme.read_text()
    assert cli_main(argv) == 2
    assert str(readme) in capsys.readouterr().err and readme.read_text() == edited
    assert cli_main([*argv, "--overwrite"]) == 0  # the rerun reads the checkpoint: no generation
    assert "# Edited: " not in readme.read_text()


def test_json_safe_gives_strict_json_for_every_record():
    """The one sanitiser of the records the package writes (pplmask_config.json, study files): NaN and infinities
    become null, tuples lists, keys strings, other objects their str; strict JSON accepts the result."""
    import json
    import math
    from pathlib import Path

    from trl_pplmask.utils import json_safe

    record = {"a": math.nan, "b": (1, -math.inf), 3: {"c": Path("x/y"), "d": [True, None, 0.5]}}
    safe = json_safe(record)
    assert safe == {"a": None, "b": [1, None], "3": {"c": "x/y", "d": [True, None, 0.5]}}
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe
