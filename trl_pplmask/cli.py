"""The `trl-pplmask` command: score, mask, demo (and the Hub/data pipelines when installed)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .masking import IGNORE_INDEX, STRATEGIES, TRAINABLE_COLUMN, PplMaskConfig, trainable_positions
from .utils import make_staging_dir


DEFAULT_MODEL = "smollm2-135m-instruct"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local path or the embedded alias (default).")
    parser.add_argument("--adapter", help="PEFT adapter (Hub id or path) loaded on top of --model.")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16.")


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        help="Task name (gsm8k, mbpp, math, arc_challenge, humaneval), saved dataset folder, .jsonl/.parquet file, "
        "or Hub dataset id.",
    )
    parser.add_argument("--dataset-config", help="Config of a Hub dataset.")
    parser.add_argument("--split", default="train", help="Split to use (default: train).")
    parser.add_argument("--limit", type=int, help="Use only the first N rows.")


def _add_mask_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strategy",
        default="threshold",
        choices=STRATEGIES,
        help="How tokens are chosen for masking: threshold (the paper's STM: perplexity above --threshold), fraction "
        "(the --fraction highest-perplexity tokens), and the baselines and variants listed (default: threshold).",
    )
    parser.add_argument("--threshold", type=float, default=2.5, help="Perplexity threshold (paper: 2.5).")
    parser.add_argument("--fraction", type=float, help="Fraction of completion tokens to mask (strategy fraction).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of strategy random.")
    parser.add_argument("--dpf-nll-column", default="token_nll_dpf", help="NLLs under a first fine-tuned model.")
    parser.add_argument(
        "--entropy-threshold", type=float, default=1.0, help="Entropy bound in nats of strategy stm_entropy."
    )
    parser.add_argument("--drop-empty", action="store_true", help="Drop examples left with no trainable token.")


def _mask_config(args: argparse.Namespace) -> PplMaskConfig:
    return PplMaskConfig(
        strategy=args.strategy,
        threshold=args.threshold,
        fraction=args.fraction,
        seed=args.seed,
        dpf_nll_column=args.dpf_nll_column,
        entropy_threshold=args.entropy_threshold,
    )


def _score(args: argparse.Namespace, dataset):
    from .data import ROW_ID_COLUMN, tokenize_dataset
    from .models import load_model, load_tokenizer
    from .scoring import ScoringConfig, distributed_state, score_dataset

    config = ScoringConfig(
        max_tokens_per_batch=args.max_tokens_per_batch,
        score_all_tokens=args.score_all_tokens,
        disable_adapter=args.disable_adapter,
        output_column=args.output_column,
    )
    pretokenized = "input_ids" in dataset.column_names
    if pretokenized:
        _check_pretokenized(dataset, args.max_length)
        tokenized = dataset
    else:
        _check_assistant_turns(dataset)
        # Tokenize (cheap) before loading the model, so that truncation problems are reported first
        tokenized = tokenize_dataset(dataset, load_tokenizer(args.model), max_length=args.max_length)
        dropped = len(dataset) - len(tokenized)
        if dropped == len(dataset):
            raise ValueError(
                f"All {len(dataset)} rows were dropped when truncating to --max-length {args.max_length} (no "
                "trainable token left within it). Raise --max-length to the SFTConfig.max_length used for training."
            )
        if dropped:
            kept = set(tokenized[ROW_ID_COLUMN]) if ROW_ID_COLUMN in tokenized.column_names else set()
            lost = [i for i in range(len(dataset)) if i not in kept][:10]
            print(
                f"trl-pplmask score: warning: {dropped} of {len(dataset)} rows dropped by truncation to --max-length "
                f"{args.max_length} (no trainable token left; row ids {lost}{'...' if dropped > len(lost) else ''}).",
                file=sys.stderr,
            )
    state = distributed_state()
    model, tokenizer = load_model(args.model, adapter=args.adapter, dtype=args.dtype, device=state.device)
    if not (pretokenized and TRAINABLE_COLUMN in dataset.column_names):
        return score_dataset(tokenized, model, tokenizer, config), tokenizer
    # A masked dataset (`build`, `mask`): its labels hide the tokens masked by perplexity. Score every token SFT
    # trains on before masking (`trainable_mask`), as for the unmasked data, and keep the labels as they are.
    restored = [
        np.where(np.asarray(mask, dtype=bool), np.asarray(ids), IGNORE_INDEX).tolist()
        for ids, mask in zip(dataset["input_ids"], dataset[TRAINABLE_COLUMN])
    ]
    view = dataset.select_columns(["input_ids"]).add_column("labels", restored)
    scored = score_dataset(view, model, tokenizer, config)
    for column in (config.output_column, config.entropy_column):
        if column is not None:
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
            dataset = dataset.add_column(column, scored[column], feature=scored.features[column])
    return dataset, tokenizer


# Columns that `score` must never overwrite with NLLs: what training reads, and what `mask` writes
_PROTECTED_COLUMNS = (
    "input_ids",
    "labels",
    "attention_mask",
    "position_ids",
    "completion_mask",
    "assistant_masks",
    TRAINABLE_COLUMN,
    "row_id",
    "num_completion_tokens",
    "num_masked",
    "masked_fraction",
)


def _check_output_column(name: str, dataset=None) -> None:
    problem = None
    if not name or not name.strip():
        problem = "is empty"
    elif name in _PROTECTED_COLUMNS:
        problem = "is a column that training or `mask` reads"
    elif dataset is not None and name in dataset.column_names:
        feature = dataset.features[name]
        inner = getattr(feature, "feature", None)
        if getattr(inner, "dtype", None) not in ("float32", "float64"):
            problem = f"is an existing column of the dataset ({feature})"
    if problem:
        raise ValueError(
            f"--output-column {name!r} {problem}; writing NLLs there would destroy it. Use another name, e.g. the "
            "default `token_nll` (or `token_nll_dpf` for DPF's fine-tuned model)."
        )


def _check_pretokenized(dataset, max_length: int) -> None:
    """A dataset that already has `input_ids` is scored as it is: it must agree with --max-length and itself."""
    _check_aligned(dataset, [c for c in ("labels", TRAINABLE_COLUMN) if c in dataset.column_names])
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest = max(lengths, default=0)
    if longest > max_length:
        row = lengths.index(longest)
        raise ValueError(
            f"Row {row} already has {longest} tokens, more than --max-length {max_length}. The dataset is "
            "tokenized, so `score` does not truncate it; SFT would, and the NLLs would no longer match. Pass "
            f"--max-length {longest} or more (the SFTConfig.max_length used for training), or score the raw data."
        )


def _check_assistant_turns(dataset) -> None:
    """Conversational rows whose assistant turns are all empty have nothing to train on (like an empty completion)."""
    for column in ("messages", "completion", "conversations"):
        if column not in dataset.column_names:
            continue
        for row, turns in enumerate(dataset[column]):
            if not isinstance(turns, list):
                continue
            for turn in turns:
                if not isinstance(turn, dict):
                    continue
                role = turn.get("role", turn.get("from"))
                content = turn.get("content", turn.get("value"))
                if role in ("assistant", "gpt") and (content is None or not str(content).strip()):
                    raise ValueError(
                        f"Row {row}: column {column!r} has an empty assistant turn; there is nothing to score or "
                        "train on there. Fix or drop that row."
                    )


def _check_positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value}.")


def _check_output_folder(output: str, overwrite: bool, source: str | None = None) -> Path:
    """Refuse an output that is a file, a non-empty folder (without --overwrite), or overlaps the input."""
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {output} is a file; give a folder path (new, or empty).")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(
            f"--output {output} is not empty. Choose a new or empty folder, or pass --overwrite to replace it (the "
            "new dataset is written beside it first and swapped in only once complete)."
        )
    if source is not None and Path(source).expanduser().exists():
        source_path, resolved = Path(source).expanduser().resolve(), path.resolve()
        if source_path == resolved or resolved in source_path.parents or source_path in resolved.parents:
            raise ValueError(
                f"--output {output} overlaps the input {source}; writing there would change or delete the input. "
                "Choose a folder outside it."
            )
    return path


def _save_atomically(dataset, output: Path) -> None:
    """`save_to_disk` into a staging folder beside `output`, then swap it in: a crash never leaves a partial output."""
    import shutil
    import tempfile

    staging = make_staging_dir(output)  # also removes those of runs that were killed
    try:
        dataset.save_to_disk(str(staging / "dataset"))
        if output.exists() and any(output.iterdir()):
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}-old-{os.getpid()}-", dir=output.parent))
            os.replace(output, trash / "old")
            os.replace(staging / "dataset", output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            if output.exists():
                output.rmdir()  # empty
            os.replace(staging / "dataset", output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _no_cache_beside_input():
    """Maps write their results to a temporary folder, never as cache-*.arrow files into the input's folder."""
    import datasets

    enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_caching()


