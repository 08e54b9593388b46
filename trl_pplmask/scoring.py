"""Per-token negative log-likelihood (and predictive entropy) of a tokenized dataset under a reference model.

`token_nll[i] = -log p(input_ids[i] | input_ids[:i])` and `token_entropy[i] = -sum_v p(v | input_ids[:i]) log p(v |
input_ids[:i])` (nats), both 0.0 at position 0 and wherever nothing is scored. The backbone runs once per batch; the
LM head (`lm_head.selected_log_probs`) runs only on the positions that predict a scored token, in row chunks (TRL's
fused Triton kernel on CUDA), with the model's own logit scale and final-logit soft-capping, and the log-softmax in
float32. The entropy comes from the same pass over the logits as the NLL. No `[batch, seq, vocab]` float32 tensor is
ever built.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from datasets import Dataset, Sequence, Value
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .lm_head import backbone_hidden, selected_log_probs, unwrap_causal_lm
from .masking import ENTROPY_COLUMN, IGNORE_INDEX, NLL_COLUMN
from .models import cache_dir
from .utils import atomic_write, make_batches


# 2: entries also hold the entropies (`entropy_lengths`/`entropy_values`)
_CACHE_VERSION = "2"


@dataclass
class ScoringConfig:
    """Settings of [`score_dataset`].

    Args:
        max_tokens_per_batch (`int`, *optional*):
            Token budget of a batch, padding included. Examples are sorted by length so little is padding; an example
            longer than the budget is scored alone. Defaults to 16384 on accelerators and 1024 on CPU, where large
            padded batches are slower (measured in `benchmarks/bench_scoring.py`).
        score_all_tokens (`bool`, *optional*, defaults to `False`):
            Score every position, prompt included. By default only tokens with a label (the ones SFT trains on)
            are scored, and the others get 0.0.
        disable_adapter (`bool`, *optional*, defaults to `False`):
            With a PEFT model, score with its adapter disabled (the frozen base model).
        output_column (`str`, *optional*, defaults to `"token_nll"`):
            Name of the column to write.
        entropy_column (`str` or `None`, *optional*, defaults to `"token_entropy"`):
            Name of the column of per-token predictive entropies (nats) to write next to the NLLs, computed in the
            same LM-head pass (strategy `"stm_entropy"` reads it); `None` computes no entropy. When scoring a second
            model into another `output_column` (e.g. DPF's `"token_nll_dpf"`), give this another name or `None`, or
            it replaces the reference model's entropies.
        use_cache (`bool`, *optional*, defaults to `True`):
            Reuse the result of an identical earlier call (same tokens, same model weights, same settings).
        cache_dir (`str`, *optional*):
            Where results are cached; defaults to `<TRL_PPLMASK_CACHE>/scores`.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar with tokens per second (main process only).
    """

    max_tokens_per_batch: int | None = None
    score_all_tokens: bool = False
    disable_adapter: bool = False
    output_column: str = NLL_COLUMN
    entropy_column: str | None = ENTROPY_COLUMN
    use_cache: bool = True
    cache_dir: str | None = None
    show_progress: bool = True

    def __post_init__(self):
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch <= 0:
            raise ValueError(f"max_tokens_per_batch must be positive, got {self.max_tokens_per_batch}.")
        if self.entropy_column is not None and self.entropy_column == self.output_column:
            raise ValueError(f"entropy_column and output_column are both {self.output_column!r}; use two names.")


def distributed_state() -> PartialState:
    """The accelerate state of this process, forming a gloo process group for multi-process CPU launches.

    accelerate only builds a CPU process group when asked (`cpu=True`); without it, every process of a CPU-only
    `accelerate launch --multi_gpu`/`torchrun` job would score the whole dataset alone.
    """
    cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=cpu_group)


def adapter_context(model: torch.nn.Module, disable_adapter: bool):
    """`model.disable_adapter()` for PEFT models when asked, else a no-op."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    if disable_adapter and hasattr(inner, "disable_adapter"):
        return inner.disable_adapter()
    return nullcontext()


@torch.no_grad()
def batch_token_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    logits_chunk_bytes: int = 2**28,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """NLL of each token given its prefix, `[batch, seq]` float32, 0.0 where `score_mask` is False and at position 0.

    The backbone runs once on the batch; the LM head runs only on the positions that predict a scored token.

    Args:
        model (`torch.nn.Module`): Causal LM (transformers, PEFT or accelerate-wrapped).
        input_ids (`torch.Tensor`): Token ids, `[batch, seq]`.
        attention_mask (`torch.Tensor`): 1 on real tokens, 0 on padding, `[batch, seq]`.
        score_mask (`torch.Tensor`): True (or 1) on the tokens to score, `[batch, seq]`.
        logits_chunk_bytes (`int`, *optional*, defaults to `2**28`): See [`selected_log_probs`].
        return_entropy (`bool`, *optional*, defaults to `False`): Also return the entropy (nats) of the predictive
            distribution at the position that predicts each scored token (0.0 elsewhere), from the same pass.

    Returns:
        `torch.Tensor` `nll`, or `(nll, entropy)` with `return_entropy=True`, each `[batch, seq]` float32.
    """
    lm = unwrap_causal_lm(model)
    hidden = backbone_hidden(lm, input_ids, attention_mask)
    predicts = score_mask[:, 1:].bool().to(hidden.device)
    predicts &= attention_mask[:, 1:].bool().to(hidden.device)
    lm_device = lm.get_output_embeddings().weight.device
    selected = selected_log_probs(
        lm,
        hidden[:, :-1][predicts].to(lm_device),
        input_ids[:, 1:].to(hidden.device)[predicts].to(lm_device),
        logits_chunk_bytes,
        return_entropy=return_entropy,
    )
    log_probs, entropy = selected if return_entropy else (selected, None)
    predicts = predicts.to(lm_device)
    nll = torch.zeros(input_ids.shape, dtype=torch.float32, device=lm_device)
    nll[:, 1:][predicts] = -log_probs
    if not return_entropy:
        return nll
    token_entropy = torch.zeros(input_ids.shape, dtype=torch.float32, device=lm_device)
    token_entropy[:, 1:][predicts] = entropy
    return nll, token_entropy


def _pad(rows: list[list[int]], value: int, device: torch.device) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    out = torch.full((len(rows), longest), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out.to(device)


def tokens_fingerprint(dataset: Dataset) -> str:
    """Content hash of the `input_ids` and `labels` columns (what the scores depend on)."""
    h = hashlib.sha256()
    table = dataset.select_columns([c for c in ("input_ids", "labels") if c in dataset.column_names])
    table = table.with_format("arrow")[:]
    for name in table.column_names:
        column = table.column(name)
        h.update(name.encode())
        h.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        h.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model's weights: the name, shape, dtype and every byte of every tensor (LoRA tensors too).

    A full hash, so that no edit goes unnoticed (a sample of values misses an edited embedding row); it reads each
    tensor once (measured: about 0.3 s per GB of weights for SHA-256 on one CPU core), tensors shared by several names
    (tied embeddings) once.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(str(getattr(config, "_name_or_path", "")).encode())
    h.update(type(model).__name__.encode())
    seen: dict[tuple, str] = {}
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            h.update(f"=={seen[key]}".encode())
            continue
        seen[key] = name
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        h.update(memoryview(flat.cpu().numpy()))
    return h.hexdigest()


def _cache_path(config: ScoringConfig, dataset: Dataset, model: torch.nn.Module) -> Path:
    root = Path(config.cache_dir) if config.cache_dir else cache_dir() / "scores"
    settings = {"score_all_tokens": config.score_all_tokens, "disable_adapter": config.disable_adapter}
    disabled = adapter_context(model, config.disable_adapter)
    with disabled:
        weights = model_fingerprint(model)
    key = json.dumps([_CACHE_VERSION, tokens_fingerprint(dataset), weights, settings], sort_keys=True)
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _flatten(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(x) for x in rows], dtype=np.int64)
    values = np.concatenate(rows).astype(np.float32) if rows else np.zeros(0, np.float32)
    return lengths, values


def _unflatten(lengths: np.ndarray, values: np.ndarray) -> list[np.ndarray]:
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _save_cache(path: Path, scores: tuple[list[np.ndarray], list[np.ndarray] | None]) -> None:
    """Write `(nlls, entropies)` (entropies `None` when not computed) to one `.npz` entry, atomically."""
    nlls, entropies = scores
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths, values = _flatten(nlls)
    arrays = {"lengths": lengths, "values": values}
    if entropies is not None:
        arrays["entropy_lengths"], arrays["entropy_values"] = _flatten(entropies)
    atomic_write(path, lambda f: np.savez(f, **arrays))  # a crash never leaves a half-written cache entry


def _load_cache(
    path: Path, row_lengths: np.ndarray | None = None
) -> tuple[list[np.ndarray], list[np.ndarray] | None] | None:
    """`(nlls, entropies)` of a cache entry (entropies `None` if the entry has none), or `None` (a miss, which the
    caller scores again and replaces) if the entry is unreadable (empty, truncated, not an `.npz`) or does not fit the
    rows it would serve: one float32 array per row, each as long as its row's `input_ids` (`row_lengths`)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception:  # BadZipFile, EOFError, OSError, ValueError, ...: any unreadable entry is a miss
        return None
    if not {"lengths", "values"} <= set(arrays):
        return None
    pairs = [(arrays["lengths"], arrays["values"])]
    if "entropy_values" in arrays:
        pairs.append((arrays.get("entropy_lengths"), arrays["entropy_values"]))
    for lengths, values in pairs:
        if lengths is None or lengths.dtype != np.int64 or values.dtype != np.float32 or lengths.ndim != 1:
            return None
        if values.ndim != 1 or int(lengths.sum()) != len(values) or (lengths < 0).any():
            return None
        if row_lengths is not None and not np.array_equal(lengths, np.asarray(row_lengths, dtype=np.int64)):
            return None
    if len(pairs) == 2 and not np.array_equal(pairs[0][0], pairs[1][0]):
        return None
    return _unflatten(*pairs[0]), None if len(pairs) == 1 else _unflatten(*pairs[1])


def _score_rows(
    model: torch.nn.Module,
    input_ids: list[list[int]],
    score_masks: list[np.ndarray],
    batches: list[list[int]],
    config: ScoringConfig,
    pad_token_id: int,
    show_progress: bool,
) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """`{example index: (nll, entropy)}` for the examples of `batches` (entropy `None` without `entropy_column`)."""
    device = next(model.parameters()).device
    with_entropy = config.entropy_column is not None
    results: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    total = sum(len(input_ids[i]) for b in batches for i in b)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="Scoring", disable=not show_progress)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with adapter_context(model, config.disable_adapter):
            for batch in batches:
                ids = _pad([input_ids[i] for i in batch], pad_token_id, device)
                attention = _pad([[1] * len(input_ids[i]) for i in batch], 0, device)
                score = _pad([score_masks[i].astype(np.int64).tolist() for i in batch], 0, device)
                out = batch_token_nll(model, ids, attention, score, return_entropy=with_entropy)
                nll, entropy = (t.cpu().numpy() for t in out) if with_entropy else (out.cpu().numpy(), None)
                for row, i in enumerate(batch):
                    n = len(input_ids[i])
                    results[i] = (nll[row, :n], None if entropy is None else entropy[row, :n])
                done = sum(len(input_ids[i]) for i in batch)
                bar.update(done)
                bar.set_postfix(tok_per_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.0f}")
    finally:
        bar.close()
        model.train(was_training)
    return results


def score_dataset(
    dataset: Dataset,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None = None,
    config: ScoringConfig | None = None,
    split_across_processes: bool = True,
    **config_kwargs,
) -> Dataset:
    """Add the per-token NLL (`token_nll`) and predictive entropy (`token_entropy`) of every example under `model`.

    Runs unchanged under `accelerate launch`: each process scores a share of the batches and every process returns
    the same, complete dataset. Place the model on `PartialState().device` in that case. With
    `split_across_processes=False`, each process scores the whole `dataset` it was given, alone, with no collective
    call (the sharded runs of `trl_pplmask.hub.shards`, where each process holds its own shards).

    Args:
        dataset (`Dataset`): Tokenized dataset with `input_ids` and, optionally, `labels` (see
            [`~trl_pplmask.data.tokenize_dataset`]). Without `labels`, every token is scored.
        model (`torch.nn.Module`): Causal LM (transformers, PEFT or accelerate-wrapped).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Supplies the pad token id (any id works, padded positions
            are never read).
        config (`ScoringConfig`, *optional*): Settings; or pass them as keyword arguments.
        split_across_processes (`bool`, *optional*, defaults to `True`): Share the batches among the processes of a
            distributed launch and gather the results; `False` scores everything in this process.

    Returns:
        `Dataset`: the input dataset with float32 list columns of NLLs (`config.output_column`) and, unless
        `config.entropy_column` is `None`, of entropies, both aligned with `input_ids`.
    """
    if config is None:
        config = ScoringConfig(**config_kwargs)
    elif config_kwargs:
        raise ValueError("Pass either `config` or ScoringConfig keyword arguments, not both.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            "score_dataset needs a tokenized dataset with `input_ids`; run `trl_pplmask.data.tokenize_dataset` first."
        )
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; there is nothing to score.")
    state = distributed_state()
    distributed = split_across_processes and state.num_processes > 1
    main = state.is_main_process or not split_across_processes
    # Only the main process reads and writes the cache, and the others follow its decision: every process must take
    # the same branch (scoring ends in a collective gather), and another process may not see the main process's
    # entry yet (or ever, without a shared file system).
    cache_file = _cache_path(config, dataset, model) if config.use_cache and main else None
    cached = None
    if cache_file is not None and cache_file.exists():
        # Validated against the rows it serves (a short or foreign entry would misalign every later row)
        lengths = pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_numpy(zero_copy_only=False)
        cached = _load_cache(cache_file, lengths)
    if cached is not None and config.entropy_column is not None and cached[1] is None:
        cached = None  # scored without entropies: score again, and the new entry holds both
    if config.use_cache and distributed:
        cached = broadcast_object_list([cached])[0]
    if cached is not None:
        return _with_scores(dataset, config, *cached)

    input_ids = dataset["input_ids"]
    has_labels = "labels" in dataset.column_names and not config.score_all_tokens
    labels = dataset["labels"] if has_labels else None
    score_masks = [
        (np.asarray(labels[i]) != IGNORE_INDEX) if has_labels else np.ones(len(ids), dtype=bool)
        for i, ids in enumerate(input_ids)
    ]
    budget = config.max_tokens_per_batch
    if budget is None:
        budget = 1024 if next(model.parameters()).device.type == "cpu" else 16384
    batches = make_batches([len(x) for x in input_ids], budget)
    pad_token_id = _pad_token_id(tokenizer)
    my_batches = batches[state.process_index :: state.num_processes] if distributed else batches
    mine = _score_rows(model, input_ids, score_masks, my_batches, config, pad_token_id, config.show_progress and main)
    if distributed:
        gathered = gather_object(
            [(i, nll.tolist(), None if ent is None else ent.tolist()) for i, (nll, ent) in mine.items()]
        )
        mine = {
            i: (np.asarray(nll, dtype=np.float32), None if ent is None else np.asarray(ent, dtype=np.float32))
            for i, nll, ent in gathered
        }
    nlls = [mine[i][0].astype(np.float32) for i in range(len(dataset))]
    entropies = None
    if config.entropy_column is not None:
        entropies = [mine[i][1].astype(np.float32) for i in range(len(dataset))]
    if cache_file is not None and main:
        _save_cache(cache_file, (nlls, entropies))
    return _with_scores(dataset, config, nlls, entropies)


def _pad_token_id(tokenizer: PreTrainedTokenizerBase | None) -> int:
    if tokenizer is None:
        return 0
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _with_column(dataset: Dataset, name: str, values: list[np.ndarray]) -> Dataset:
    if name in dataset.column_names:
        dataset = dataset.remove_columns(name)
    feature = Sequence(Value("float32"))
    return dataset.add_column(name, [v.tolist() for v in values], feature=feature)


def _with_scores(
    dataset: Dataset, config: ScoringConfig, nlls: list[np.ndarray], entropies: list[np.ndarray] | None
) -> Dataset:
    """The NLL column, then the entropy column next to it when the config asks for one."""
    dataset = _with_column(dataset, config.output_column, nlls)
    if config.entropy_column is not None:
        dataset = _with_column(dataset, config.entropy_column, entropies)
    return dataset


def scoring_settings(config: ScoringConfig) -> dict:
    """The config as a plain dict, for dataset cards and logs."""
    return asdict(config)
