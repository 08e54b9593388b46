"""`trl-pplmask demo`: the whole STM workflow on the embedded model, on CPU, in a few minutes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .constants import DEFAULT_THRESHOLD
from .masking import IGNORE_INDEX, PplMaskConfig, completion_ppl, text_histogram


def _show_masked_example(example: dict, tokenizer, limit: int = 60) -> str:
    # Completion tokens of one example, masked ones in [brackets]
    pieces = []
    for token, label, trainable in zip(example["input_ids"], example["labels"], example["trainable_mask"]):
        if not trainable:
            continue
        text = tokenizer.decode([token])
        pieces.append(f"[{text}]" if label == IGNORE_INDEX else text)
        if len(pieces) >= limit:
            break
    return "".join(pieces)


def run_demo(output_dir: str = "demo_output", num_examples: int = 64, max_steps: int = 10) -> int:
    """Score and mask GSM8K with the embedded model, save the dataset, then train LoRA steps with the collator.

    Args:
        output_dir (`str`): Where the masked dataset and the adapter are written.
        num_examples (`int`): First N GSM8K training examples.
        max_steps (`int`): LoRA training steps with `SFTTrainer` + `PplMaskCollator`.
    """
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from .collator import PplMaskCollator, add_pplmask_callback
    from .data import load_task, tokenize_dataset
    from .masking import mask_dataset
    from .models import load_model
    from .scoring import score_dataset

    start = time.perf_counter()
    out = Path(output_dir)
    print(f"[1/4] Loading the embedded model (SmolLM2-135M-Instruct) and {num_examples} GSM8K training examples")
    model, tokenizer = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    dataset = load_task("gsm8k", "train", limit=num_examples)
    tokenized = tokenize_dataset(dataset, tokenizer, max_length=1024)

    print("[2/4] Scoring every completion token with the model to be fine-tuned")
    scored = score_dataset(tokenized, model, tokenizer)
    config = PplMaskConfig(strategy="threshold", threshold=DEFAULT_THRESHOLD)  # the paper's STM
    masked, stats = mask_dataset(scored, config)
    masked.save_to_disk(str(out / "gsm8k-pplmasked"))
    ppl = completion_ppl(masked)
    print(
        f"      masked {stats['masked_tokens']} of {stats['completion_tokens']} completion tokens "
        f"({100 * stats['masked_fraction']:.1f}%) at perplexity > {config.threshold:g}"
    )
    print(f"      median completion-token perplexity {np.median(ppl):.2f}; histogram:")
    print(text_histogram(ppl, config.threshold))
    print("      first example, masked tokens in [brackets]:")
    print("      " + _show_masked_example(masked[0], tokenizer).replace("\n", "\n      "))
    print(f"      saved to {out / 'gsm8k-pplmasked'}")

    print(f"[3/4] Training {max_steps} LoRA steps with SFTTrainer + PplMaskCollator(threshold={config.threshold})")
    args = SFTConfig(
        output_dir=str(out / "lora"),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_checkpointing=False,  # a 135M model fits; recomputation would only slow the CPU demo
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        remove_unused_columns=False,  # keep token_nll for the collator
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=masked,
        processing_class=tokenizer,
        data_collator=PplMaskCollator(tokenizer, threshold=config.threshold),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    add_pplmask_callback(trainer)
    result = trainer.train()
    trainer.save_model(str(out / "lora"))

    print("[4/4] Summary")
    losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    for step, loss in losses:
        print(f"      step {step:3d}  loss {loss:.4f}")
    print(f"      mean training loss {result.training_loss:.4f}; adapter saved to {out / 'lora'}")
    print(
        f"      masked fraction {100 * stats['masked_fraction']:.1f}%; total time {time.perf_counter() - start:.0f} s"
    )
    return 0
