"""SynthMets: procedural pyramidal slides with known tumour regions, for benchmarking MagNets.

Slides are tiled JPEG pyramidal TIFFs that OpenSlide opens as ``generic-tiff``: tissue pieces of
H&E-like texture on light glass; tumour slides also hold tumour regions of macro (> 2 mm), micro
(0.2-2 mm) or ITC-like (< 0.2 mm) size whose mean colour equals the normal tissue's, so only texture
(nuclear size, density, clumping) tells them apart. A JSON sidecar per slide gives the label,
category and tumour boxes; a ``labels.csv`` per folder lists the slides. See ``DESIGN.md`` section 5.

Public API: :func:`generate_slide`, :func:`generate_dataset`, :func:`read_labels`, and
:func:`tumour_mask` (the ground-truth mask at any resolution, for localisation metrics). The
``magnet-zoo synth`` command is registered by :func:`magnet_zoo.synth.cli.add_parser`.
"""

from magnet_zoo.synth.dataset import generate_dataset, read_labels
from magnet_zoo.synth.layout import CATEGORIES, TUMOUR_CATEGORIES
from magnet_zoo.synth.mask import tumour_mask
from magnet_zoo.synth.slide import GENERATOR_VERSION, generate_slide, plan_slide

__all__ = [
    "CATEGORIES",
    "GENERATOR_VERSION",
    "TUMOUR_CATEGORIES",
    "generate_dataset",
    "generate_slide",
    "plan_slide",
    "read_labels",
    "tumour_mask",
]
