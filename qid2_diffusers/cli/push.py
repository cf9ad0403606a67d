"""``qid2 push``: publish a trained QID² pipeline folder on the Hugging Face Hub.

The folder is what ``save_pretrained`` (and the training script) writes:
``model_index.json``, ``unet/``, ``direction_encoder/``, ``scheduler/`` and
the model card ``README.md``. Once pushed, anyone loads it with
``QID2Pipeline.from_pretrained("ORG/NAME")`` or ``qid2 upsample --model ORG/NAME``.

Authentication is huggingface_hub's: ``hf auth login``, ``HF_TOKEN`` or ``--token``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import QID2InputError

__all__ = ["IGNORE_PATTERNS", "files_to_upload", "push_model", "add_parser", "run"]

#: Never uploaded: hidden files (temporary writes, editor files) and caches.
IGNORE_PATTERNS = [".*", "**/.*", "__pycache__/*", "**/__pycache__/*"]


def _check_repo_id(repo_id: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise QID2InputError(repo_id, "not a Hub repository id; expected ORG/NAME of letters, digits, '-', '_', '.'") from None
    if repo_id.count("/") != 1:
        raise QID2InputError(repo_id, "give the repository as ORG/NAME (your user name or an organisation)")
    return repo_id


def _check_model(model) -> Path:
    from ..hub import resolve_model

    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise QID2InputError(folder, "no such model folder (qid2 push uploads a local save_pretrained folder)")
    return resolve_model(folder)


def files_to_upload(folder) -> list[Path]:
    """The files of ``folder`` that ``qid2 push`` uploads, relative to it, sorted."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [Path(n) for n in filter_repo_objects(names, ignore_patterns=IGNORE_PATTERNS)]


def push_model(model, repo_id: str, *, private: bool = False, token: str | None = None,
               commit_message: str = "Upload QID² pipeline") -> str:
    """Create (if needed) the model repository ``repo_id`` and upload the folder ``model``.

    Args:
        model (`str` or `os.PathLike`): a complete QID² pipeline folder.
        repo_id (`str`): ``ORG/NAME``.
        private (`bool`, *optional*, defaults to `False`): create the repository private.
        token (`str`, *optional*): Hub token; defaults to the logged-in one.
        commit_message (`str`, *optional*): the commit's message.

    Returns:
        `str`: the commit URL.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    folder = _check_model(model)
    _check_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 commit_message=commit_message, ignore_patterns=IGNORE_PATTERNS)
    except LocalTokenNotFoundError:
        raise QID2InputError(repo_id, "not logged in to the Hub: run `hf auth login` or pass --token") from None
    except HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QID2InputError(repo_id, f"Hub refused the upload ({first})") from None
    return str(info.commit_url)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload a trained QID² pipeline folder to the Hugging Face Hub",
        description=(
            "Upload a QID² pipeline folder (save_pretrained output with its README.md model card) to a Hub "
            "model repository, created if needed. Log in first with `hf auth login`, or pass --token."
        ),
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the pipeline folder to upload")
    p.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="target repository, ORG/NAME")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", metavar="TOKEN", help="Hub access token (default: the logged-in one or $HF_TOKEN)")
    p.add_argument("--commit-message", default="Upload QID² pipeline", metavar="TEXT", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="check the folder and list what would be uploaded; upload nothing")
    p.set_defaults(run=run)


def run(args) -> int:
    folder = _check_model(args.model)
    _check_repo_id(args.repo_id)
    files = files_to_upload(folder)
    if not any(f.as_posix() == "README.md" for f in files):
        print(f"qid2 push: warning: {folder} has no README.md model card; the Hub page will be empty", file=sys.stderr)
    if args.dry_run:
        visibility = "private" if args.private else "public"
        print(f"qid2 push: dry run: would upload {len(files)} files from {folder} to {visibility} model repo {args.repo_id}")
        for f in files:
            print(f"  {f.as_posix()}  ({(folder / f).stat().st_size} bytes)")
        return 0
    url = push_model(folder, args.repo_id, private=args.private, token=args.token, commit_message=args.commit_message)
    print(f"qid2 push: uploaded {len(files)} files to {args.repo_id}: {url}")
    return 0
