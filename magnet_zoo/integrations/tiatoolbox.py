"""TIAToolbox integration: a MagNet as a TIAToolbox ``ModelABC`` that reads slides through ``WSIReader``.

TIAToolbox models expose a static ``infer_batch(model, batch_data, *, device)`` plus ``preproc_func`` and
``postproc_func``; engines call them without knowing the network. For a MagNet a "batch" is a list of
*slides*: TIAToolbox readers (``WSIReader.open(path)``, ``VirtualWSIReader(array)``), slide paths, RGB
arrays or magnet_zoo slide sources. ``preproc`` turns each into a
:class:`~magnet_zoo.wsi.RegionSource` (:class:`~magnet_zoo.wsi.backends.tiatoolbox_backend.TiatoolboxSource`
for readers, with the same computed coarse levels :func:`~magnet_zoo.open_slide` adds), so a slide read
through TIAToolbox gives the same prediction as ``magnet_zoo.predict_slide`` on the same pixels.

>>> from tiatoolbox.wsicore.wsireader import WSIReader
>>> model = MagNetTIAModel.from_pretrained("path/to/checkpoint", threshold=0.5)
>>> out = MagNetTIAModel.infer_batch(model, [WSIReader.open("slide.svs")], device="cpu")
>>> out["probabilities"], model.postproc_func(out["probabilities"])   # classes at model.threshold
>>> store = to_annotation_store(out, labels=model.class_dict)             # TIAToolbox's AnnotationStore

What no TIAToolbox engine does: ``PatchPredictor``, ``SemanticSegmentor`` and the other engines tile a
slide into patches described by an ``IOConfig`` (resolution, patch shape, stride) and feed the model
batches of patch tensors. A MagNet reads the whole slide itself, choosing where and at which level to
read while it runs, so it has no patch shape to declare and none of those engines can drive it: call
:meth:`MagNetTIAModel.infer_batch` with slides (as the engines would call it with patches), and keep
the results where TIAToolbox users keep them, in an annotation store (:func:`to_annotation_store`:
one annotation per ROI of the zoom tree and one for the slide-level result, in level-0 coordinates;
TIAToolbox's ``AnnotationRenderer`` and its visualisation tools read it).

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

__all__ = ["MagNetTIAModel", "slide_source", "to_annotation_store"]


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
    1 tumour; ``class_dict`` names them), and ``postproc_func`` does so at this model's ``threshold``.

    ``trees`` ``K > 1`` makes :meth:`infer_batch` pool ``K`` sampled zoom trees per slide, exactly as
    ``magnet_zoo.predict_slide(trees=K, seed=tree_seed)`` (slides one at a time, ``K`` times the cost):
    ``probabilities`` are the mean of the trees', ``trees`` the representative tree of each slide
    (``Prediction.tree``), and the output adds ``sampled_trees`` (every tree), ``tree_probabilities``
    ``(B, K)`` and ``tree_index``. ``forward`` always runs the expected crop. ``None`` or 1: one tree.
    """

    def __init__(self, magnet: MagNet, threshold: float = 0.5, trees: int | None = None, tree_seed: int = 0) -> None:
        super().__init__()
        from magnet_zoo.infer.predict import check_trees

        if not isinstance(magnet, MagNet):
            raise TypeError(f"MagNetTIAModel wraps a magnet_zoo MagNet, got {type(magnet).__name__}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.magnet = magnet
        self.threshold = float(threshold)
        self.trees = check_trees(trees)
        self.tree_seed = int(tree_seed)
        self.class_dict = dict(enumerate(magnet.config.labels))
        self._postproc = self._postproc_at_threshold

    def _postproc_at_threshold(self, image: np.ndarray) -> np.ndarray:
        return self.postproc(image, threshold=self.threshold)

    @property
    def postproc_func(self):  # type: ignore[override]
        """Probabilities -> class indices at ``self.threshold`` (read when called, so a changed threshold
        applies); TIAToolbox's default would be the static :meth:`postproc` at 0.5."""
        return self._postproc

    @postproc_func.setter
    def postproc_func(self, func) -> None:
        if func is not None and not callable(func):
            raise ValueError(f"{func} is not callable!")
        self._postproc = self._postproc_at_threshold if func is None else func

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

    def _fetchers(self, slides: Sequence[Any]) -> list[Any]:
        grey = self.magnet.config.grey_threshold
        return [as_fetcher(self.preproc_func(s), grey) for s in slides]

    def forward(self, slides: Sequence[Any]) -> MagNetOutput:  # type: ignore[override]
        return self.magnet(self._fetchers(slides))

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
        """Predict a batch of slides: ``{"probabilities", "logits": (B,) arrays, "trees": [[node dict]]}``
        (with the model's ``trees`` ``K > 1`` also ``sampled_trees``, ``tree_probabilities``, ``tree_index``)."""
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
                if inner.trees is not None:
                    return inner._sampled_batch(list(batch_data))
                out = inner(list(batch_data))
        finally:
            inner.train(was_training)
        return {
            "probabilities": out.probs.float().cpu().numpy(),
            "logits": out.logits.float().cpu().numpy(),
            "trees": [[node.to_dict() for node in tree] for tree in out.trees],
        }

    def _sampled_batch(self, slides: list[Any]) -> dict[str, Any]:
        """:meth:`infer_batch` with ``K > 1`` sampled trees per slide, one slide at a time."""
        from magnet_zoo.infer.predict import predict_fetcher

        preds = [predict_fetcher(self.magnet, f, threshold=self.threshold, trees=self.trees, seed=self.tree_seed)
                 for f in self._fetchers(slides)]
        probs = torch.tensor([p.probability for p in preds], dtype=torch.float64)
        return {
            "probabilities": probs.float().numpy(),
            "logits": torch.logit(probs, eps=1e-12).float().numpy(),
            "trees": [[node.to_dict() for node in p.tree] for p in preds],
            "sampled_trees": [[[node.to_dict() for node in tree] for tree in p.trees] for p in preds],
            "tree_probabilities": np.asarray([p.tree_probabilities for p in preds], dtype=np.float32),
            "tree_index": [p.tree_index for p in preds],
        }


def to_annotation_store(
    output: dict[str, Any],
    store: Any = None,
    *,
    labels: dict[int, str] | Sequence[str] | None = None,
    threshold: float = 0.5,
    slides: Sequence[str] | None = None,
) -> Any:
    """The zoom trees and slide results of :meth:`MagNetTIAModel.infer_batch` in a TIAToolbox
    ``AnnotationStore``: ``store`` itself, or a file (``.db`` / ``.sqlite``: a ``SQLiteStore``; any other
    name: a ``DictionaryStore`` written as ndjson), or an in-memory ``DictionaryStore`` by default
    (``SQLiteStore`` needs a Python whose ``sqlite3`` can load extensions; not every build can). Call
    ``store.commit()`` to write a file store.

    Per slide: one annotation per ROI (a box polygon in level-0 pixels; properties ``type`` =
    ``"magnet_roi"``, ``name``, ``layer``, ``patch``, ``level``, ``scale``, ``slide``) except frozen
    patches, which are their parent's box (the parent's ``frozen_child`` names them), and one slide-level
    annotation over the slide's extent (``type`` = ``"magnet_slide"``, ``probability``, ``label``,
    ``threshold``). With several slides in ``output``, ``slides`` names them (default: their index);
    query one slide's annotations with ``store.query(where=f"props['slide'] == '{name}'")``.
    """
    from shapely.geometry import box as shapely_box
    from tiatoolbox.annotation.storage import Annotation, AnnotationStore, DictionaryStore, SQLiteStore

    from magnet_zoo.explain.geojson import patch_index

    if store is None:
        store = DictionaryStore()
    elif not isinstance(store, AnnotationStore):
        path = Path(store)
        store = SQLiteStore(path) if path.suffix.lower() in (".db", ".sqlite") else DictionaryStore(path)
    names = dict(enumerate(labels)) if isinstance(labels, Sequence) and not isinstance(labels, str) else labels
    names = names or {0: "negative", 1: "positive"}
    probabilities = np.asarray(output["probabilities"], dtype=np.float64).reshape(-1)
    trees = output["trees"]
    if len(trees) != len(probabilities):
        raise ValueError(f"output has {len(trees)} trees but {len(probabilities)} probabilities")
    if slides is not None and len(slides) != len(trees):
        raise ValueError(f"{len(slides)} slide names for {len(trees)} slides")
    annotations = []
    for i, (tree, prob) in enumerate(zip(trees, probabilities, strict=True)):
        slide = str(slides[i]) if slides is not None else str(i)
        frozen_of = {n["parent"]: n["name"] for n in tree if n.get("frozen")}
        for node in tree:
            x, y, w, h = (float(v) for v in node["box"])
            if node["layer"] == 0:
                label = names[int(prob >= threshold)]
                props = {"type": "magnet_slide", "slide": slide, "probability": float(prob), "label": label,
                         "threshold": float(threshold), "name": node["name"]}
            elif node.get("frozen"):
                continue
            else:
                props = {"type": "magnet_roi", "slide": slide, "name": node["name"], "layer": int(node["layer"]),
                         "patch": patch_index(node["name"]) + 1, "level": int(node["level"]),
                         "scale": float(node["scale"]), "parent": node.get("parent") or "",
                         "frozen_child": frozen_of.get(node["name"], "")}
            annotations.append(Annotation(shapely_box(x, y, x + w, y + h), props))
    store.append_many(annotations)
    return store
