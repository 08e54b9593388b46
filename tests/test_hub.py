"""Hub datasets `<task>-pplmasked`: folder layout, `load_dataset`, the dataset card, adding configs, bad input, push.

The folder is built once per module for the embedded model on the first GSM8K training rows; scores are cached in a
session directory, so `test_recipes.py` rebuilds the same folder without rescoring.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_llama
from datasets import load_dataset
from huggingface_hub import DatasetCard
from testing_utils import CONFIG, LIMIT, build_gsm8k_folder

from trl_pplmask import hub
from trl_pplmask.cli import main as cli_main
from trl_pplmask.masking import IGNORE_INDEX
from trl_pplmask.utils import make_staging_dir


COLUMNS = {
    "prompt",
    "completion",
    "row_id",
    "input_ids",
    "labels",
    "token_nll",
    "trainable_mask",
    "num_completion_tokens",
    "num_masked",
    "masked_fraction",
}


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """`relative path -> (size, sha256)` of every file under `folder`."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def stats_table(card_text: str) -> dict[tuple[str, str], list[str]]:
    """`(config, split) -> cells` of the card's statistics table (the only 9-column table)."""
    rows = {}
    for line in card_text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0].startswith("`"):
            rows[(cells[0].strip("`"), cells[1])] = cells
    return rows


def recompute_stats(rows) -> dict:
    """The card's statistics, recomputed in plain Python from the stored columns."""
    tokens = masked = empty = 0
    ppl = []
    for row in rows:
        trainable = [i for i, m in enumerate(row["trainable_mask"]) if m]
        row_masked = sum(row["labels"][i] == IGNORE_INDEX for i in trainable)
        tokens, masked = tokens + len(trainable), masked + row_masked
        empty += row_masked == len(trainable)
        ppl += [math.exp(row["token_nll"][i]) for i in trainable]
    return {
        "examples": len(rows),
        "tokens": tokens,
        "masked_pct": 100 * masked / tokens if tokens else 0.0,
        "median": float(np.median(ppl)) if ppl else None,
        "p90": float(np.percentile(ppl, 90)) if ppl else None,
        "empty": empty,
    }


def assert_card_matches_parquet(folder: Path) -> None:
    card = DatasetCard.load(folder / "README.md")
    table = stats_table(card.text)
    configs = card.data.to_dict()["configs"]
    for entry in configs:
        for data_files in entry["data_files"]:
            split = data_files["split"]
            rows = load_dataset(str(folder), entry["config_name"], split=split)
            expected = recompute_stats(rows)
            cells = table[(entry["config_name"], split)]
            assert int(cells[3].replace(",", "")) == expected["examples"]
            assert int(cells[4].replace(",", "")) == expected["tokens"]
            assert float(cells[5].rstrip("%")) == pytest.approx(expected["masked_pct"], abs=0.005)
            if expected["median"] is None:
                assert cells[6] == cells[7] == "n/a"
            else:
                assert float(cells[6]) == pytest.approx(expected["median"], abs=5e-4)
                assert float(cells[7]) == pytest.approx(expected["p90"], abs=5e-4)
            assert cells[8].startswith(f"{expected['empty']} kept")
    assert len(table) == sum(len(e["data_files"]) for e in configs)


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_dir) -> Path:
    return build_gsm8k_folder(tmp_path_factory)


