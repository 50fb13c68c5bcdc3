"""Where a model comes from: a local folder, or a Hugging Face repo id resolved on the
coordinator with huggingface_hub (its cache, its HF_HUB_OFFLINE, its token).

Only the coordinator needs the model; nodes receive the tensors of their stages
(coordinator/shipping.py). A repo id is `org/name` or `org/name@revision`; an existing folder
of that relative path wins. Only what the loader reads is downloaded: configs,
`model*.safetensors` and tokenizer files (not `*.bin`, `*.gguf`, `consolidated.*`, ...).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?")
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jinja",
]
_TRUE = ("1", "ON", "YES", "TRUE")


class ModelSourceError(RuntimeError):
    """A model that cannot be found or fetched; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    path: Path  # a local folder: the user's, or the repo's snapshot in the HF cache
    name: str  # the folder's name, or the repo id
    repo_id: str | None = None
    revision: str | None = None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
    return env or bool(constants.HF_HUB_OFFLINE)


def is_repo_id(spec: str) -> bool:
    return REPO_RE.fullmatch(spec) is not None and not spec.startswith((".", "/", "~"))


def resolve_model(
    spec: str, cache_dir: Path | None = None, offline: bool | None = None
) -> ModelSource:
    """The local folder of `spec` (a folder, or a repo id fetched into the HF cache)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return ModelSource(path=p.resolve(), name=p.resolve().name)
    if not is_repo_id(spec) or p.exists():
        raise ModelSourceError(
            f"model folder {p} does not exist (and {spec!r} is no Hugging Face repo id "
            "like org/name)"
        )
    repo_id, _, revision = spec.partition("@")
    offline = hub_offline() if offline is None else offline
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f" in {cache_dir}" if cache_dir else ""
    try:
        path = snapshot_download(
            repo_id,
            revision=revision or None,
            cache_dir=cache_dir,
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        if offline:
            raise ModelSourceError(
                f"{repo_id} is not in the Hugging Face cache{where} and HF_HUB_OFFLINE is set: "
                f"fetch it once with network access (`hf download {repo_id}`) or unset "
                "HF_HUB_OFFLINE"
            ) from None
        raise ModelSourceError(
            f"cannot reach the Hugging Face hub for {repo_id}, and it is not cached{where}"
        ) from None
    except IncompleteSnapshotError as e:
        raise ModelSourceError(f"{repo_id}: the cached copy is incomplete: {e}") from None
    except GatedRepoError:
        raise ModelSourceError(
            f"{repo_id} is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"no Hugging Face repo {repo_id} (a private one needs `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"{repo_id} has no revision {revision!r}") from None
    except HfHubHTTPError as e:
        raise ModelSourceError(f"the Hugging Face hub refused {repo_id}: {e}") from None
    folder = Path(path)
    log.info("%s resolved to %s", spec, folder)
    return ModelSource(path=folder, name=repo_id, repo_id=repo_id, revision=revision or None)
