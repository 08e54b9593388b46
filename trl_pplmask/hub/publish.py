"""Publishing a built folder: `trl-pplmask push` uploads it to a Hub dataset repo, or lists what it would send."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from .folder import BUILD_INFO_FILE, check_build_infos, check_listed_files, read_build_infos


logger = logging.getLogger(__name__)


class PushError(RuntimeError):
    """A push that could not be completed; the message says why and what to do. The local folder is untouched."""


def list_upload_files(folder: str | Path) -> list[tuple[str, int]]:
    """`(path in repo, size in bytes)` of every file `upload_folder` would send, in its order.

    Uses the same listing and default ignore patterns (`.git`, `.cache/huggingface`) as `HfApi.upload_folder`.
    """
    from huggingface_hub.utils import filter_repo_objects

    from .._compat import hub_default_ignore_patterns

    root = Path(folder).expanduser().resolve()
    files = {p.relative_to(root).as_posix(): p for p in sorted(root.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(files.keys(), ignore_patterns=list(hub_default_ignore_patterns))
    return [(path, files[path].stat().st_size) for path in kept]


def _human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _check_built_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; build it first with `trl-pplmask build`.")
    infos = read_build_infos(folder)
    if not (folder / "README.md").is_file() or not infos:
        raise ValueError(
            f"{folder} is not a built pplmasked folder (no README.md or no {BUILD_INFO_FILE}); build it with "
            "`trl-pplmask build` first."
        )
    check_build_infos(folder, infos)
    check_listed_files(folder, infos)
    _check_card_header(folder, infos)


def _check_card_header(folder: Path, infos: dict[str, dict[str, Any]]) -> None:
    """The card's YAML header parses and lists every built config (the Hub and `load_dataset` read the configs from
    it); name what is wrong."""
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    card = folder / "README.md"
    fix = (
        "Restore the header, or rebuild a config into the folder (`trl-pplmask build --output-dir "
        f"{folder} ...`), which renders the card again."
    )
    match = REGEX_YAML_BLOCK.search(card.read_text(encoding="utf-8", errors="replace"))
    if match is None:
        raise ValueError(f"{card} has no YAML header (a block between '---' lines at the top). {fix}")
    try:
        header = yaml.safe_load(match.group(2))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 2}" if mark is not None else ""
        problem = getattr(err, "problem", None) or err
        raise ValueError(f"{card}: its YAML header is not valid YAML{where} ({problem}). {fix}") from None
    configs = header.get("configs") if isinstance(header, dict) else None
    listed = {c.get("config_name") for c in configs if isinstance(c, dict)} if isinstance(configs, list) else set()
    unlisted = sorted(set(infos) - listed)
    if unlisted:
        raise ValueError(f"{card}: its YAML header does not list the config(s) {unlisted} under `configs:`. {fix}")


def default_repo_id(folder: str | Path) -> str | None:
    """The repo id the folder was built for (`BuildConfig.repo_id` of its latest build), if any."""
    infos = read_build_infos(Path(folder))
    if not infos:
        return None
    return max(infos.values(), key=lambda info: info["built_at"])["settings"].get("repo_id")


def push_folder(
    folder: str | Path,
    repo_id: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    dry_run: bool = False,
    commit_message: str | None = None,
) -> Any:
    """Upload a built folder to a Hub dataset repo (`create_repo(exist_ok=True)` + `upload_folder`).

    Args:
        folder (`str` or `Path`): A folder written by [`~trl_pplmask.hub.build_pplmasked`].
        repo_id (`str`, *optional*): `org/name` of the dataset repo; defaults to the one the folder was built for.
        private (`bool`, *optional*): Visibility of a newly created repo (an existing repo keeps its own).
        revision (`str`, *optional*): Branch to push to; created from the default branch when missing.
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing.
        token (`str`, *optional*): Hub token; defaults to `HF_TOKEN` or the token saved by `hf auth login`.
        dry_run (`bool`, *optional*, defaults to `False`): Print the files and their sizes; send nothing.
        commit_message (`str`, *optional*): Commit message.

    Returns:
        The list of `(path, size)` for a dry run, else the `CommitInfo` of the upload.

    Raises:
        PushError: no token, no network, or the Hub rejected the request. Nothing local is changed.
    """
    folder = Path(folder).expanduser()
    _check_built_folder(folder)
    repo_id = repo_id or default_repo_id(folder)
    if not repo_id:
        raise ValueError("No repo id: pass --repo-id org/name (or build with --repo-id).")
    check_repo_id(repo_id)
    built_for = default_repo_id(folder)
    if built_for and built_for != repo_id:
        logger.warning(
            "The card's usage snippets name %s, not %s; rebuild with --repo-id %s.", built_for, repo_id, repo_id
        )
    if create_pr and revision:
        raise ValueError("--create-pr opens a pull request against the default branch; drop --revision.")
    files = list_upload_files(folder)
    if dry_run:
        target = (
            f"{repo_id} (dataset" + (f", revision {revision}" if revision else "") + (", as a PR" if create_pr else "")
        )
        print(f"Dry run: would upload {len(files)} files ({_human_size(sum(s for _, s in files))}) to {target})")
        for path, size in files:
            print(f"  {size:>12,d}  {path}")
        return files
    return _upload(folder, repo_id, private, revision, create_pr, token, commit_message)


def check_repo_id(repo_id: str) -> None:
    """A Hub dataset repo id is `org/name` (or `name`, in the token's namespace), in the Hub's characters."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"--repo-id {repo_id!r} is not a valid Hub repo id: {err} Use org/name.") from None


def _upload(folder, repo_id, private, revision, create_pr, token, commit_message):
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = token or get_token()
    if not token:
        raise PushError(
            "No Hugging Face token found, so nothing was pushed. Log in with `hf auth login`, or set HF_TOKEN to a "
            "token with write access (https://huggingface.co/settings/tokens), or pass --token."
        )
    api = HfApi(token=token)
    step = "creating the repo"
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision and not create_pr:
            step = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        step = "uploading"
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="dataset",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload perplexity-masked dataset (trl-pplmask)",
        )
    except OfflineModeIsEnabled as err:
        raise PushError(f"Cannot push while HF_HUB_OFFLINE is set ({step}); unset it and retry. ({err})") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if getattr(err, "response", None) is not None else None
        hint = {
            401: "the token is invalid or expired: log in again with `hf auth login`",
            403: f"the token may not write to {repo_id}: use a write token of a member of its organisation",
            404: f"{repo_id} or the revision was not found: check the repo id and --revision",
        }.get(status, "the Hub rejected the request")
        raise PushError(f"Push to {repo_id} failed while {step}: {hint}. Hub answer: {err}") from err
    except _network_errors() as err:
        from huggingface_hub import constants

        endpoint = api.endpoint or constants.ENDPOINT
        raise PushError(
            f"Push to {repo_id} failed while {step}: could not reach {endpoint} ({type(err).__name__}: {err}). Check "
            "the network connection and HF_ENDPOINT, then retry; the local folder was not changed."
        ) from err
    except Exception as err:  # noqa: BLE001 - anything else still ends with a clear message, folder untouched
        raise PushError(f"Push to {repo_id} failed while {step}: {type(err).__name__}: {err}") from err


def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub talks through httpx2 (transport errors are not OSErrors), hf_xet and requests in places
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    for module_name, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "RequestException"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)
