"""Downstream evaluation protocols: each reads one encoder and returns metrics.

Importing the package registers every task (and its config schema) and every checkpoint format
so that a suite can be validated; task modules keep heavy dependencies (mmdet, mmseg, mmcv)
inside ``run``.
"""

from downstream import (  # noqa: F401  (registers every task and checkpoint format)
    attentive_probe,
    checkpoints,
    dense_probe,
    depth_probe,
    detection,
    finetune,
    knn,
    linear_probe,
    linear_probe_faithful,
    low_shot,
    partial_finetune,
    robustness,
    segmentation,
    transfer,
)