def test_build_layout_and_load_dataset(built, tokenizer):
    files = set(snapshot(built))
    assert files == {
        "README.md",
        f"assets/{CONFIG}-ppl-hist.png",
        f"{CONFIG}/build_info.json",
        f"{CONFIG}/train-00000-of-00001.parquet",
    }
    assert (built / "assets" / f"{CONFIG}-ppl-hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    dataset = load_dataset(str(built), CONFIG)
    assert list(dataset) == ["train"]
    train = dataset["train"]
    assert set(train.column_names) == COLUMNS
    assert train["row_id"] == list(range(LIMIT))

    # input_ids are what SFTTrainer produces for these rows and this tokenizer
    from trl_pplmask.data import load_task, tokenize_dataset

    reference = tokenize_dataset(load_task("gsm8k", "train", limit=LIMIT), tokenizer, max_length=1024)
    assert train["input_ids"] == reference["input_ids"]

    for row, ref_labels in zip(train, reference["labels"]):
        trainable = np.asarray(row["trainable_mask"], dtype=bool)
        assert np.array_equal(trainable, np.asarray(ref_labels) != IGNORE_INDEX)
        ppl = np.exp(np.asarray(row["token_nll"], dtype=np.float64))
        expected = np.where(trainable & (ppl <= 2.5), row["input_ids"], IGNORE_INDEX)
        assert row["labels"] == expected.tolist()  # masked at the default threshold, prompt never trained
        assert row["num_completion_tokens"] == int(trainable.sum())
        assert row["num_masked"] == int((trainable & (ppl > 2.5)).sum())
        assert row["masked_fraction"] == pytest.approx(row["num_masked"] / row["num_completion_tokens"])


def test_card_round_trips_lists_configs_and_matches_parquet(built):
    text = (built / "README.md").read_text(encoding="utf-8")
    card = DatasetCard.load(built / "README.md")
    again = DatasetCard(str(card))
    assert again.data.to_dict() == card.data.to_dict() and again.text == card.text

    data = card.data.to_dict()
    assert data["license"] == "mit"  # GSM8K's license, carried over
    assert data["task_categories"] == ["text-generation"] and data["language"] == ["en"]
    assert {"trl", "sft", "perplexity-masking"} <= set(data["tags"])
    assert data["size_categories"] == ["n<1K"] and data["source_datasets"] == ["openai/gsm8k"]
    assert data["pretty_name"]
    assert data["configs"] == [  # the only config is the default: load_dataset(folder) needs no config name
        {"config_name": CONFIG, "data_files": [{"split": "train", "path": f"{CONFIG}/train-*"}], "default": True}
    ]

    # How it was built, usage and citation
    for needle in (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "revision `local`",
        "threshold 2.5",
        f"trl-pplmask {hub.build_versions()['trl-pplmask']}",
        "trl-pplmask build --dataset gsm8k",
        f'load_dataset("trl-pplmask/gsm8k-pplmasked", "{CONFIG}"',
        "trl sft",
        "--dataset_config smollm2-135m-instruct",
        "PplMaskCollator(tokenizer, threshold=5.0)",
        "remove_unused_columns=False",
        "arXiv",
        "2501.14315",
        "Low-Perplexity Token Learning",
    ):
        assert needle in text, needle

    # Image links are relative and resolve inside the folder
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert links == [f"assets/{CONFIG}-ppl-hist.png"]
    for link in links:
        target = (built / link).resolve()
        assert target.is_file() and target.is_relative_to(built.resolve())

    assert_card_matches_parquet(built)


def test_collator_rethresholds_from_token_nll(built, tokenizer):
    from trl_pplmask.collator import PplMaskCollator

    rows = list(load_dataset(str(built), CONFIG, split="train"))
    same = PplMaskCollator(tokenizer, threshold=2.5)(rows)
    higher = PplMaskCollator(tokenizer, threshold=5.0)(rows)
    restored = 0
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert same["labels"][i, :n].tolist() == row["labels"]  # the stored labels, reproduced
        trainable = np.asarray(row["trainable_mask"], dtype=bool)
        ppl = np.exp(np.asarray(row["token_nll"], dtype=np.float64))
        expected = np.where(trainable & (ppl <= 5.0), row["input_ids"], IGNORE_INDEX)
        assert higher["labels"][i, :n].tolist() == expected.tolist()
        restored += int((trainable & (ppl > 2.5) & (ppl <= 5.0)).sum())
    assert restored > 0  # tokens masked at 2.5 came back through trainable_mask


def test_add_second_config_keeps_first_and_unmasked_test_split(built, tiny_model_dir, tmp_path):
    folder = tmp_path / "gsm8k-pplmasked"
    shutil.copytree(built, folder)
    before = snapshot(folder)
    argv = ["build", "--dataset", "gsm8k", "--limit", "3", "--splits", "train", "test", "--output-dir", str(folder)]
    argv += ["--models", str(tiny_model_dir), "--config-names", "tiny-llama", "--no-cache"]
    assert cli_main(argv) == 0

    after = snapshot(folder)
    for path, digest in before.items():
        if path != "README.md":
            assert after[path] == digest, f"{path} of the first config changed"
    assert set(after) - set(before) == {
        "assets/tiny-llama-ppl-hist.png",
        "tiny-llama/build_info.json",
        "tiny-llama/train-00000-of-00001.parquet",
        "tiny-llama/test-00000-of-00001.parquet",
    }
    card = DatasetCard.load(folder / "README.md")
    assert [c["config_name"] for c in card.data.to_dict()["configs"]] == [CONFIG, "tiny-llama"]
    assert load_dataset(str(folder), CONFIG)["train"].num_rows == LIMIT
    tiny = load_dataset(str(folder), "tiny-llama")
    assert {s: tiny[s].num_rows for s in tiny} == {"train": 3, "test": 3}

    # The test split is left unmasked: labels are every completion token, and the card says so
    for row in tiny["test"]:
        trainable = np.asarray(row["trainable_mask"], dtype=bool)
        assert row["labels"] == np.where(trainable, row["input_ids"], IGNORE_INDEX).tolist()
        assert row["num_masked"] == 0
    assert "test split is **left unmasked**" in card.text
    assert "| `tiny-llama` | test | `none` |" in card.text
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", card.text)
    assert sorted(links) == [f"assets/{CONFIG}-ppl-hist.png", "assets/tiny-llama-ppl-hist.png"]
    assert_card_matches_parquet(folder)
    info = json.loads((folder / "tiny-llama" / "build_info.json").read_text())
    assert info["revision"] == "local" and info["splits"]["test"]["strategy"] == "none"

    # A config name is optional; the first built stays the default when configs are added, the card says so
    assert [c.get("default", False) for c in card.data.to_dict()["configs"]] == [True, False]
    assert load_dataset(str(folder), split="train").num_rows == LIMIT
    assert f"loads the default config,\n`{CONFIG}`" in card.text
    assert cli_main([*argv[:-1], "--default-config", "tiny-llama", "--no-cache"]) == 0  # chosen: kept from then on
    assert cli_main([*argv[:-1], "--no-cache"]) == 0
    card = DatasetCard.load(folder / "README.md")
    assert [c.get("default", False) for c in card.data.to_dict()["configs"]] == [False, True]
    assert load_dataset(str(folder), split="train").num_rows == 3


def _bigram_model_dir(tokenizer, path: Path, token_id: int) -> Path:
    """A tiny Llama that predicts `token_id` after `token_id` with probability ~1 and everything else at random:
    a completion repeating that token keeps trainable tokens, any other completion is masked entirely."""
    model = tiny_llama()
    with torch.no_grad():
        direction = torch.zeros(model.config.hidden_size)
        direction[0] = 50.0  # dominates the residual stream, so the final norm maps it to a fixed direction
        model.model.embed_tokens.weight[token_id] = direction
        model.lm_head.weight[token_id] = direction
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("drop_empty", [False, True])
def test_examples_without_trainable_token_are_counted_kept_or_dropped(tokenizer, tmp_path, drop_empty):
    token_id = tokenizer(" the the the", add_special_tokens=False)["input_ids"][-1]
    model_dir = _bigram_model_dir(tokenizer, tmp_path / "bigram", token_id)
    data = tmp_path / "toy.jsonl"
    rows = [
        ("Repeat 'the' eight times.", " the the the the the the the the"),
        ("What is the capital of France?", "Paris is its capital."),
    ]
    with open(data, "w") as f:
        for user, assistant in rows:
            example = {"prompt": [{"role": "user", "content": user}]}
            example["completion"] = [{"role": "assistant", "content": assistant}]
            f.write(json.dumps(example) + "\n")
    folder = tmp_path / "toy-pplmasked"
    config = hub.BuildConfig(
        dataset=str(data), models=[str(model_dir)], config_names=["bigram"], output_dir=str(folder),
        drop_empty=drop_empty, license="cc0-1.0", use_cache=False,
    )  # fmt: skip
    hub.build_pplmasked(config)

    train = load_dataset(str(folder), "bigram", split="train")
    info = json.loads((folder / "bigram" / "build_info.json").read_text())["splits"]["train"]
    cells = stats_table(DatasetCard.load(folder / "README.md").text)[("bigram", "train")]
    if drop_empty:
        # Dropping every example of a split is refused, before anything is written
        alone = tmp_path / "alone.jsonl"
        alone.write_text(data.read_text().splitlines()[1] + "\n")
        config.dataset, config.output_dir = str(alone), str(tmp_path / "alone-pplmasked")
        with pytest.raises(ValueError, match="Config 'bigram', split 'train': Every example"):
            hub.build_pplmasked(config)
        assert not (tmp_path / "alone-pplmasked").exists()
        assert train["row_id"] == [0]
        assert info["examples_dropped_empty"] == 1 and info["stats"]["examples_without_trainable_token"] == 0
        assert cells[8] == "0 kept, 1 dropped"
    else:
        assert train["row_id"] == [0, 1]
        assert [r["num_completion_tokens"] - r["num_masked"] > 0 for r in train] == [True, False]
        assert info["stats"]["examples_without_trainable_token"] == 1
        assert cells[8] == "1 kept"
    assert DatasetCard.load(folder / "README.md").data.license == "cc0-1.0"
    assert_card_matches_parquet(folder)


# ------------------------------------------------------------------------------------------------------------------
# Bad input: an error naming the row or setting, before anything is written
# ------------------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def no_template_model_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "no-template"
    tiny_llama().save_pretrained(path)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    plain.save_pretrained(path)
    for template in path.glob("chat_template*"):
        template.unlink()
    return path


def test_bad_input_errors_name_the_problem(tmp_path, capsys, no_template_model_dir, data_dir):
    out = tmp_path / "out"
    good_pc = {"prompt": "2+2=", "completion": "4"}

    def fails(argv: list[str], *needles: str) -> None:
        assert cli_main(["build", "--output-dir", str(out), "--no-cache", *argv]) == 2
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (needle, err)
        assert not out.exists(), "nothing may be written on bad input"

    fails(["--dataset", "gsm8k", "--threshold", "1.0"], "threshold=1.0")
    fails(["--dataset", "gsm8k", "--threshold", "0.5"], "threshold=0.5")

    missing = _write_jsonl(tmp_path / "missing.jsonl", [good_pc, good_pc, {"prompt": "3+3="}])
    fails(["--dataset", str(missing)], "row 2", "'completion'")
    blank = _write_jsonl(tmp_path / "blank.jsonl", [good_pc, {"prompt": "", "completion": "x"}])
    fails(["--dataset", str(blank)], "row 1", "'prompt' is missing or empty")
    broken = _write_jsonl(
        tmp_path / "broken.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
        ],
    )
    fails(["--dataset", str(broken)], "row 1", "message 1", "'role'/'content'")
    fails(["--dataset", str(missing), "--format", "messages"], "format 'messages'", "missing ['messages']")
    fails(["--dataset", "gsm8k", "--limit", "2", "--models", str(no_template_model_dir)], "no chat template")

    empty = tmp_path / "empty.parquet"
    from datasets import Dataset

    Dataset.from_dict({"prompt": [], "completion": []}).to_parquet(str(empty))
    fails(["--dataset", str(empty)], "Split 'train'", "is empty")
    (tmp_path / "empty.jsonl").write_text("")
    fails(["--dataset", str(tmp_path / "empty.jsonl")], "Split 'train'", "is empty")
    fails(["--dataset", str(missing), "--splits", "train", "test"], "single split")
    fails(["--dataset", "gsm8k", "--models", "a/m", "b/m"], "config name(s) ['m']")


