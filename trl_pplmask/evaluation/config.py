"""Settings of an evaluation ([`EvalConfig`]) and the models it compares ([`ModelSpec`], [`build_model_specs`]).

Light: importing it loads neither torch nor the data libraries (the `eval` command line builds these before any
work).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..models import model_slug, resolve_model_path
from ..tasks import TASKS
from .tasks import DEFAULT_TASKS, available_tasks, resolve_task


DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("builtin", "lm-eval")


def comma_separated(value: str) -> list[str]:
    """The names of a comma-separated list (`gsm8k, mbpp` -> `["gsm8k", "mbpp"]`; blanks dropped)."""
    return [name.strip() for name in value.split(",") if name.strip()]


@dataclass
class EvalConfig:
    """Settings of [`run_evaluation`].

    Args:
        tasks (`list[str]`, *optional*, defaults to `["gsm8k", "math", "mbpp", "humaneval", "arc_challenge"]`):
            Task names (see [`trl_pplmask.evaluation`]): generation tasks, `arc_challenge_mc`, `<task>_nll`.
        target (`str`, *optional*):
            The task the models were fine-tuned for; one of `tasks`. Defaults to the first task. Other tasks on the
            same data set (e.g. `gsm8k_nll` for `gsm8k`) are reported next to it and left out of the non-target mean.
        limit (`int`, *optional*):
            Evaluate only the first `limit` items of each task; larger than a split is an error.
        splits (`dict[str, str]`, *optional*):
            Split per data set, overriding each task's `eval_split` (e.g. `{"mbpp": "train"}`).
        max_new_tokens (`int`, *optional*, defaults to `512`):
            Generation budget per answer; an answer cut off there is checked as it is.
        instruction_max_new_tokens (`int`, *optional*, defaults to `192`):
            Generation budget of the `instruction_following` answers.
        drift_max_new_tokens (`int`, *optional*, defaults to `96`):
            Generation budget of the base model's answers that `<task>_drift` scores.
        max_tokens_per_batch (`int`, *optional*):
            Token budget of a batch, padding and generated tokens included. Defaults to 4096 on CPU and 65536 on
            accelerators.
        max_batch_size (`int`, *optional*, defaults to `64`):
            Most sequences in one generation batch.
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weight dtype (`auto`, `float32`, `bfloat16`, `float16`).
        device (`str`, *optional*):
            Device of the models; defaults to CUDA when available, else CPU.
        nll_max_length (`int`, *optional*, defaults to `2048`):
            `SFTConfig.max_length` of the `<task>_nll` tokenization (longer examples are truncated, as in training).
        code_timeout (`float`, *optional*, defaults to `10.0`):
            Seconds per sandboxed test run of `mbpp` and `humaneval`.
        n_resamples (`int`, *optional*, defaults to `1000`):
            Bootstrap resamples of the intervals.
        confidence (`float`, *optional*, defaults to `0.95`):
            Level of the bootstrap intervals.
        seed (`int`, *optional*, defaults to `0`):
            Seed of torch (generation is greedy, hence deterministic anyway) and of the bootstrap.
        reference (`str`, *optional*):
            Label of a fine-tuned model (e.g. `gt`) that every other fine-tuned model is compared with: share of its
            target gain kept and of its non-target degradation avoided ([`~trl_pplmask.evaluation.reference_arm`]).
        backend (`str`, *optional*, defaults to `"builtin"`):
            `builtin` or `lm-eval` (see [`trl_pplmask.evaluation`]): with `lm-eval`, `gsm8k` and `arc_challenge_mc`
            run through lm-evaluation-harness and the other tasks builtin; a missing or failing lm-eval is an error.
        cache_dir (`str`, *optional*):
            Where per-(model, task) results are cached; defaults to `<TRL_PPLMASK_CACHE>/eval`.
        use_cache (`bool`, *optional*, defaults to `True`):
            Reuse cached results (and write new ones).
        show_progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.
    """

    # The help strings are `trl-pplmask eval`'s (its options are these fields, see `trl_pplmask.commands._args`)
    tasks: list[str] = field(
        default_factory=lambda: list(DEFAULT_TASKS),
        metadata={"help": f"Comma-separated: {available_tasks()}.", "type": comma_separated},
    )
    target: str | None = field(
        default=None, metadata={"help": "The fine-tuning task, one of --tasks (default: the first)."}
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate the first N items of each task."})
    splits: dict[str, str] = field(default_factory=dict, metadata={"option": None})  # --split DATASET=SPLIT, repeated
    max_new_tokens: int = field(default=512, metadata={"help": "Generation budget per answer."})
    instruction_max_new_tokens: int = field(
        default=192, metadata={"help": "Budget of the instruction_following answers."}
    )
    drift_max_new_tokens: int = field(
        default=96, metadata={"help": "Budget of the base answers scored by <task>_drift."}
    )
    max_tokens_per_batch: int | None = field(
        default=None, metadata={"help": "Token budget of a batch (default: by device)."}
    )
    max_batch_size: int = field(default=64, metadata={"help": "Most prompts per generation batch."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, cuda:1, ... (default: CUDA when available)."}
    )
    nll_max_length: int = field(default=2048, metadata={"help": "max_length of the <task>_nll tokenization."})
    code_timeout: float = field(default=10.0, metadata={"help": "Seconds per sandboxed code test."})
    n_resamples: int = field(
        default=1000, metadata={"help": "Bootstrap resamples of the intervals.", "option": "--bootstrap"}
    )
    confidence: float = field(default=0.95, metadata={"help": "Level of the bootstrap intervals."})
    seed: int = field(default=0, metadata={"help": "Seed of torch and of the bootstrap (default: 0)."})
    reference: str | None = field(
        default=None,
        metadata={
            "help": "A fine-tuned model (e.g. gt) the others are compared with: share of its target gain kept and of "
            "its non-target degradation avoided.",
            "metavar": "LABEL",
        },
    )
    backend: str = field(
        default="builtin",
        metadata={
            "help": "builtin: the paper's prompts, offline, sandboxed code. lm-eval: lm-evaluation-harness's own "
            "gsm8k and arc_challenge tasks for gsm8k and arc_challenge_mc (harness prompts; data from "
            "TRL_PPLMASK_DATA_DIR when set, else the Hub; an lm-eval failure is an error), builtin for the rest (the "
            "report names each task's backend).",
            "choices": BACKENDS,
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Result cache (default: <TRL_PPLMASK_CACHE>/eval)."})
    use_cache: bool = field(
        default=True, metadata={"help": "Neither read nor write cached results.", "option": "--no-cache"}
    )
    show_progress: bool = field(default=True, metadata={"option": None})

    def __post_init__(self):
        self.tasks = list(dict.fromkeys(self.tasks))  # a task named twice is evaluated once
        if not self.tasks:
            raise ValueError("No task to evaluate; pass at least one task name.")
        for name in self.tasks:
            resolve_task(name, self.splits)
        if self.target is None:
            self.target = self.tasks[0]
        if self.target not in self.tasks:
            raise ValueError(
                f"The target task {self.target!r} is not among the evaluated tasks {self.tasks}; add it to the tasks."
            )
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, got {self.limit}.")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}.")
        if self.instruction_max_new_tokens <= 0:
            raise ValueError(f"instruction_max_new_tokens must be positive, got {self.instruction_max_new_tokens}.")
        if self.drift_max_new_tokens <= 0:
            raise ValueError(f"drift_max_new_tokens must be positive, got {self.drift_max_new_tokens}.")
        for name, flag in (
            ("max_batch_size", "--max-batch-size"),
            ("nll_max_length", "--nll-max-length"),
            ("n_resamples", "--bootstrap"),
            ("max_tokens_per_batch", "--max-tokens-per-batch"),
            ("code_timeout", "--code-timeout"),
        ):
            value = getattr(self, name)
            if value is not None and not value > 0:  # NaN is refused too
                raise ValueError(f"{name} ({flag}) must be positive, got {value}.")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(
                f"confidence (--confidence) is the level of the bootstrap intervals and must lie strictly between 0 "
                f"and 1, got {self.confidence}; use e.g. 0.95 for 95% intervals."
            )
        if isinstance(self.dtype, str) and self.dtype not in DTYPES:  # a torch.dtype is accepted too
            raise ValueError(f"Unknown dtype {self.dtype!r} (--dtype); use one of {', '.join(DTYPES)}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown backend {self.backend!r}; use 'builtin' or 'lm-eval'.")
        unknown = sorted(set(self.splits) - set(TASKS))
        if unknown:
            raise ValueError(f"Splits given for unknown data sets {unknown}; data sets are {sorted(TASKS)}.")


@dataclass(frozen=True)
class ModelSpec:
    """A model in the report.

    Args:
        label (`str`): Row name in the report.
        name_or_path (`str`): Hub id, local path or the embedded alias of the (base) model.
        adapter (`str`, *optional*): PEFT adapter loaded on top of `name_or_path`.
        is_base (`bool`, *optional*, defaults to `False`): The reference the others are compared with.
    """

    label: str
    name_or_path: str
    adapter: str | None = None
    is_base: bool = False


def parse_model_arg(value: str) -> tuple[str | None, str]:
    """Split `LABEL=PATH` into `(label, path)`; a value without a plain `LABEL=` prefix is `(None, value)`."""
    label, sep, rest = value.partition("=")
    if sep and label and rest and all(c.isalnum() or c in "-_." for c in label):
        return label, rest
    return None, value


def build_model_specs(
    base: str, adapters: Sequence[str] = (), models: Sequence[str] = (), base_label: str = "base"
) -> list[ModelSpec]:
    """The base model first, then one spec per adapter (on the base) and per full model.

    Args:
        base (`str`): The base model.
        adapters (`Sequence[str]`): `PATH` or `LABEL=PATH` of PEFT adapters trained on `base`.
        models (`Sequence[str]`): `PATH` or `LABEL=PATH` of full fine-tuned models.
        base_label (`str`, *optional*, defaults to `"base"`): Label of the base model.
    """
    specs = [ModelSpec(base_label, base, None, True)]
    for value in adapters:
        label, path = parse_model_arg(value)
        specs.append(ModelSpec(label or model_slug(path) or path, base, path))
    for value in models:
        label, path = parse_model_arg(value)
        specs.append(ModelSpec(label or model_slug(path) or path, path))
    labels = [s.label for s in specs]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ValueError(f"Model labels {duplicated} are used twice; name the models with LABEL=PATH.")
    for spec in specs:
        _check_adapter_base(spec)
    return specs


def _check_adapter_base(spec: ModelSpec) -> None:
    """Fail before any evaluation when an adapter cannot be read or was trained on another model (`load_model`
    checks the loaded model again)."""
    if spec.adapter is None:
        return
    from peft import PeftConfig  # imports torch: kept lazy, so that `eval --help` stays light

    try:
        adapter_config = PeftConfig.from_pretrained(spec.adapter)
    except Exception as exc:  # missing folder, no adapter_config.json, unreachable Hub id
        raise ValueError(
            f"Cannot read the adapter {spec.adapter!r} ({type(exc).__name__}: {exc}). Pass a folder written by "
            "`save_pretrained` of a PEFT model (it holds adapter_config.json), or a Hub adapter id."
        ) from exc
    expected = adapter_config.base_model_name_or_path
    candidates = {model_slug(spec.name_or_path), model_slug(resolve_model_path(spec.name_or_path))}
    if expected and model_slug(expected) not in candidates:
        raise ValueError(
            f"The adapter {spec.adapter!r} was trained on {expected!r}, not on the base model {spec.name_or_path!r}. "
            "Pass its own base with --base, or evaluate it in a separate report."
        )


__all__ = ["EvalConfig", "ModelSpec", "build_model_specs", "parse_model_arg"]
