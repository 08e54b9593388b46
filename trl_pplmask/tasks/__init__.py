"""The task registry: everything the project knows about a task, one file per task.

Each module of this package that defines a module-level `TASK` ([`Task`]) is registered when the package is first
imported, in the order of `BUILTIN` (then any other module, alphabetically). The data loaders, the verifiers,
self-output generation, the forgetting report and the dataset cards all read tasks from here, so adding a task is
adding one file. Tasks defined elsewhere (a user's package, a test) join with [`register_task`].

Importing this package imports the standard library only.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from .base import Row, RowFormatError, Task, chat_pair, row_field


# Built-in tasks in the order they are listed everywhere (help texts, error messages, `DATASETS`)
BUILTIN = ("gsm8k", "mbpp", "math", "arc_challenge", "humaneval")
_NOT_TASKS = {"base", "code"}

TASKS: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add `task` to the registry, so that every command and function that takes a task name accepts it.

    Args:
        task (`Task`):
            The task.
        replace (`bool`, *optional*, defaults to `False`):
            Replace a registered task of the same name instead of refusing it.

    Returns:
        `Task`: `task`, so that a module can write `TASK = register_task(Task(...))`.
    """
    if not isinstance(task, Task):
        raise TypeError(f"register_task needs a trl_pplmask.tasks.Task, got {type(task).__name__}.")
    if task.name in TASKS and not replace and TASKS[task.name] is not task:
        raise ValueError(f"A task named {task.name!r} is already registered; pass replace=True to replace it.")
    TASKS[task.name] = task
    return task


def unregister_task(name: str) -> None:
    """Remove a task added with [`register_task`] (tests use it to leave the registry as they found it)."""
    TASKS.pop(name, None)


def get_task(name: str) -> Task:
    """The registered [`Task`] called `name`; an unknown name is a `ValueError` that suggests the closest one."""
    task = TASKS.get(name)
    if task is None:
        close = difflib.get_close_matches(str(name), list(TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"Unknown task {name!r}{hint}; choose one of {', '.join(TASKS)}.")
    return task


def task_names() -> list[str]:
    """Names of the registered tasks, built-in ones first."""
    return list(TASKS)


def _discover() -> None:
    found = {info.name for info in pkgutil.iter_modules(__path__)} - _NOT_TASKS
    for name in [*BUILTIN, *sorted(found - set(BUILTIN))]:
        task = getattr(importlib.import_module(f".{name}", __name__), "TASK", None)
        if task is not None:
            register_task(task)


_discover()

__all__ = [
    "BUILTIN",
    "TASKS",
    "Row",
    "RowFormatError",
    "Task",
    "chat_pair",
    "get_task",
    "register_task",
    "row_field",
    "task_names",
    "unregister_task",
]
