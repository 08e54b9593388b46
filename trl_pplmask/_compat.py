"""Private names of other packages that trl-pplmask borrows, in one place, with the versions they were checked against.

A TRL release that moves or changes one of these breaks only this file; the rest of the package imports from here.
"""

from __future__ import annotations

# trl 1.16: how `SFTTrainer.__init__` (and so `trl sft`) loads a model from a path, with `SFTConfig.model_init_kwargs`
# (dtype strings, CPU-aware `device_map`). Not exported from `trl`'s top level.
from trl.trainer.utils import create_model_from_path  # noqa: E402


__all__ = ["create_model_from_path"]
