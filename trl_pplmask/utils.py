"""File and environment helpers shared by every command: atomic writes, staging folders, package versions.

Standard library only, so that any layer may use it without import cost.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write a file through `write(binary_file)` so that a reader (or a crash) never sees a half-written one.

    The file is written under a fresh hidden name in the same folder and renamed over `path`. It is created as `open()`
    creates files (mode 0666 less the umask), not 0600 as `tempfile.mkstemp` would, so that every output file of one
    command has the same permissions. Missing parent folders are created.

    Args:
        path (`str` or `os.PathLike`):
            File to write.
        write (`Callable`):
            Writes the whole content into the open binary file it is given (e.g. `lambda f: np.savez(f, **arrays)`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically ([`atomic_write`]), UTF-8, newlines as given, secrets redacted
    ([`redact_text`]): the package writes its records and cards through here, some of which get published.

    Args:
        path (`str` or `os.PathLike`):
            File to write.
        text (`str`):
            Its whole content.
    """
    data = redact_text(text).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def json_safe(value: Any) -> Any:
    """`value` as strict JSON can hold it, for the records the package writes: NaN and infinities become `None`
    (JSON has no such numbers), tuples become lists, mapping keys strings, and anything else JSON lacks its `str`.

    Args:
        value (`Any`): Settings, statistics or a record made of them.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


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
        try:
            os.replace(target, trash / target.name)
        except OSError:
            shutil.rmtree(trash, ignore_errors=True)  # nothing moved: no empty `.<name>-old-*` folder left
            raise
        try:
            os.replace(source, target)
        except OSError:
            os.replace(trash / target.name, target)  # the old one back (were this to fail, the trash keeps it)
            shutil.rmtree(trash, ignore_errors=True)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, target)


def check_writable(folder: str | os.PathLike, what: str, fix: str = "Choose a writable folder") -> None:
    """Refuse, before any work, a folder that this process cannot create files in: `folder` itself or, when it does
    not exist yet, the nearest folder above it that does (where it would be created).

    Tried by creating (and removing) a file, so that read-only mounts, ACLs and root all answer as a real write would.

    Args:
        folder (`str` or `os.PathLike`): The folder that will be written.
        what (`str`): How the error names it (`--output-dir out`, `the score cache ~/.cache/trl_pplmask`).
        fix (`str`, *optional*): What to do instead, in the error.
    """
    existing = Path(folder).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, not a folder; choose another path.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".trl-pplmask-write-test-", dir=existing)
    except OSError as err:
        raise ValueError(
            f"{what} cannot be written: creating a file in {existing} failed ({err.strerror or err}). {fix}, or "
            "fix its permissions (nothing was done)."
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_utf8(path: str | os.PathLike) -> None:
    """Refuse a text file that is not UTF-8, naming the line, column and byte offset of the first bad byte (loaders
    that accept such bytes fail later, while tokenizing, without saying where)."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                column = len(line[: err.start].decode("utf-8")) + 1
                raise ValueError(
                    f"{path} is not UTF-8: line {number}, column {column} (byte offset {offset + err.start}) holds "
                    f"the byte 0x{line[err.start]:02x} ({err.reason}). Save the file as UTF-8 (e.g. `iconv -f latin1 "
                    "-t utf-8`)."
                ) from None
            offset += len(line)


# A YAML 1.2 float that YAML 1.1 (PyYAML) reads as a string: an exponent without a dot or without a sign (`1e-4`,
# `1.0e9`); the 1.1 forms keep their own resolver
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")


