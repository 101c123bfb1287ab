"""Glue between our encoders and OpenMMLab (mmdet, mmseg).

Only :mod:`downstream._mm.vit_dense` is plain PyTorch; the other modules import mmengine /
mmcv / mmdet / mmseg and register our backbones, necks, transforms and optimizer constructor
into their registries. Import them only inside a dense task's ``run`` (``harness`` and the
task modules must stay cheap to import).
"""