def _load_input(spec: str, split: str, config: str | None = None, limit: int | None = None):
    from .data import load_any_dataset

    dataset = load_any_dataset(spec, split, config, limit)
    if len(dataset) == 0:
        raise ValueError(f"{spec} (split {split!r}) has no rows; there is nothing to process.")
    return dataset


def cmd_score(args: argparse.Namespace) -> int:
    from .models import check_model_path
    from .scoring import distributed_state

    _check_positive("--max-length", args.max_length)
    _check_positive("--max-tokens-per-batch", args.max_tokens_per_batch)
    _check_positive("--limit", args.limit)
    _check_output_column(args.output_column)
    check_model_path(args.model)
    if args.adapter:
        check_model_path(args.adapter, "adapter")
    output = _check_output_folder(args.output, args.overwrite, args.dataset)
    with _no_cache_beside_input():
        dataset = _load_input(args.dataset, args.split, args.dataset_config, args.limit)
        _check_output_column(args.output_column, dataset)
        scored, _ = _score(args, dataset)
        if distributed_state().is_main_process:
            _save_atomically(scored, output)
    if distributed_state().is_main_process:
        dropped = len(dataset) - len(scored)
        note = f" ({dropped} of {len(dataset)} rows dropped by truncation)" if dropped else ""
        print(f"Scored {len(scored)} examples{note} -> {args.output}")
        _print_summary(scored, PplMaskConfig(threshold=2.5), args.output_column)
    return 0


