"""`trl-pplmask push` (and `hub_scripts/push.py`): upload a built folder to a Hub dataset repo, or list it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..hub.publish import PushError, push_folder
from ._command import Command


HELP = "Upload a built folder to a Hub dataset repo (or --dry-run)."
PROG = "trl-pplmask push"


@dataclass(kw_only=True)
class PushConfig:
    """Settings of `trl-pplmask push`: the folder (positional), then one option each (`repo_id` is `--repo-id`);
    they are the arguments of [`~trl_pplmask.hub.push_folder`]."""

    folder: str = field(metadata={"help": "Folder written by `trl-pplmask build`.", "positional": True})
    repo_id: str | None = field(
        default=None, metadata={"help": "org/name of the dataset repo (default: the --repo-id of the build)."}
    )
    private: bool | None = field(default=None, metadata={"help": "Create the repo as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created when missing)."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or `hf auth login`)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})
    dry_run: bool = field(default=False, metadata={"help": "List the files and sizes that would be uploaded."})


def run(config: PushConfig, prog: str = PROG) -> int:
    """Push a built folder; a failed push prints why and returns 1."""
    try:
        result = push_folder(
            config.folder,
            repo_id=config.repo_id,
            private=config.private,
            revision=config.revision,
            create_pr=config.create_pr,
            token=config.token,
            dry_run=config.dry_run,
            commit_message=config.commit_message,
        )
    except PushError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    if not config.dry_run:
        url = getattr(result, "commit_url", None) or getattr(result, "pr_url", None) or result
        print(f"Pushed {config.folder}: {url}")
    return 0


COMMAND = Command(name="push", help=HELP, config_class=PushConfig, run=run, pass_prog=True)
register_cli, make_parser, main = COMMAND.register_cli, COMMAND.make_parser, COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
