"""File and environment helpers shared by every command: atomic writes, staging folders, package versions.

Standard library only, so that any layer may use it without import cost.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import import_module
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that a reader (or a crash) never sees a half-written file.

    The file is written under a fresh hidden name in the same folder and renamed over `path`. It is created as `open()`
    creates files (mode 0666 less the umask), not 0600 as `tempfile.mkstemp` would, so that every output file of one
    command has the same permissions. Missing parent folders are created.

    Args:
        path (`str` or `os.PathLike`):
            File to write.
        text (`str`):
            Its whole content (UTF-8, newlines written as given).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_stale(entry: Path, marker: str) -> bool:
    """Whether `entry` (named `.<name>-<marker>-<pid>-...`) was left by a process that no longer runs.

    Args:
        entry (`Path`):
            A staging or trash folder created by [`make_staging_dir`].
        marker (`str`):
            The word between the name and the pid, e.g. `"staging"`.
    """
    try:
        pid = int(entry.name.split(f"-{marker}-", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return pid == os.getpid()


def make_staging_dir(output: Path, marker: str = "staging") -> Path:
    """A new folder `.<name>-<marker>-<pid>-*` beside `output`, after removing those that dead processes left.

    A command killed (SIGKILL, power loss) before its cleanup leaves its staging folder; the pid in the name lets the
    next run recognise and remove it without touching the folder of a run still in progress.

    Args:
        output (`Path`):
            The final output path; the staging folder is created in its parent, so that `os.replace` can swap it in.
        marker (`str`, *optional*, defaults to `"staging"`):
            Word that tells staging folders from other hidden siblings.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    for entry in output.parent.glob(f".{output.name}-{marker}-*"):
        if entry.is_dir() and is_stale(entry, marker):
            shutil.rmtree(entry, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}-{marker}-{os.getpid()}-", dir=output.parent.resolve()))


def swap_in(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing whatever `target` holds.

    The old `target` is first renamed out of the way (under a hidden name beside it) and deleted only once `source`
    stands in its place, so that `target` never holds a mix of old and new files.
    """
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-{os.getpid()}-", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(source, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, target)


def package_version(name: str) -> str | None:
    """Installed version of the distribution `name`, or `None` when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Python, the platform, and the installed version of each distribution in `names` (`None`: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    versions.update({name: package_version(name) for name in names})
    return versions


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for a package whose public names are imported from its modules on first use.

    PEP 562: `import package` then costs nothing, and `package.name` (or `from package import name`) imports only the
    module that defines `name`, once; the value is then stored in the package, so later lookups are plain attributes.

    Args:
        package (`str`):
            The package's `__name__`.
        exports (`Mapping[str, str]`):
            Public name -> module of the package that defines it (relative, without the leading dot).
    """

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__


# --------------------------------------------------------------------------------------------------------------------
# Batch planning: group examples greedily in a given order while a batch still fits its budget
# --------------------------------------------------------------------------------------------------------------------
def greedy_batches(order: Iterable[int], fits: Callable[[list[int], int], bool]) -> list[list[int]]:
    """Cut `order` into consecutive batches: an index joins the current batch while `fits(batch, index)` holds.

    The first index of a batch always joins it, so an example larger than any budget runs alone rather than never.

    Args:
        order (`Iterable[int]`):
            Example indices in the order they are taken (sorting by length keeps the padding small).
        fits (`Callable[[list[int], int], bool]`):
            Whether `index` may join the non-empty `batch`.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and not fits(current, i):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def make_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[list[int]]:
    """Group example indices into batches whose padded size (`len(batch) * longest`) fits the token budget.

    Examples are taken longest first, so each batch's first example sets its padded length.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return greedy_batches(order, lambda batch, i: (len(batch) + 1) * lengths[batch[0]] <= max_tokens_per_batch)


def plan_batches(
    lengths: Sequence[int], batch_size: int, num_samples: int, max_new_tokens: int, max_tokens: int | None
) -> list[list[int]]:
    """Group row indices into generation batches, shortest prompts first, so that little of a batch is padding.

    A batch holds at most `batch_size` prompts and, with `max_tokens`, at most that many tokens once expanded and
    generated (`prompts * num_samples * (longest prompt + max_new_tokens)`); a prompt over the budget runs alone.
    """

    def fits(batch: list[int], i: int) -> bool:
        # Ascending order: the newest prompt is the longest of the batch
        size = (len(batch) + 1) * num_samples * (lengths[i] + max_new_tokens)
        return len(batch) < batch_size and (max_tokens is None or size <= max_tokens)

    return greedy_batches(sorted(range(len(lengths)), key=lambda i: (lengths[i], i)), fits)


# --------------------------------------------------------------------------------------------------------------------
# Termination requests: SIGTERM is turned into an exception (commands/_run.py), but an exception raised by a signal
# handler is swallowed when it lands inside a finalizer (`__del__`, a weakref callback: "Exception ignored in ..."), so
# the step that makes an output visible checks the request once more before it does
# --------------------------------------------------------------------------------------------------------------------
_termination_signal: int | None = None


def request_termination(signum: int) -> None:
    """Record that the process was asked to stop (by signal `signum`)."""
    global _termination_signal
    _termination_signal = signum


def raise_if_termination_requested() -> None:
    """Exit with status 128 + signal if a termination was requested: called right before an output is swapped in."""
    if _termination_signal is not None:
        raise SystemExit(128 + _termination_signal)