def _check_aligned(dataset, columns: Sequence[str]) -> None:
    """Every per-token column has one value per token of `input_ids`; name the first row and column that has not."""
    if "input_ids" not in dataset.column_names:
        return
    lengths = [len(ids) for ids in dataset["input_ids"]]
    for column in columns:
        for row, (values, length) in enumerate(zip(dataset[column], lengths)):
            if values is None or len(values) != length:
                got = "no value" if values is None else f"{len(values)} values"
                raise ValueError(
                    f"Row {row}: `{column}` has {got} but `input_ids` has {length} tokens; per-token columns must be "
                    "aligned with `input_ids`. Rebuild the dataset (`trl-pplmask score` on the raw data)."
                )


def _check_nll_values(dataset, column: str) -> None:
    """NLLs are >= 0 (perplexity >= 1): a negative value means the column holds something else."""
    import pyarrow.compute as pc

    values = dataset.data.column(column)
    flat = pc.list_flatten(values)
    if len(flat) == 0 or pc.min(flat).as_py() is None or pc.min(flat).as_py() >= -1e-4:
        return
    for row, nll in enumerate(dataset[column]):
        nll = np.asarray(nll, dtype=np.float64)
        if nll.size and nll.min() < -1e-4:
            token = int(np.argmin(nll))
            raise ValueError(
                f"Row {row}: `{column}` holds a negative NLL ({nll[token]:g}) at token {token}, i.e. a perplexity "
                "below 1. NLLs are never negative: this column does not hold `trl-pplmask score` output; rescore."
            )