def test_a_source_file_named_relatively_is_the_file_an_earlier_build_named_absolutely(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Adding a config to a folder built from `/abs/rows.jsonl` with `--dataset rows.jsonl` (the same file, named from
    its folder) adds it; another file is still refused as another dataset."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i} + 1 = ", "completion": f"{i + 1}."}) + "\n" for i in range(3)))
    folder = tmp_path / "rows-pplmasked"
    argv = ["--models", str(tiny_model_dir), "--output-dir", str(folder), "--no-cache"]
    assert cli_main(["build", "--dataset", str(rows), *argv, "--config-names", "first"]) == 0
    monkeypatch.chdir(tmp_path)
    assert cli_main(["build", "--dataset", "rows.jsonl", *argv, "--config-names", "second"]) == 0
    assert {"first", "second"} <= {p.name for p in folder.iterdir()}

    other = tmp_path / "other.jsonl"
    other.write_bytes(rows.read_bytes())
    assert cli_main(["build", "--dataset", "other.jsonl", *argv, "--config-names", "third"]) == 2
    assert not (folder / "third").exists()


def test_failed_build_leaves_existing_folder_untouched(built, tmp_path, capsys, no_template_model_dir):
    folder = tmp_path / "gsm8k-pplmasked"
    shutil.copytree(built, folder)
    before = snapshot(folder)
    argv = ["build", "--dataset", "gsm8k", "--limit", "2", "--output-dir", str(folder)]
    assert cli_main([*argv, "--models", str(no_template_model_dir)]) == 2
    assert cli_main([*argv[:2], "mbpp", *argv[3:]]) == 2  # another source dataset: a folder is one repo
    err = capsys.readouterr().err
    assert "no chat template" in err and "built from 'gsm8k'" in err
    assert snapshot(folder) == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no staging left behind"