def read_yaml(path: str | os.PathLike, what: str | None = None):
    """Parse a YAML file of settings: safely (no tag builds an object), `1e-4` and `1.0e9` as numbers (YAML 1.2), and
    every problem one `ValueError` naming the file, line and column.

    Args:
        path (`str` or `os.PathLike`): The YAML file.
        what (`str`, *optional*): How the error names the file (`--config recipe.yaml`); defaults to the path.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: not UTF-8, not valid YAML, or a tag such as `!!python/object` (tags are not allowed).
    """
    import yaml

    class SettingsLoader(yaml.SafeLoader):
        pass

    SettingsLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))
    where = what or str(path)
    check_utf8(path)
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=SettingsLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
            at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            if isinstance(err, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
                tag = problem.rpartition("tag ")[2].strip("'").replace("tag:yaml.org,2002:", "!!")
                raise ValueError(
                    f"{where}{at}: the tag {tag} is not allowed (YAML tags are not allowed in settings; nothing was "
                    "run). Write a plain value (a string, number, list or mapping)."
                ) from None
            raise ValueError(f"{where}{at} is not valid YAML: {problem}. Fix the file there.") from None


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


# --------------------------------------------------------------------------------------------------------------------
# Redaction: no secret reaches a file the package writes (records, cards, study files), which may be published
# --------------------------------------------------------------------------------------------------------------------
REDACTED = "<redacted>"
# Setting names that hold secrets: `hub_token`, `HF_TOKEN`, `api_key`, `wandb_api_key`, `password`, `client_secret`
# (a name whose last word is `token`; `pad_token`, `max_new_tokens` and `token_nll` name no secret)
_SECRET_LAST_WORDS = {"token", "apikey", "password", "passwd", "secret", "credentials"}
_SECRET_PARTS = ("secret", "password", "passwd", "api_key", "apikey", "credential")
_NOT_SECRET_NAMES = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}
# Values that are secrets whatever their setting is called: Hugging Face access tokens
SECRET_VALUE_PATTERN = re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{20,}")
# `--hub_token X`, `--hub-token=X` in a recorded command line (a flag starts a word: `pad-token 5` in prose is no flag)
_SECRET_FLAG_PATTERN = re.compile(r"(?<![\w-])(--?([A-Za-z][\w-]*))(=|[ \t]+)(\"[^\"]*\"|'[^']*'|[^\s,;)\]}]+)")
# Flag values that are no secret: an option, a placeholder (`<token>`), an environment variable (`$HF_TOKEN`)
_NOT_SECRET_VALUE_START = ("-", "<", "$", "%", "{{")


def is_secret_name(name: str) -> bool:
    """Whether a setting called `name` holds a secret (`hub_token`, `api_key`, `HF_TOKEN`, `db-password`, ...).

    Args:
        name (`str`):
            A setting name, any case, words separated by `_` or `-`.
    """
    lowered = str(name).lower().replace("-", "_")
    if lowered in _NOT_SECRET_NAMES:
        return False
    return lowered.split("_")[-1] in _SECRET_LAST_WORDS or any(part in lowered for part in _SECRET_PARTS)


def redact_text(text: str) -> str:
    """`text` with every Hugging Face token (`hf_...`) and every value of a secret command-line flag replaced by
    [`REDACTED`]."""

    def flag(match: re.Match) -> str:
        value = match.group(4).strip("\"'")
        # argparse's metavar (`--hub_token HUB_TOKEN` in a usage line or a help text) names the flag, it is no value
        metavar = match.group(2).upper().replace("-", "_").lstrip("_")
        if not is_secret_name(match.group(2)) or not _is_secret_value(value) or value.strip("[]") == metavar:
            return match.group(0)
        return f"{match.group(1)}{match.group(3)}{REDACTED}"

    return SECRET_VALUE_PATTERN.sub(REDACTED, _SECRET_FLAG_PATTERN.sub(flag, text))


def _is_secret_value(value: str) -> bool:
    return bool(value) and value not in ("None", "null") and not value.startswith(_NOT_SECRET_VALUE_START)


def redact(value):
    """A copy of `value` (JSON-like: dicts, lists, strings, numbers) in which no secret remains: the value of every
    key that [`is_secret_name`] (unless unset) and every `hf_...` token inside strings become [`REDACTED`].

    This is the one redaction step of everything the package records: `pplmask_config.json`, study files, build
    records and cards ([`atomic_write_text`] also applies [`redact_text`] to every file it writes).

    Args:
        value:
            The record to write.
    """
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if is_secret_name(k) and v not in (None, "", False) else redact(v)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        # An argv list: `["--hub_token", "abc"]` hides the value that follows a secret flag
        out = [redact(v) for v in value]
        for i in range(1, len(out)):
            before, item = value[i - 1], value[i]
            if isinstance(before, str) and isinstance(item, str) and re.fullmatch(r"--?[A-Za-z][\w-]*", before):
                if is_secret_name(before.lstrip("-")) and _is_secret_value(item):
                    out[i] = REDACTED
        return out
    if isinstance(value, str):
        return redact_text(value)
    return value