def cmd_mask(args: argparse.Namespace) -> int:
    from .masking import mask_dataset

    if not math.isfinite(args.threshold):
        raise ValueError(
            f"--threshold must be a finite perplexity, got {args.threshold}. Use e.g. 2.5 (the paper's value); to "
            "mask nothing, do not run `mask`."
        )
    if args.fraction is not None and args.strategy != "fraction":
        raise ValueError(
            f"--fraction applies only to --strategy fraction, not {args.strategy!r}; drop --fraction or pass "
            "--strategy fraction."
        )
    config = _mask_config(args)
    output = _check_output_folder(args.output, args.overwrite, args.input)
    with _no_cache_beside_input():
        dataset = _load_input(args.input, args.split, args.dataset_config)
        nll_columns = [c for c in (config.nll_column, config.dpf_nll_column if config.needs_dpf else None) if c]
        _check_aligned(dataset, [c for c in ("labels", TRAINABLE_COLUMN, *nll_columns) if c in dataset.column_names])
        for column in nll_columns:
            if column in dataset.column_names:
                _check_nll_values(dataset, column)
        masked, stats = mask_dataset(dataset, config, drop_empty=args.drop_empty)
        _save_atomically(masked, output)
    print(json.dumps(stats, indent=2))
    print(f"Masked dataset -> {args.output}")
    return 0


PPL_BINS = (1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 100.0, math.inf)


def text_histogram(ppl: np.ndarray, threshold: float, width: int = 40) -> str:
    """A small text histogram of token perplexities, bins marked above the threshold."""
    counts, _ = np.histogram(ppl, bins=np.array(PPL_BINS))
    total = max(int(counts.sum()), 1)
    lines = []
    for lo, hi, n in zip(PPL_BINS[:-1], PPL_BINS[1:], counts):
        label = f"[{lo:g}, {hi:g})" if math.isfinite(hi) else f"[{lo:g}, inf)"
        bar = "#" * int(round(width * n / total))
        flag = "  masked" if lo >= threshold else ""
        lines.append(f"  {label:>12} {n:7d} {100 * n / total:5.1f}% {bar}{flag}")
    return "\n".join(lines)


def completion_ppl(dataset, nll_column: str = "token_nll") -> np.ndarray:
    """Perplexities of all completion (trainable) tokens of a scored dataset."""
    values = []
    masks = dataset[TRAINABLE_COLUMN] if TRAINABLE_COLUMN in dataset.column_names else dataset["labels"]
    for nll, mask in zip(dataset[nll_column], masks):
        trainable = trainable_positions(mask, mask if TRAINABLE_COLUMN in dataset.column_names else None)
        values.append(np.exp(np.asarray(nll, dtype=np.float64)[trainable]))
    return np.concatenate(values) if values else np.zeros(0)


