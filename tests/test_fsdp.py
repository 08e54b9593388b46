"""`trl-pplmask sft` with sharded parameters (trl_pplmask.sharding): FSDP2 on 2 CPU processes (gloo) for every route
that is claimed to work, against one process; and the refusals, before anything is loaded, of the combinations that
would read a sharded model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
from testing_utils import require_deepspeed

from trl_pplmask.sft import PplMaskArguments
from trl_pplmask.sharding import ParameterSharding, check_sharded_training, detect_sharding


HELPER = Path(__file__).resolve().parent / "_accelerate_fsdp.py"
ROUTES = ("prescore", "frozen", "columns", "prescore_peft", "reference_peft")
FSDP2 = ParameterSharding("fsdp", 2)


def test_detect_sharding_from_the_launch_and_the_training_arguments(tmp_path):
    none = SimpleNamespace(fsdp=None, fsdp_config={}, deepspeed=None)
    assert detect_sharding(none, {}) == ParameterSharding()
    assert not detect_sharding(none, {}).sharded
    launched = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    assert detect_sharding(none, launched) == ParameterSharding("fsdp", 2, cpu_ram_efficient_loading=True)
    assert detect_sharding(none, {"ACCELERATE_USE_FSDP": "1"}) == ParameterSharding("fsdp", 1)
    args = SimpleNamespace(fsdp="full_shard auto_wrap", fsdp_config={"version": 2}, deepspeed=None)
    assert detect_sharding(args, {}).name == "FSDP2" and detect_sharding(args, {}).sharded
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    zero3 = SimpleNamespace(fsdp=None, fsdp_config={}, deepspeed=str(ds))
    assert detect_sharding(zero3, {}).name == "DeepSpeed ZeRO-3"
    zero2 = SimpleNamespace(fsdp=None, fsdp_config={}, deepspeed={"zero_optimization": {"stage": 2}})
    assert detect_sharding(zero2, {}) == ParameterSharding("deepspeed", 2) and not detect_sharding(zero2, {}).sharded
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert detect_sharding(none, env).sharded
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}
    assert detect_sharding(none, env) == ParameterSharding("deepspeed", 3)


def _args(**kwargs) -> PplMaskArguments:
    return PplMaskArguments(**kwargs)


def test_what_runs_under_sharding_and_what_is_refused_before_loading():
    raw, scored = ["messages"], ["input_ids", "labels", "token_nll", "token_entropy"]
    allowed = [
        (FSDP2, _args(), False, scored),  # the mask from the dataset's columns: no model read
        (FSDP2, _args(pplmask_prescore=True), False, raw),  # scored before the model is sharded
        (FSDP2, _args(pplmask_prescore=True), True, raw),  # PEFT: the adapter-disabled model, before sharding
        (FSDP2, _args(), False, raw),  # on the fly by the frozen copy of the base
        (FSDP2, _args(pplmask_reference="some/model"), True, raw),  # on the fly by another frozen model
        (FSDP2, _args(pplmask_strategy="none"), True, raw),  # plain SFT
        (ParameterSharding("deepspeed", 3), _args(), True, scored),
        (ParameterSharding("deepspeed", 2), _args(pplmask_anchor=True), True, raw),  # ZeRO-2: weights whole
        (ParameterSharding(), _args(pplmask_anchor=True), True, raw),
    ]
    for sharding, args, peft, columns in allowed:
        check_sharded_training(sharding, args, peft, columns)

    refused = [
        (FSDP2, _args(), True, raw, "adapter disabled, and that model is the sharded one.*pplmask_prescore=true"),
        (FSDP2, _args(pplmask_anchor=True, pplmask_prescore=True), True, raw, "pplmask_anchor=true applies"),
        (FSDP2, _args(pplmask_anchor=True), False, scored, "pplmask_anchor=true applies"),
        (ParameterSharding("deepspeed", 3), _args(pplmask_prescore=True), True, raw, "ZeRO-3 partitions"),
        (ParameterSharding("deepspeed", 3), _args(), False, raw, "ZeRO-3 partitions"),
        (ParameterSharding("fsdp", 2, True), _args(pplmask_prescore=True), False, raw, "cpu_ram_efficient_loading"),
        (ParameterSharding("fsdp", 1, True), _args(), False, raw, "only the first process loads"),
        (FSDP2, _args(pplmask_strategy="stm_entropy"), True, ["input_ids", "labels", "token_nll"], "sharded one"),
    ]
    if "pplmask_loss" in {f for f in PplMaskArguments.__dataclass_fields__}:
        refused.append((FSDP2, _args(pplmask_loss="eaft"), False, scored, "pplmask_loss=eaft applies"))
    for sharding, args, peft, columns, message in refused:
        with pytest.raises(ValueError, match=message) as error:
            check_sharded_training(sharding, args, peft, columns)
        # Every refusal names the route that works
        assert "trl-pplmask score --layout shards" in str(error.value) and "stock `trl sft`" in str(error.value)


def test_sft_refuses_before_loading_the_model(tmp_path, monkeypatch, tiny_model_dir, data_dir):
    """Through `trl-pplmask sft`'s own flow: an FSDP2 launch's environment, PEFT scoring on the fly."""
    from trl_pplmask import sft
    from trl_pplmask.data import load_task

    data = tmp_path / "data"
    load_task("gsm8k", "train", limit=4).save_to_disk(str(data))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(tmp_path)]
    argv += ["--use_peft", "--report_to", "none", "--use_cpu"]
    with pytest.raises(ValueError, match="under FSDP2 .*sharded one"):
        sft.build_trainer(*sft.parse_args(argv))
    assert not any(tmp_path.glob("checkpoint-*"))


def _env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(TRL_PPLMASK_CACHE=str(cache / "pplmask"), HF_DATASETS_CACHE=str(cache / "datasets"))
    return env


def _run(command: list[str], env: dict[str, str], what: str) -> None:
    # A new session, so that on a timeout (processes stuck in mismatched collectives) the workers go too
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)  # 1 min alone; 7.5 min seen on a loaded 2-core VM
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{what} did not finish in 900 s\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"{what}:\n{stdout[-2000:]}\n{stderr[-4000:]}"


@pytest.fixture(scope="module")
def fsdp_inputs(tmp_path_factory, tiny_model_dir, data_dir) -> Path:
    """8 GSM8K rows (two global batches of 4) in `raw`, the same rows scored by `trl-pplmask score` in `scored` (route
    `columns`), the tiny model in `model`."""
    from trl_pplmask.data import load_task

    root = tmp_path_factory.mktemp("fsdp")
    (root / "model").symlink_to(tiny_model_dir)
    load_task("gsm8k", "train", limit=8).save_to_disk(str(root / "raw"))
    argv = [sys.executable, "-m", "trl_pplmask.cli", "score", "--dataset", str(root / "raw"), "--model"]
    argv += [str(tiny_model_dir), "--output-dir", str(root / "scored"), "--max-length", "256"]
    _run(argv, _env(root / "c0"), "trl-pplmask score")
    return root


def _helper_args(inputs: Path, routes: Sequence[str]) -> list[str]:
    return [str(inputs / "model"), str(inputs / "raw"), str(inputs / "scored"), ",".join(routes)]


@pytest.fixture(scope="module")
def fsdp_runs(fsdp_inputs) -> Path:
    """Every route in one process, then under one 2-process FSDP2 launch."""
    root = fsdp_inputs
    args = _helper_args(root, ROUTES)
    _run([sys.executable, str(HELPER), str(root / "one"), *args], _env(root / "c1"), "the one-process runs")
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--use_fsdp", "--fsdp_version", "2"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", "0", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
    launch += ["--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"]
    launch += ["--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "false"]
    _run([*launch, str(HELPER), str(root / "two"), *args], _env(root / "c2"), "the FSDP2 launch")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("route", ROUTES)
def test_fsdp2_on_two_processes_trains_what_one_process_trains(fsdp_runs, route):
    one = json.loads((fsdp_runs / "one" / route / "rank0.json").read_text())
    two = [json.loads((fsdp_runs / "two" / route / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert one["num_processes"] == 1 and all(r["num_processes"] == 2 for r in two)
    for result in two:  # the parameters really were sharded while training: half of them on each process
        assert len(result["sharding"]) == 2
        for step in result["sharding"]:
            assert step["fsdp_module"] and step["all_dtensor"] and 0.4 < step["local_fraction"] < 0.6, step
    assert not any(step["all_dtensor"] for step in one["sharding"])

    # The same rows, masked alike: every row's labels as one process masked them
    def by_row(rows):
        return {json.dumps(r["input_ids"]): r["labels"] for r in rows}

    expected = by_row(one["rows"])
    assert len(two[0]["rows"]) == len(two[1]["rows"]) == 4 and by_row(two[0]["rows"] + two[1]["rows"]) == expected
    masked = [r["mask_stats"]["masked_tokens"] for r in (one, *two)]
    assert masked[0] > 0 and masked[1] + masked[2] == masked[0]  # the mask is active, and split, not repeated
    # The same loss at both steps: the second one after an optimizer step on sharded weights
    for result in two:
        assert result["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    if route.startswith("prescore"):  # split across the training processes: shard i on process i % 2
        assert sorted(one["prescored_shards"]) == [0, 1, 2, 3]
        assert two[0]["prescored_shards"] == [0, 2] and two[1]["prescored_shards"] == [1, 3]


@pytest.mark.slow
@require_deepspeed
def test_deepspeed_zero3_on_two_processes_trains_from_scored_columns(tmp_path, fsdp_inputs):
    """ZeRO-3 (DeepSpeed's CPU accelerator, gloo) on the one route it is not refused on: the mask from the dataset's
    columns. Needs `pip install deepspeed` (not part of `make install`); skipped without it."""
    args = _helper_args(fsdp_inputs, ["columns"])
    _run([sys.executable, str(HELPER), str(tmp_path / "one"), *args], _env(tmp_path / "c1"), "the one-process run")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3"]
    launch += ["--zero3_init_flag", "true", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", "0", str(HELPER), str(tmp_path / "ds")]
    _run([*launch, *args], _env(tmp_path / "c2"), "the ZeRO-3 launch")
    one = json.loads((tmp_path / "one" / "columns" / "rank0.json").read_text())
    two = [json.loads((tmp_path / "ds" / "columns" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in two:  # partitioned while training: no process holds a whole parameter
        assert result["num_processes"] == 2
        for step in result["sharding"]:
            assert step["zero3_partitioned"] and 0.4 < step["local_fraction"] < 0.6, step
        assert result["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    rows = {json.dumps(r["input_ids"]): r["labels"] for r in two[0]["rows"] + two[1]["rows"]}
    assert rows == {json.dumps(r["input_ids"]): r["labels"] for r in one["rows"]}
