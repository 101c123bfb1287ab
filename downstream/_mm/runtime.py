"""The parts of a generated mm config that detection and segmentation share (plain dicts, no mm
imports): runtime, hooks, schedule pieces, and the optimizer with layer-wise lr decay."""

from __future__ import annotations

from typing import Any


def runtime_config(
    *,
    scope: str,
    module: str,
    work_dir: str,
    experiment_name: str,
    seed: int,
    max_iters: int,
    val_interval: int | None,
    checkpoint_interval: int,
    log_interval: int,
    log_level: str,
) -> dict[str, Any]:
    """Runner settings of an iteration-based run that resumes from its own work_dir.

    Args:
        scope: ``mmdet`` or ``mmseg`` (the registry scope).
        module: Our module that registers the custom types (``custom_imports`` of the file).
        work_dir: Checkpoints and logs; keyed by the config's hash, so resuming is safe.
        experiment_name: Unique per run (mmengine keys global loggers by it).
        seed: Run seed.
        max_iters: Training iterations.
        val_interval: Evaluate every that many iterations (always at the end); ``None``: end only.
        checkpoint_interval: Save every that many iterations (and at the end).
        log_interval: Log every that many iterations.
        log_level: ``INFO`` or ``WARNING``.
    """
    return dict(
        default_scope=scope,
        custom_imports=dict(imports=[module], allow_failed_imports=False),
        work_dir=work_dir,
        experiment_name=experiment_name,
        resume=True,  # from the newest checkpoint in work_dir, if any
        load_from=None,
        launcher="none",
        randomness=dict(seed=seed, deterministic=False),
        env_cfg=dict(
            cudnn_benchmark=False,
            mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
            dist_cfg=dict(backend="nccl"),
        ),
        log_level=log_level,
        log_processor=dict(type="LogProcessor", window_size=log_interval, by_epoch=False),
        train_cfg=dict(
            type="MimIterBasedTrainLoop",
            max_iters=max_iters,
            val_interval=val_interval or max_iters,
        ),
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=log_interval, log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(
                type="CheckpointHook",
                by_epoch=False,
                interval=checkpoint_interval,
                max_keep_ckpts=1,
                save_last=True,
            ),
            sampler_seed=dict(type="DistSamplerSeedHook"),
        ),  # fmt: skip
    )


def optim_config(
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    layer_decay: float,
    amp: bool,
    clip_grad: float | None = None,
) -> dict[str, Any]:
    """AdamW with layer-wise lr decay through our constructor (see ``_mm.common``)."""
    wrapper: dict[str, Any] = dict(
        type="AmpOptimWrapper" if amp else "OptimWrapper",
        optimizer=dict(type="AdamW", lr=lr, betas=tuple(betas), weight_decay=weight_decay),
        constructor="MimLayerDecayOptimWrapperConstructor",
        paramwise_cfg=dict(layer_decay_rate=layer_decay),
    )
    if clip_grad:
        wrapper["clip_grad"] = dict(max_norm=clip_grad, norm_type=2)
    return wrapper


def dataloader(
    dataset: dict[str, Any], batch_size: int, num_workers: int, train: bool
) -> dict[str, Any]:
    """A dataloader dict: infinite shuffled sampling for training, in-order for evaluation."""
    return dict(
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=False,
        sampler=dict(type="InfiniteSampler" if train else "DefaultSampler", shuffle=train),
        dataset=dataset,
    )
