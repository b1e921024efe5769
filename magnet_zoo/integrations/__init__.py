"""Drop-in pieces for the pathology toolkits: MONAI workflows and TIAToolbox engines.

* :mod:`magnet_zoo.integrations.monai`: dictionary transforms that open slides (``image`` -> a slide
  source) and orient them (D4), a collate function, ``prepare_batch``, a loss wrapper, an inferer and
  ignite handlers, so that ``monai.engines.SupervisedTrainer`` / ``SupervisedEvaluator`` and a MONAI
  bundle (``bundle/`` in the repository) train and evaluate a MagNet.
* :mod:`magnet_zoo.integrations.tiatoolbox`: a TIAToolbox ``ModelABC`` that predicts slides opened
  with TIAToolbox's ``WSIReader``.

Neither toolkit is imported until its module is (TIAToolbox takes seconds to import).
"""