# --------------------------------------------------------------------------------------------------------------------
# One writer per output: an advisory lock (fcntl) beside (or inside) the output folder
# --------------------------------------------------------------------------------------------------------------------
class OutputLockedError(OSError):
    """Another process holds the lock of an output folder."""


class OutputLock:
    """Exclusive advisory lock (`fcntl.flock`) on an output, held by one process until it exits or releases it.

    The lock file is `.<name>.lock` beside the output (outputs are swapped in whole, so the lock cannot live inside
    them), or `.lock` inside it with `inside=True` (a study's `output_dir`, which is never swapped). It holds the
    holder's PID, so that a second writer is refused with a message naming it. The operating system releases the lock
    when the holder dies (even by SIGKILL), so a stale lock file never blocks a rerun.

    Args:
        output (`str` or `os.PathLike`):
            The output folder (or file) to protect.
        inside (`bool`, *optional*, defaults to `False`):
            Put the lock file inside `output` (created if missing) instead of beside it.
        what (`str`, *optional*, defaults to `"output"`):
            Word for the output in the error message (e.g. `"study output_dir"`).
    """

    def __init__(self, output: str | os.PathLike, inside: bool = False, what: str = "output"):
        self.output = Path(output).expanduser().absolute()
        self.inside = inside
        self.what = what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        if self.inside:
            return self.output / ".lock"
        return self.output.parent / f".{self.output.name or 'output'}.lock"

    def acquire(self) -> OutputLock:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:  # a read-only or missing place: said before any work, not as a bare errno
            raise PermissionError(
                f"The {self.what} {self.output} cannot be written: creating its lock file {self.path} failed "
                f"({err.strerror or err}). Choose a writable folder, or fix its permissions (nothing was done)."
            ) from None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputLockedError(
                    f"The {self.what} {self.output} is being written by another process (PID {holder}, lock file "
                    f"{self.path}). Wait for it to finish, or write to another folder; two writers would overwrite "
                    "each other's files."
                ) from None
            try:  # the holder before us may have removed the file on release: lock the file that is there now
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:  # a full disk: the lock file is ours (locked), so it goes, and nothing is left beside
            os.unlink(self.path)
            os.close(fd)
            raise OSError(
                f"The {self.what} {self.output} cannot be written: recording this process in its lock file "
                f"{self.path} failed ({err.strerror or err}). Free space there or choose another folder (nothing was "
                "done)."
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (no stray file is left beside the output) and release the lock."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------------------------
# Content hashes of files, memoised: caches keyed on full content without rereading unchanged weight files
# --------------------------------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike, memo_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 of every byte of the file at `path`, remembered in `memo_dir` by the file's path, size, mtime, ctime and
    inode, so that an unchanged weight file is read once (a change of any of them, which every write makes, hashes it
    again).

    Args:
        path (`str` or `os.PathLike`):
            The file.
        memo_dir (`str` or `os.PathLike`, *optional*):
            Folder of remembered hashes (one small JSON file per hashed file); `None` always hashes.
    """
    import hashlib
    import json

    path = Path(path).absolute()
    stat = path.stat()
    identity = [str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    memo = None
    if memo_dir is not None:
        memo = Path(memo_dir) / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
        try:
            entry = json.loads(memo.read_text())
            if entry.get("identity") == identity and isinstance(entry.get("sha256"), str):
                return entry["sha256"]
        except (OSError, ValueError, AttributeError):  # none yet, or unreadable: hash again
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo, json.dumps({"identity": identity, "sha256": digest}))
        except OSError:  # a read-only cache only costs the next run a reread
            pass
    return digest
