"""Where a model comes from: a local folder, a GGUF file, a model in Ollama's local store
(`ollama:NAME[:TAG]`), or a Hugging Face repo id resolved on the coordinator with
huggingface_hub (its cache, its HF_HUB_OFFLINE, its token).

A GGUF file (given by path, or found through Ollama's manifests) is converted once into an
MLX folder in the coordinator's cache (coordinator/ggufsource.py); `ModelSource.gguf` keeps
the file, which the llama.cpp baseline loads as it is.

Only the coordinator needs the model; nodes receive the tensors of their stages
(coordinator/shipping.py). A repo id is `org/name` or `org/name@revision`; an existing folder
of that relative path wins. Only what the loader reads is downloaded: configs,
`model*.safetensors` and tokenizer files (not `*.bin`, `*.gguf`, `consolidated.*`, ...).
"""

from __future__ import annotations

import json
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
    gguf: Path | None = None  # the GGUF file the folder was converted from


OLLAMA_PREFIX = "ollama:"
OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"
OLLAMA_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*){0,2}")
OLLAMA_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
OLLAMA_REGISTRY = "registry.ollama.ai"


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
    """The local folder of `spec`: a folder; a GGUF file or `ollama:NAME[:TAG]`, converted
    into the cache; or a repo id fetched into the HF cache."""
    if spec.startswith(OLLAMA_PREFIX):
        blob, name = ollama_blob(spec[len(OLLAMA_PREFIX) :])
        return _from_gguf(blob, name)
    p = Path(spec).expanduser()
    if p.is_dir():
        return ModelSource(path=p.resolve(), name=p.resolve().name)
    if p.is_file():
        from coordinator.ggufsource import is_gguf

        if p.suffix.lower() == ".gguf" or is_gguf(p):
            return _from_gguf(p, p.stem)
        raise ModelSourceError(
            f"{p} is a file but not a GGUF model; give a model folder, a .gguf file, "
            "ollama:NAME[:TAG] or a Hugging Face repo id"
        )
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


def _from_gguf(path: Path, name: str) -> ModelSource:
    from coordinator.ggufsource import GGUFError, converted_folder

    try:
        folder = converted_folder(path)
    except GGUFError as e:
        raise ModelSourceError(str(e)) from None
    except OSError as e:
        raise ModelSourceError(f"cannot convert {path}: {e}") from None
    return ModelSource(path=folder, name=name, gguf=path.expanduser().resolve())


def ollama_root() -> Path:
    """Ollama's model store: $OLLAMA_MODELS, else ~/.ollama/models, else the Linux
    service's /usr/share/ollama/.ollama/models."""
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return Path(env).expanduser()
    home = Path.home() / ".ollama" / "models"
    service = Path("/usr/share/ollama/.ollama/models")
    return service if not home.is_dir() and service.is_dir() else home


def ollama_blob(ref: str, root: Path | None = None) -> tuple[Path, str]:
    """(GGUF blob, canonical name) of `NAME[:TAG]` in Ollama's store: the manifest at
    manifests/<registry>/<namespace>/<name>/<tag>, whose model layer names the blob
    blobs/sha256-<hex>."""
    root = root or ollama_root()
    name, _, tag = ref.partition(":")
    tag = tag or "latest"
    if not OLLAMA_NAME_RE.fullmatch(name) or not OLLAMA_TAG_RE.fullmatch(tag) or ".." in ref:
        raise ModelSourceError(
            f"{OLLAMA_PREFIX}{ref} is not an Ollama model name (NAME[:TAG], e.g. "
            "ollama:llama3.2:3b)"
        )
    parts = name.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [OLLAMA_REGISTRY, *parts]
    manifest = root.joinpath("manifests", *parts, tag)
    if not manifest.is_file():
        raise ModelSourceError(
            f"Ollama has no model {name}:{tag} in {root} (no manifest at {manifest}); "
            f"`ollama pull {name}:{tag}` fetches it, OLLAMA_MODELS points at another store"
        )
    try:
        doc = json.loads(manifest.read_text())
        layers = [x for x in doc["layers"] if x.get("mediaType") == OLLAMA_MODEL_MEDIA]
        digest = str(layers[0]["digest"])
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise ModelSourceError(
            f"the Ollama manifest {manifest} names no model layer ({OLLAMA_MODEL_MEDIA})"
        ) from None
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise ModelSourceError(f"the Ollama manifest {manifest} has a malformed digest {digest!r}")
    blob = root / "blobs" / f"sha256-{hexdigest}"
    if not blob.is_file():
        raise ModelSourceError(f"Ollama's manifest for {name}:{tag} names {blob}, which is missing")
    return blob, f"{name}:{tag}"
