"""`evaluate` modules shipped with trl-pplmask; load them by path, offline (see `trl_pplmask.evaluation`)."""

from pathlib import Path


FORGETTING_METRIC = str(Path(__file__).resolve().parent / "forgetting")
"""Path of the forgetting metric's folder, for `evaluate.load(FORGETTING_METRIC)`."""
