"""Scoring speed and memory: `score_dataset` against the paper's reference loop, side by side in one run.

Reference loop (the paper's scoring script, per example): `model(ids, labels=ids)`, then a full-vocabulary
`cross_entropy` of the float32 logits.

1. Speed and agreement: the embedded SmolLM2-135M-Instruct (or --model) on the same GSM8K training examples. The
   examples are split into rounds that alternate the two methods, so that machine noise hits both alike; tokens per
   second of each, their ratio and the largest absolute NLL difference on completion tokens are printed.
2. Peak memory: a tiny random Llama with a 128,256-token vocabulary (Llama 3's) on one 4,096-token sequence, each
   method in a fresh subprocess. On CPU the peak is the growth of the process's resident set size during the call
   (sampled every millisecond); on CUDA it is the growth of `torch.cuda.max_memory_allocated`.
3. Cost of `token_entropy`: `score_dataset` with and without the entropy column (`entropy_column=None`), on the same
   examples and batches, in rounds that alternate which runs first; the ratio of total times is printed, with the
   same ratio for the LM-head step alone (`selected_log_probs` on one batch's hidden states, where all the extra work
   is) and the largest NLL difference between the two (the entropy must not change the NLLs). Next to wall-clock
   time, the process's CPU time: on a shared machine it leaves out the time other jobs hold the cores, so its ratio is
   the steadier one (with one torch thread, all the work runs in this process).

Usage: python benchmarks/bench_scoring.py [--examples 128] [--rounds 4] [--device cpu|cuda] [--dtype float32]
       [--model NAME_OR_PATH [--random-init]] [--skip-speed] [--skip-memory] [--skip-entropy]
       [--entropy-examples 16] [--entropy-rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch


def reference_nll(model, input_ids: list[int]) -> np.ndarray:
    """The paper's loop body: one example, the model's own loss path, then a full-vocabulary cross-entropy."""
    ids = torch.tensor([input_ids], device=model.device)
    with torch.no_grad():
        logits = model(ids, labels=ids).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
    return np.concatenate([[0.0], nll.cpu().numpy()])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_bench_model(args):
    """`(model, tokenizer)` of `--model`, or a randomly initialised model of its shape with `--random-init`."""
    from trl_pplmask.models import load_model

    if args.random_init:
        # Speed does not depend on the weights: a randomly initialised model of the same shape (for machines
        # where the checkpoint cannot be copied)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).to(args.device).eval()
        return model, AutoTokenizer.from_pretrained(args.model)
    return load_model(args.model, dtype=args.dtype, device=args.device)


def bench_speed(args, model, tokenizer) -> dict:
    from trl_pplmask.data import load_task, tokenize_dataset
    from trl_pplmask.scoring import score_dataset

    data = tokenize_dataset(load_task("gsm8k", "train", limit=args.examples), tokenizer, max_length=1024)
    rounds = np.array_split(np.arange(len(data)), args.rounds)
    ours_time = ref_time = 0.0
    max_diff = 0.0
    tokens = 0
    # Warm-up both paths once so that one-time costs do not land in either measurement
    warm = data.select([0])
    score_dataset(warm, model, tokenizer, use_cache=False, show_progress=False)
    reference_nll(model, warm[0]["input_ids"])
    for r, idx in enumerate(rounds):
        part = data.select(idx.tolist())
        tokens += sum(len(x) for x in part["input_ids"])
        order = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")
        for method in order:
            _sync(args.device)
            start = time.perf_counter()
            if method == "ours":
                scored = score_dataset(part, model, tokenizer, use_cache=False, show_progress=False)
            else:
                refs = [reference_nll(model, ids) for ids in part["input_ids"]]
            _sync(args.device)
            elapsed = time.perf_counter() - start
            if method == "ours":
                ours_time += elapsed
            else:
                ref_time += elapsed
        for nll, ref, labels in zip(scored["token_nll"], refs, part["labels"]):
            trainable = np.asarray(labels) != -100
            max_diff = max(max_diff, float(np.abs(np.asarray(nll)[trainable] - ref[trainable]).max()))
    return {
        "examples": len(data),
        "tokens": tokens,
        "score_dataset_tok_per_s": tokens / ours_time,
        "reference_tok_per_s": tokens / ref_time,
        "speedup": ref_time / ours_time,
        "max_abs_nll_diff": max_diff,
    }


def bench_entropy(args, model, tokenizer) -> dict:
    """`score_dataset` with and without `token_entropy`, alternating rounds over the same examples."""
    from trl_pplmask.data import load_task, tokenize_dataset
    from trl_pplmask.lm_head import selected_log_probs, unwrap_causal_lm
    from trl_pplmask.scoring import score_dataset

    data = tokenize_dataset(load_task("gsm8k", "train", limit=args.entropy_examples), tokenizer, max_length=1024)
    rounds = np.array_split(np.arange(len(data)), args.entropy_rounds)
    settings = {"without": {"entropy_column": None}, "with": {}}
    times = {"without": 0.0, "with": 0.0}
    cpu_times = {"without": 0.0, "with": 0.0}
    per_round = []  # (without, with) wall seconds of each round: the spread shows how noisy the machine was
    max_nll_diff = 0.0
    tokens = 0
    warm = data.select([0])
    for kwargs in settings.values():
        score_dataset(warm, model, tokenizer, use_cache=False, show_progress=False, **kwargs)
    for r, idx in enumerate(rounds):
        part = data.select(idx.tolist())
        tokens += sum(len(x) for x in part["input_ids"])
        results, elapsed = {}, {}
        for method in ("without", "with") if r % 2 == 0 else ("with", "without"):
            _sync(args.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            results[method] = score_dataset(
                part, model, tokenizer, use_cache=False, show_progress=False, **settings[method]
            )
            _sync(args.device)
            elapsed[method] = time.perf_counter() - start
            times[method] += elapsed[method]
            cpu_times[method] += time.process_time() - cpu_start
        per_round.append((elapsed["without"], elapsed["with"]))
        for a, b in zip(results["without"]["token_nll"], results["with"]["token_nll"]):
            max_nll_diff = max(max_nll_diff, float(np.abs(np.subtract(a, b)).max()))

    # The LM-head step alone, where all the extra work is: the scored positions of the first round's examples
    causal_lm = unwrap_causal_lm(model)
    part = data.select(rounds[0].tolist())
    head = {"without": 0.0, "with": 0.0}
    head_cpu = {"without": 0.0, "with": 0.0}
    rows = 0
    for ids, labels in zip(part["input_ids"], part["labels"]):
        ids_t = torch.tensor([ids], device=args.device)
        with torch.no_grad():
            hidden = causal_lm.base_model(input_ids=ids_t).last_hidden_state[0, :-1]
        scored = torch.tensor(labels[1:], device=args.device) != -100
        hidden, targets = hidden[scored], ids_t[0, 1:][scored]
        rows += len(targets)
        for r in range(args.head_repeats):
            for method in ("without", "with") if r % 2 == 0 else ("with", "without"):
                _sync(args.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    selected_log_probs(causal_lm, hidden, targets, return_entropy=method == "with")
                _sync(args.device)
                head[method] += time.perf_counter() - start
                head_cpu[method] += time.process_time() - cpu_start
    return {
        "examples": len(data),
        "rounds": len(rounds),
        "tokens": tokens,
        "without_entropy_s": times["without"],
        "with_entropy_s": times["with"],
        "ratio": times["with"] / times["without"],
        "without_entropy_cpu_s": cpu_times["without"],
        "with_entropy_cpu_s": cpu_times["with"],
        "cpu_ratio": cpu_times["with"] / cpu_times["without"],
        "round_ratios": [w / wo for wo, w in per_round],
        "round_seconds": per_round,
        "lm_head_rows": rows,
        "lm_head_repeats": args.head_repeats,
        "lm_head_without_s": head["without"],
        "lm_head_with_s": head["with"],
        "lm_head_ratio": head["with"] / head["without"],
        "lm_head_cpu_ratio": head_cpu["with"] / head_cpu["without"],
        "max_abs_nll_diff": max_nll_diff,
    }


class _RssPeak:
    """Peak resident set size of this process while the block runs, sampled every millisecond.

    `ru_maxrss` cannot be used: it is the lifetime peak, which model construction may already have set higher.
    """

    def __init__(self):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.001)

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _memory_child(method: str, device: str, seq_len: int, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_pplmask.scoring import score_dataset

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq_len,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device).eval()
    ids = torch.randint(0, vocab, (seq_len,)).tolist()
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": [ids], "labels": [ids]})

    def run():
        if method == "ours":
            score_dataset(data, model, None, use_cache=False, show_progress=False)
        else:
            reference_nll(model, ids)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _RssPeak() as rss:
            run()
        peak = rss.peak - rss.base
    print(json.dumps({"peak_bytes": peak}))


def bench_memory(args) -> dict:
    out = {}
    for method in ("ref", "ours"):
        cmd = [sys.executable, __file__, "--memory-child", method, "--device", args.device,
               "--seq-len", str(args.seq_len), "--vocab", str(args.vocab)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[f"{method}_peak_mib"] = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20
    out["ratio"] = out["ours_peak_mib"] / out["ref_peak_mib"]
    out.update(seq_len=args.seq_len, vocab=args.vocab)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--random-init", action="store_true", help="Random weights from --model's config.")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-entropy", action="store_true")
    parser.add_argument("--entropy-examples", type=int, default=16, help="GSM8K examples of the entropy comparison.")
    parser.add_argument("--entropy-rounds", type=int, default=2)
    parser.add_argument("--head-repeats", type=int, default=4, help="LM-head-only repeats per example (entropy).")
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    parser.add_argument("--memory-child", choices=("ours", "ref"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.device, args.seq_len, args.vocab)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    results = {"device": args.device, "machine": machine, "threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        results["load_average_before"] = os.getloadavg()
    if not (args.skip_speed and args.skip_entropy):
        model, tokenizer = load_bench_model(args)
    if not args.skip_speed:
        results["speed"] = bench_speed(args, model, tokenizer)
        s = results["speed"]
        print(f"Speed ({args.model}, {s['examples']} GSM8K examples, {s['tokens']} tokens, {args.device}):")
        print(f"  score_dataset   {s['score_dataset_tok_per_s']:9.1f} tok/s")
        print(f"  reference loop  {s['reference_tok_per_s']:9.1f} tok/s")
        print(f"  speedup         {s['speedup']:9.2f}x   max |dNLL| {s['max_abs_nll_diff']:.2e}")
    if not args.skip_entropy:
        results["entropy"] = bench_entropy(args, model, tokenizer)
        e = results["entropy"]
        size = f"{e['examples']} GSM8K examples in {e['rounds']} rounds, {e['tokens']} tokens"
        print(f"Entropy cost ({args.model}, {size}, {args.device}):")
        print("                       wall s    CPU s")
        print(f"  without entropy {e['without_entropy_s']:9.2f} {e['without_entropy_cpu_s']:9.2f}")
        print(f"  with entropy    {e['with_entropy_s']:9.2f} {e['with_entropy_cpu_s']:9.2f}")
        print(f"  ratio           {e['ratio']:9.3f} {e['cpu_ratio']:9.3f}   max |dNLL| {e['max_abs_nll_diff']:.2e}")
        print(f"  LM head alone   {e['lm_head_ratio']:9.3f} {e['lm_head_cpu_ratio']:9.3f}", end="   ")
        print(f"({e['lm_head_rows']} rows x {e['lm_head_repeats']} repeats)")
        print(f"  per-round wall ratios {' '.join(f'{x:.3f}' for x in e['round_ratios'])}")
    if not args.skip_memory:
        results["memory"] = bench_memory(args)
        m = results["memory"]
        print(f"Peak memory (tiny Llama, vocab {m['vocab']}, {m['seq_len']} tokens, {args.device}):")
        print(f"  score_dataset   {m['ours_peak_mib']:9.1f} MiB")
        print(f"  reference loop  {m['ref_peak_mib']:9.1f} MiB")
        print(f"  ratio           {m['ratio']:9.3f}")
    if hasattr(os, "getloadavg"):
        results["load_average_after"] = os.getloadavg()
        print(f"Load average before/after: {results['load_average_before']} / {results['load_average_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
