"""Running many programs through a bounded pool of workers (`SandboxPool`, `run_many`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from .config import SandboxConfig, SandboxResult
from .run import run_code


def default_workers() -> int:
    """Default size of the worker pool: one sandbox per CPU core, at most 32."""
    return max(1, min(32, os.cpu_count() or 1))


class SandboxPool:
    """A bounded pool of worker threads, each running one sandboxed program at a time.

    Threads suffice: a worker only waits on its subprocess. The pool bounds how many programs run at once.

    Args:
        config (`SandboxConfig`, *optional*): Limits and isolation of every run.
        max_workers (`int`, *optional*): Programs run at once; defaults to `default_workers()`.

    Example:
    ```python
    with SandboxPool(SandboxConfig(timeout=5), max_workers=4) as pool:
        results = pool.map(["assert 1 + 1 == 2", "while True: pass"])
    ```
    """

    def __init__(self, config: SandboxConfig | None = None, max_workers: int | None = None):
        if max_workers is not None and max_workers <= 0:
            raise ValueError(f"max_workers must be positive, got {max_workers}.")
        self.config = config or SandboxConfig()
        self.max_workers = max_workers or default_workers()
        self._executor = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="trl-pplmask-sandbox")

    def submit(self, code: str, **kwargs) -> Future[SandboxResult]:
        """Schedule `run_code(code, self.config, **kwargs)`."""
        return self._executor.submit(run_code, code, self.config, **kwargs)

    def map(self, codes: Iterable[str], **kwargs) -> list[SandboxResult]:
        """Run all `codes` and return their results in the same order."""
        futures = [self.submit(code, **kwargs) for code in codes]
        return [future.result() for future in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def run_many(
    codes: Iterable[str], config: SandboxConfig | None = None, *, max_workers: int | None = None, **kwargs
) -> list[SandboxResult]:
    """Run many programs through a bounded `SandboxPool`; results come back in input order.

    Args:
        codes (`Iterable[str]`): Python sources.
        config (`SandboxConfig`, *optional*): Limits and isolation of every run.
        max_workers (`int`, *optional*): Programs run at once; defaults to `default_workers()`.
        **kwargs: Passed to `run_code` (`run_name`, `require_completion`).

    Returns:
        `list[SandboxResult]`
    """
    with SandboxPool(config, max_workers) as pool:
        return pool.map(codes, **kwargs)
