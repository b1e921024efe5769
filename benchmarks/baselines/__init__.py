"""SynthMets methods: the MagNet under test and the baselines it is compared with, on the same slides.

* :mod:`.magnet`: a small MagNet trained with the learn-to-look recipe, plus the localisation metric;
* :mod:`.mean_rgb`: mean RGB of the tissue -> logistic regression (the paper's RGB baseline);
* :mod:`.thumbnail_cnn`: the whole slide at 224 x 224 -> a CNN;
* :mod:`.dense_mil`: every tissue tile at one level -> MONAI ``MILModel`` (the CLAM / DSMIL paradigm).

Each ``run(train, val, test, ...)`` fits on ``train``, selects on ``val`` and returns a
:class:`~.common.MethodReport` with one :class:`~.common.SlideResult` per ``test`` slide.
``benchmarks/synthmets.py`` drives them.
"""
