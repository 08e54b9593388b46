"""The forgetting metric; `forgetting.py` is the `evaluate` module, importable as a plain module too."""