def _print_summary(dataset, config: PplMaskConfig, nll_column: str) -> None:
    ppl = completion_ppl(dataset, nll_column)
    if ppl.size == 0:
        print("No completion tokens.")
        return
    print(f"Completion tokens: {ppl.size}; median perplexity {np.median(ppl):.2f}; ")
    print(f"above {config.threshold:g} (masked by STM): {100 * np.mean(ppl > config.threshold):.1f}%")
    print(text_histogram(ppl, config.threshold))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(output_dir=args.output, num_examples=args.num_examples, max_steps=args.max_steps)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `trl-pplmask` parser. With `argv`, of the subcommands in `COMMANDS` only the one that `argv` names is
    defined (the others are listed by name and help), so that no unneeded module is imported; without, all are."""
    parser = argparse.ArgumentParser(
        prog="trl-pplmask",
        description="Selective Token Masking for TRL: score, mask and fine-tune without catastrophic forgetting.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser(
        "score",
        help="Tokenize a dataset like SFTTrainer and add per-token NLLs (token_nll).",
        description="Tokenize a dataset exactly as SFTTrainer does and add the per-token NLL of every trainable token "
        "under --model. A dataset that is already tokenized (e.g. from `build` or `mask`) is scored as it is, on "
        "every token SFT trains on before masking. The output folder is written atomically.",
    )
    _add_model_args(score)
    _add_dataset_args(score)
    score.add_argument("--output", required=True, help="New or empty folder for Dataset.save_to_disk.")
    score.add_argument(
        "--overwrite", action="store_true", help="Replace a non-empty --output (only once the new data is complete)."
    )
    score.add_argument("--max-length", type=int, default=1024, help="SFTConfig.max_length used for training.")
    score.add_argument("--max-tokens-per-batch", type=int, help="Token budget per batch (default: by device).")
    score.add_argument("--score-all-tokens", action="store_true", help="Score prompt tokens too.")
    score.add_argument("--disable-adapter", action="store_true", help="Score with the PEFT adapter disabled.")
    score.add_argument(
        "--output-column",
        default="token_nll",
        help="Column for the NLLs (default token_nll; token_nll_dpf for DPF's fine-tuned model). Never an existing "
        "non-NLL column such as labels or input_ids.",
    )
    score.set_defaults(func=cmd_score)

    mask = sub.add_parser(
        "mask",
        help="Mask the labels of a scored dataset and add mask statistics.",
        description="Set the labels of high-perplexity tokens to -100 (Selective Token Masking) in a dataset scored "
        "by `trl-pplmask score`, add per-example statistics and print the overall ones. The input is never "
        "modified; the output folder is written atomically.",
    )
    mask.add_argument("--input", required=True, help="Scored dataset (folder from `trl-pplmask score`).")
    mask.add_argument(
        "--dataset-config", help="Config (scoring model) of a Hub-layout folder or Hub id with several, from `build`."
    )
    mask.add_argument("--split", default="train", help="Split to use when --input holds several (default train).")
    mask.add_argument("--output", required=True, help="New or empty folder for Dataset.save_to_disk.")
    mask.add_argument(
        "--overwrite", action="store_true", help="Replace a non-empty --output (only once the new data is complete)."
    )
    _add_mask_args(mask)
    mask.set_defaults(func=cmd_mask)

    demo = sub.add_parser(
        "demo",
        help="Score, mask and fine-tune the embedded model on GSM8K, on CPU.",
        description="Score and mask GSM8K rows with the embedded model, save the masked dataset, then train a few "
        "LoRA steps with SFTTrainer and PplMaskCollator, on CPU and offline.",
    )
    demo.add_argument("--output", default="demo_output", help="Folder for the demo's outputs (default: demo_output).")
    demo.add_argument("--num-examples", type=int, default=64, help="GSM8K rows used (default: 64).")
    demo.add_argument("--max-steps", type=int, default=10, help="LoRA training steps (default: 10).")
    demo.set_defaults(func=cmd_demo)

    _register_commands(sub, argv)
    return parser


# Subcommands defined by other modules: name -> (module with a `register_cli(subparsers)`, one-line help). Only the
# module of the subcommand being run is imported; the others are listed with their help alone, so that
# `trl-pplmask --help` never imports torch. Those modules define their arguments without importing torch (the work
# imports it), except `eval`'s. `sft` is parsed by TRL's own parser (see `main`).
COMMANDS = {
    "build": (
        "trl_pplmask.hub.cli",
        "Build a Hub-layout <task>-pplmasked dataset folder (parquet per model config, card, figures).",
    ),
    "push": ("trl_pplmask.hub.cli", "Upload a built folder to a Hub dataset repo (or --dry-run)."),
    "self-output": (
        "trl_pplmask.generation.cli",
        "Generate verified self-output/rephrase SFT data and build a Hub-layout <task>-self-output folder.",
    ),
    "eval": (
        "trl_pplmask.evaluation.cli",
        "Forgetting report: target and non-target tasks, base against fine-tuned models.",
    ),
    "sft": (
        "trl_pplmask.sft",
        "`trl sft` with Selective Token Masking: every trl sft flag and recipe, plus pplmask_* settings.",
    ),
    "study": (
        "trl_pplmask.study.main",
        "Forgetting study: train GT, STM and alternative arms with shared settings and compare them.",
    ),
}


def _command_name(argv: Sequence[str] | None) -> str | None:
    """The subcommand of `argv` (the top-level parser has no option other than --help before it)."""
    for token in argv or ():
        if not token.startswith("-"):
            return token
    return None


def _register_commands(sub, argv: Sequence[str] | None = None) -> None:
    """Register the subcommand named in `argv` from its module, and list every other one by name and help."""
    import importlib

    names = list(dict.fromkeys(module for module, _ in COMMANDS.values()))
    if argv is not None:
        name = _command_name(argv)
        names = [COMMANDS[name][0]] if name in COMMANDS else []
    for module in names:
        try:
            register = importlib.import_module(module).register_cli
        except ImportError as err:
            if argv is None:
                continue  # listed by name below; running it reports the missing dependency
            raise SystemExit(f"trl-pplmask {_command_name(argv)}: error: {err}") from None
        register(sub)
    for other, (_, help_text) in COMMANDS.items():
        if other not in sub.choices:
            sub.add_parser(other, help=help_text, add_help=False)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sft"]:
        # `sft` is parsed by TRL's own parser (every `trl sft` flag and YAML recipe), not by argparse here
        return _run_sft(argv[1:])
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        with _terminate_cleanly():
            return args.func(args)
    except (ValueError, OSError, ImportError, TypeError) as err:  # OSError: files, network (ConnectionError)
        if os.environ.get("TRL_PPLMASK_DEBUG"):
            raise
        print(f"trl-pplmask {args.command}: error: {err}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _terminate_cleanly():
    """SIGTERM ends the command as SIGINT does, through its `finally` blocks: staging folders are removed and no
    partial output is left (the default action would kill the process on the spot). Exit status 143."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run_sft(argv: list[str]) -> int:
    if argv and set(argv) <= {"-h", "--help"}:
        return _sft_help()
    from .sft import cli as sft_cli

    try:
        return sft_cli(argv)
    except (ValueError, OSError, ImportError, TypeError) as err:
        if os.environ.get("TRL_PPLMASK_DEBUG"):
            raise
        print(f"trl-pplmask sft: error: {err}", file=sys.stderr)
        return 2