# ------------------------------------------------------------------------------------------------------------------
# Publishing (never reaches the real Hub: dry run, no token, a closed port and a local server that rejects commits)
# ------------------------------------------------------------------------------------------------------------------


def test_dry_run_lists_exactly_the_files_of_the_folder(built, capsys):
    before = snapshot(built)
    assert cli_main(["push", str(built), "--dry-run"]) == 0  # repo id: the one the folder was built for
    out = capsys.readouterr().out
    listed = {}
    for line in out.splitlines()[1:]:
        size, path = line.split()
        listed[path] = int(size.replace(",", ""))
    assert listed == {path: size for path, (size, _) in before.items()}
    assert "trl-pplmask/gsm8k-pplmasked" in out.splitlines()[0]
    assert snapshot(built) == before


class _RejectingHub(BaseHTTPRequestHandler):
    """Accepts `create_repo`, rejects everything else with 403, like a Hub refusing a commit."""

    def _answer(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status >= 400:
            self.send_header("X-Error-Message", body["error"])
        self.end_headers()
        self.wfile.write(payload)

    def _handle(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "POST" and self.path.startswith("/api/repos/create"):
            host, port = self.server.server_address[:2]
            self._answer(200, {"url": f"http://{host}:{port}/datasets/test-org/rejected", "name": "test-org/rejected"})
        else:
            self._answer(403, {"error": "Commit rejected by the local test server"})

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    def log_message(self, *args) -> None:
        pass


def _push_subprocess(folder: Path, tmp_path: Path, endpoint: str, token: str | None) -> subprocess.CompletedProcess:
    # A fresh process, so that huggingface_hub reads HF_ENDPOINT/HF_HOME at import; only localhost is ever contacted
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0")
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    if token is not None:
        env["HF_TOKEN"] = token
    command = [sys.executable, str(REPO / "hub_scripts" / "push.py"), str(folder), "--repo-id", "test-org/rejected"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_push_failures_end_with_a_clear_message_and_leave_the_folder(built, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hf_constants

    before = snapshot(built)
    # In-process: no token anywhere (environment and token files), and a Hub that refuses commits on localhost
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    assert cli_main(["push", str(built), "--repo-id", "test-org/rejected"]) == 1
    err = capsys.readouterr().err
    assert "No Hugging Face token found" in err and "hf auth login" in err

    server = ThreadingHTTPServer(("127.0.0.1", 0), _RejectingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        argv = ["push", str(built), "--repo-id", "test-org/rejected", "--token", "hf_fake_token_for_tests"]
        assert cli_main(argv) == 1
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert "Push to test-org/rejected failed while uploading" in err and "may not write" in err

    # A fresh process through the hub_scripts wrapper, configured by the environment alone: nothing listens on port 9
    no_network = _push_subprocess(built, tmp_path, "http://127.0.0.1:9", token="hf_fake_token_for_tests")
    assert no_network.returncode == 1, no_network.stderr
    assert "could not reach http://127.0.0.1:9" in no_network.stderr and "Traceback" not in no_network.stderr

    assert snapshot(built) == before


def test_push_refuses_a_folder_that_was_not_built(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(ValueError, match="not a built pplmasked folder"):
        hub.push_folder(tmp_path / "random", "org/name", dry_run=True)


def test_command_line_is_recorded_with_every_setting(built):
    info = json.loads((built / CONFIG / "build_info.json").read_text())
    command = info["command"]
    assert command.startswith("trl-pplmask build --dataset gsm8k")
    for part in ("--threshold 2.5", f"--limit {LIMIT}", "--splits train", "--max-length 1024", "--models"):
        assert part in command
    assert info["versions"]["trl-pplmask"] == hub.build_versions()["trl-pplmask"]


def test_local_constants_match_the_library():
    from trl_pplmask import data, models

    assert hub.EMBEDDED_MODEL_ALIAS == models.EMBEDDED_MODEL_ALIAS
    assert hub.ROW_ID_COLUMN == data.ROW_ID_COLUMN


def test_shards_are_split_by_size_and_load_back_in_order(tmp_path):
    from datasets import Dataset

    dataset = Dataset.from_dict({"row_id": list(range(100)), "token_nll": [[0.5] * 50 for _ in range(100)]})
    names = hub.write_parquet_shards(dataset, tmp_path, "train", max_shard_size=dataset.data.nbytes // 3)
    assert names == [f"train-0000{i}-of-00004.parquet" for i in range(4)]
    loaded = load_dataset("parquet", data_files=str(tmp_path / "train-*"), split="train")
    assert loaded["row_id"][:] == list(range(100))


def test_hub_scripts_are_thin_wrappers_of_the_cli(capsys):
    import importlib.util

    def script(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "hub_scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    assert script("build_pplmasked").main(["--dataset", "gsm8k", "--threshold", "1"]) == 2
    assert "python hub_scripts/build_pplmasked.py: error: threshold=1.0" in capsys.readouterr().err
    assert script("push").main([str(REPO / "does-not-exist"), "--dry-run"]) == 2
    assert "build it first" in capsys.readouterr().err


def test_hub_commit_reads_the_snapshot_of_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot_dir = tmp_path / "models--org--model" / "snapshots" / commit
    snapshot_dir.mkdir(parents=True)
    (snapshot_dir / "config.json").write_text("{}")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub.hub_commit("org/model") == commit
    assert hub.hub_commit("org/absent") is None


def test_build_refuses_a_folder_of_another_kind(tmp_path, capsys):
    folder = tmp_path / "gsm8k-self-output"
    (folder / "some-model").mkdir(parents=True)
    (folder / "some-model" / "build_info.json").write_text(json.dumps({"kind": "self-output", "source": {}}))
    before = snapshot(folder)
    assert cli_main(["build", "--dataset", "gsm8k", "--limit", "2", "--output-dir", str(folder)]) == 2
    assert "of kind 'self-output', not perplexity-masked data" in capsys.readouterr().err
    assert snapshot(folder) == before


def test_staging_of_a_dead_build_is_removed_and_a_live_ones_kept(tmp_path):
    """A build killed before its cleanup (SIGKILL) leaves `.NAME-staging-<pid>-*`; the next build removes it."""
    output = tmp_path / "gsm8k-pplmasked"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".{output.name}-staging-{dead.stdout.strip()}-abc"
    live = tmp_path / f".{output.name}-staging-{os.getppid()}-def"  # a build still running (our parent)
    other = tmp_path / f".other-staging-{dead.stdout.strip()}-ghi"
    for folder in (left, live, other):
        (folder / "cfg").mkdir(parents=True)
    staging = make_staging_dir(output)
    assert staging.is_dir() and f"-staging-{os.getpid()}-" in staging.name
    assert not left.exists() and live.exists() and other.exists()


def test_sigterm_during_build_leaves_no_staging_folder(tmp_path, tiny_model_dir):
    """SIGTERM ends `build` through its cleanup, as SIGINT does: no staging folder, no output, exit status 143; what
    is left is the resumable work folder (finished shards), which a rerun resumes (tests/test_kill_rerun.py)."""
    import signal
    import time

    rows = [{"prompt": f"What is {i} + {i}? " * 8, "completion": f"{i} + {i} = {2 * i}. " * 8} for i in range(400)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    argv = ["build", "--dataset", str(data), "--models", str(tiny_model_dir), "--output-dir", str(output)]
    argv += ["--no-cache"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "trl_pplmask.cli", *argv], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    work = tmp_path / ".out-pplmask-work"
    while not work.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert work.exists(), "the build never staged (or finished first)"
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert not list(tmp_path.glob(".out-staging-*")) and not output.exists()
    assert not list(work.rglob(".*.tmp")), "a half-written shard was left"
