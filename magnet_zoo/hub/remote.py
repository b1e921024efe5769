"""The Hugging Face Hub side: repo ids, downloads through the Hub cache, and pushes.

``huggingface_hub`` is imported inside the functions, so ``import magnet_zoo.hub`` does not need it.
Downloads go through ``snapshot_download`` (one commit for all files, the standard cache, and the
cache fallback that makes ``HF_HUB_OFFLINE=1`` work); ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_TOKEN``
are honoured as in every Hugging Face library.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import magnet_zoo
from magnet_zoo.hub.card import CardData
from magnet_zoo.hub.checkpoint import CARD_NAME, CHECKPOINT_FILES, CONFIG_NAME, WEIGHTS_NAME, save_pretrained
from magnet_zoo.hub.errors import HubError, InvalidRepoIdError
from magnet_zoo.nn.magnet import MagNet

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
DEFAULT_REVISION = "main"
_NAME = r"(?!.*(?:--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` is a Hub model repo id of the form ``org/name`` (no prefix, no revision)."""
    return bool(_REPO_ID.match(text)) and not text.endswith(".git")


def check_revision(revision: str) -> str:
    """``revision`` unchanged if it can name a branch, tag or commit; :class:`InvalidRepoIdError` if not."""
    if not isinstance(revision, str) or not revision or any(c.isspace() for c in revision):
        raise InvalidRepoIdError(f"invalid revision {revision!r}: give a branch, tag or commit hash")
    return revision


def parse_repo_spec(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """``(repo_id, revision)`` from ``"org/name"``, ``"hf-hub:org/name"`` or either with ``"@revision"``.

    A revision given both in ``spec`` and as ``revision`` must agree.
    """
    text = spec[len(HF_HUB_PREFIX) :] if spec.startswith(HF_HUB_PREFIX) else spec
    repo_id, at, inline = text.partition("@")
    if at:
        inline = check_revision(inline)
        if revision is not None and revision != inline:
            raise InvalidRepoIdError(f"{spec!r} names revision {inline!r} but revision={revision!r} was also given")
        revision = inline
    if not is_repo_id(repo_id):
        raise InvalidRepoIdError(
            f"{spec!r} is not a Hub repo id: expected 'org/name' (letters, digits, '-', '_', '.'; at most 96 "
            "characters per part; no '--' or '..'), optionally prefixed with 'hf-hub:'"
        )
    if revision is not None:
        check_revision(revision)
    return repo_id, revision


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def download_checkpoint(
    repo_id: str,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """Fetch a checkpoint's files from the Hub into the Hugging Face cache; returns the snapshot folder.

    Files already cached are not downloaded again; offline (``HF_HUB_OFFLINE=1`` or
    ``local_files_only=True``) the cached snapshot of ``revision`` is used.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or DEFAULT_REVISION
    where = f"{repo_id}@{rev}"
    try:
        folder = snapshot_download(
            repo_id,
            revision=rev,
            allow_patterns=list(CHECKPOINT_FILES),
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            library_name="magnet-zoo",
            library_version=magnet_zoo.__version__,
        )
    except RevisionNotFoundError as exc:
        raise HubError(
            f"Hub repo {repo_id} has no revision {rev!r} (at {_endpoint()}); check the branch, tag or commit"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise HubError(
            f"Hub repo {repo_id} was not found at {_endpoint()}, or it is private or gated: check the name, "
            "and for a private repo log in (`hf auth login`) or pass token=... (no local folder of that name "
            "exists either)"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise HubError(
            f"{where} is not in the Hugging Face cache and the Hub cannot be reached (offline mode or no "
            f"connection). While online, run `hf download {repo_id} --revision {rev} --local-dir DIR` and "
            "then load_pretrained('DIR'), or load it once online to fill the cache."
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise HubError(f"downloading {where} from {_endpoint()} failed: {exc}") from exc
    folder_path = Path(folder)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder_path / name).is_file()]
    if missing:
        raise HubError(
            f"Hub repo {where} has no {' or '.join(missing)}, so it is not a magnet_zoo checkpoint (magnet_zoo "
            f"loads {CONFIG_NAME} + {WEIGHTS_NAME} and never unpickles .bin/.pt weights)"
        )
    logger.info("using %s from %s", where, folder_path)
    return folder_path


def push_to_hub(
    model: MagNet,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    card_data: CardData | Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    training: Mapping[str, Any] | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Save ``model`` as a checkpoint folder and upload it to the Hub repo ``repo_id`` (``org/name``).

    The repo is created if needed (``private`` applies only then). ``revision`` is a branch, created
    from ``main`` when missing; by default ``main``. Returns huggingface_hub's ``CommitInfo``.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    repo_id, inline = parse_repo_spec(repo_id, revision)
    revision = inline
    if revision is not None and _COMMIT.match(revision):
        raise InvalidRepoIdError(f"cannot push to commit {revision}: give a branch name as revision")
    if card_data is None:  # a loaded model keeps the card it came with
        card_data = getattr(getattr(model, "module", model), "card_data", None)
    card = CardData.coerce(card_data)
    if card.model_name is None:
        card.model_name = repo_id
    message = commit_message or f"Upload MagNet with magnet_zoo {magnet_zoo.__version__}"

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="magnet_zoo_push_") as tmp:
        save_pretrained(model, tmp, card_data=card, metrics=metrics, training=training)
        try:
            api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            if revision is not None and revision != DEFAULT_REVISION:
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                repo_type="model",
                revision=revision,
                commit_message=message,
                create_pr=create_pr,
                allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
            )
        except HfHubHTTPError as exc:
            raise HubError(
                f"pushing to {repo_id}@{revision or DEFAULT_REVISION} at {_endpoint()} failed: {exc}. Check that "
                "you are logged in (`hf auth login`) with a token that can write to that namespace."
            ) from exc
    logger.info("pushed MagNet to %s@%s", repo_id, revision or DEFAULT_REVISION)
    return info
