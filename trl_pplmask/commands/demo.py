"""`trl-pplmask demo`: score, mask and fine-tune the embedded model on GSM8K, on CPU (see `trl_pplmask.demo`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ._args import output_dir_field
from ._command import Command


HELP = "Score, mask and fine-tune the embedded model on GSM8K, on CPU."
DESCRIPTION = (
    "Score and mask GSM8K rows with the embedded model, save the masked dataset, then train a few LoRA steps with "
    "SFTTrainer and PplMaskCollator, on CPU and offline."
)


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of `trl-pplmask demo`, one command-line option each (`num_examples` is `--num-examples`).

    Parameters:
        output (`str`): Folder of the demo's outputs (the masked dataset and the adapter).
        num_examples (`int`): First N GSM8K training rows.
        max_steps (`int`): LoRA training steps with `SFTTrainer` and `PplMaskCollator`.
    """

    output: str = output_dir_field("Folder for the demo's outputs (default: demo_output).", default="demo_output")
    num_examples: int = field(default=64, metadata={"help": "GSM8K rows used (default: 64)."})
    max_steps: int = field(default=10, metadata={"help": "LoRA training steps (default: 10)."})


def run(config: DemoConfig) -> int:
    from ..demo import run_demo

    return run_demo(output_dir=config.output, num_examples=config.num_examples, max_steps=config.max_steps)


COMMAND = Command(name="demo", help=HELP, description=DESCRIPTION, config_class=DemoConfig, run=run)
register_cli, make_parser, main = COMMAND.register_cli, COMMAND.make_parser, COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