def _sft_help() -> int:
    """Print `sft --help`, TRL's parser's own text, from a cache when a previous call made it.

    Building TRL's parser imports torch, transformers and peft (4-6 s on a laptop CPU) for a text that depends only on
    their versions, on `sft.py` and on the terminal's width; so the text is made once per such combination and kept
    in `$TRL_PPLMASK_CACHE/help/` (a folder that cannot be written only costs the speed-up).
    """
    import hashlib
    import io
    import shutil

    from .models import cache_dir
    from .utils import atomic_write_text, package_version

    packages = ("trl-pplmask", "trl", "transformers", "peft", "accelerate")
    key = hashlib.sha256(Path(__file__).with_name("sft.py").read_bytes())
    for part in (
        sys.version,
        Path(sys.argv[0]).name,
        shutil.get_terminal_size().columns,
        *map(package_version, packages),
    ):
        key.update(f"\0{part}".encode())
    path = cache_dir() / "help" / f"sft-{key.hexdigest()[:20]}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        from .sft import cli as sft_cli

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            try:
                sft_cli(["--help"])
            except SystemExit as exit:
                if exit.code not in (0, None):
                    raise
        text = buffer.getvalue()
        with contextlib.suppress(OSError):
            atomic_write_text(path, text)
    sys.stdout.write(text)
    raise SystemExit(0)  # as argparse's --help does


if __name__ == "__main__":
    sys.exit(main())
