"""TIAToolbox integration: a MagNet as a TIAToolbox ``ModelABC`` that reads slides through ``WSIReader``.

TIAToolbox models expose a static ``infer_batch(model, batch_data, *, device)`` plus ``preproc_func`` and
``postproc_func``; engines call them without knowing the network. For a MagNet a "batch" is a list of
*slides*: TIAToolbox readers (``WSIReader.open(path)``, ``VirtualWSIReader(array)``), slide paths, RGB
arrays or magnet_zoo slide sources. ``preproc`` turns each into a
:class:`~magnet_zoo.wsi.RegionSource` (:class:`~magnet_zoo.wsi.backends.tiatoolbox_backend.TiatoolboxSource`
for readers, with the same computed coarse levels :func:`~magnet_zoo.open_slide` adds), so a slide read
through TIAToolbox gives the same prediction as ``magnet_zoo.predict_slide`` on the same pixels.

>>> from tiatoolbox.wsicore.wsireader import WSIReader
>>> model = MagNetTIAModel.from_pretrained("path/to/checkpoint")
>>> out = MagNetTIAModel.infer_batch(model, [WSIReader.open("slide.svs")], device="cpu")
>>> out["probabilities"], model.postproc_func(out["probabilities"])

TIAToolbox is imported when this module is (it takes seconds); ``magnet_zoo`` itself never imports it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tiatoolbox.models.models_abc import ModelABC
from tiatoolbox.wsicore.wsireader import WSIReader

from magnet_zoo.nn.magnet import MagNet, MagNetOutput
from magnet_zoo.wsi.array_source import ArraySource
from magnet_zoo.wsi.backends.tiatoolbox_backend import TiatoolboxSource
from magnet_zoo.wsi.coarse import CoarseLevelSource, needs_coarse_level
from magnet_zoo.wsi.fetch import as_fetcher
from magnet_zoo.wsi.protocol import RegionSource

__all__ = ["MagNetTIAModel", "slide_source"]


def slide_source(slide: Any) -> RegionSource:
    """A magnet_zoo slide source for a TIAToolbox reader, a path, an RGB array or a source (passed through)."""
    if isinstance(slide, WSIReader):
        source: RegionSource = TiatoolboxSource(slide)
    elif isinstance(slide, str | os.PathLike):
        if not Path(slide).exists():
            raise FileNotFoundError(f"{slide}: no such slide file")
        source = TiatoolboxSource(Path(slide))
    elif isinstance(slide, np.ndarray):
        return ArraySource(slide)
    elif isinstance(slide, RegionSource):
        return slide
    else:
        raise TypeError(
            "a slide must be a TIAToolbox WSIReader, a path, an RGB numpy array or a magnet_zoo slide source; "
            f"got {type(slide).__name__}"
        )
    return CoarseLevelSource(source) if needs_coarse_level(source) else source


class MagNetTIAModel(ModelABC):
    """A MagNet behind TIAToolbox's model interface: slides in, slide-level probabilities out.

    ``forward(slides)`` returns the :class:`~magnet_zoo.nn.magnet.MagNetOutput`; :meth:`infer_batch`
    returns NumPy arrays (``probabilities``, ``logits``) and the zoom trees (``trees``, lists of node
    dictionaries) for engines; :meth:`postproc` turns probabilities into class indices (0 normal,
    1 tumour; ``class_dict`` names them).
    """

    def __init__(self, magnet: MagNet, threshold: float = 0.5) -> None:
        super().__init__()
        if not isinstance(magnet, MagNet):
            raise TypeError(f"MagNetTIAModel wraps a magnet_zoo MagNet, got {type(magnet).__name__}")
        self.magnet = magnet
        self.threshold = threshold
        self.class_dict = dict(enumerate(magnet.config.labels))

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike[str], device: str = "cpu", **kwargs: Any) -> MagNetTIAModel:
        """Load a checkpoint (folder, hub repo or registered name) with :func:`magnet_zoo.load_pretrained`."""
        from magnet_zoo.hub import load_pretrained

        return cls(load_pretrained(name_or_dir, device=device), **kwargs)

    def load_weights_from_file(self, weights: str | Path) -> torch.nn.Module:
        """Load weights from a checkpoint folder or a ``.safetensors`` file (never a pickle).

        Overrides TIAToolbox's ``torch.load``-based loader: magnet_zoo checkpoints are safetensors only.
        """
        from magnet_zoo.hub.checkpoint import WEIGHTS_NAME, load_state_dict_strict, read_weights

        path = Path(weights)
        file = path / WEIGHTS_NAME if path.is_dir() else path
        if file.suffix != ".safetensors":
            raise ValueError(
                f"{weights}: magnet_zoo loads safetensors weights only (a checkpoint folder or a .safetensors file)"
            )
        load_state_dict_strict(self.magnet, read_weights(file), str(file))
        return self

    def forward(self, slides: Sequence[Any]) -> MagNetOutput:  # type: ignore[override]
        grey = self.magnet.config.grey_threshold
        return self.magnet([as_fetcher(self.preproc_func(s), grey) for s in slides])

    @staticmethod
    def preproc(image: Any) -> RegionSource:  # type: ignore[override]
        """A slide (reader, path, array or source) -> a magnet_zoo slide source (see :func:`slide_source`)."""
        return slide_source(image)

    @staticmethod
    def postproc(image: np.ndarray, threshold: float = 0.5) -> np.ndarray:  # type: ignore[override]
        """Probabilities ``(B,)`` -> class indices ``(B,)`` (1 where ``p >= threshold``)."""
        return (np.asarray(image, dtype=np.float64) >= threshold).astype(np.int64)

    @staticmethod
    def infer_batch(model: torch.nn.Module, batch_data: Sequence[Any], *, device: str = "cpu") -> dict[str, Any]:
        """Predict a batch of slides: ``{"probabilities", "logits": (B,) arrays, "trees": [[node dict]]}``."""
        inner = getattr(model, "module", model)  # unwrap DataParallel
        if not isinstance(inner, MagNetTIAModel):
            raise TypeError(f"infer_batch expects a MagNetTIAModel, got {type(inner).__name__}")
        if isinstance(batch_data, WSIReader | np.ndarray | str | os.PathLike):
            batch_data = [batch_data]
        inner.to(device)
        was_training = inner.training
        inner.eval()
        try:
            with torch.inference_mode():
                out = inner(list(batch_data))
        finally:
            inner.train(was_training)
        return {
            "probabilities": out.probs.float().cpu().numpy(),
            "logits": out.logits.float().cpu().numpy(),
            "trees": [[node.to_dict() for node in tree] for tree in out.trees],
        }
