"""A MIM recipe's schema: masking + encoder mode + head + target + loss (+ encoder init).

The names of the axes (head, target, tokenizer, loss types, the masking strategy) are checked
against the registries that :mod:`pretrain` fills (:mod:`harness.core.config.axes`); a recipe's
``name`` selects its recipe file (:mod:`harness.core.config.recipe_files`), merged under what the
user wrote.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from harness.core.config.axes import (
    ENCODER_FAMILIES,
    ENCODER_INITS,
    HEADS,
    LOSSES,
    MASKERS,
    TARGETS,
    TOKENIZERS,
    check_name,
)
from harness.core.config.base import StrictModel, deep_merge, omit_at_default
from harness.core.config.encoder import (
    ENCODER_PRESETS,
    VARIANT_FIELDS,
    EncoderConfig,
    PosEmbed,
    RelPosBias,
)
from harness.core.config.masking import MaskingConfig
from harness.core.config.recipe_files import recipe_file


class HeadConfig(StrictModel):
    """Prediction head (see :mod:`pretrain.heads`); ``type`` is a name registered in
    :data:`harness.core.config.axes.HEADS`.

    Attributes:
        type: ``linear`` (SimMIM: 1x1 conv + pixel shuffle), ``mlp`` (2-layer MLP, SimMIM
            Table 2), ``inverse_swin`` (Swin blocks that upsample back to the patch grid, SimMIM
            Table 2), ``mae_decoder`` (MAE's transformer decoder), ``upconv`` (Context Encoder:
            channel-wise fully connected layer + up-convolutions), ``attention_pooling``
            (Selfie's pooling network), ``pair_classifier`` (context prediction's fc7 + fc8).
        depth: ``mae_decoder``: blocks; ``inverse_swin``: blocks per stage when
            ``stage_depths`` is not given.
        dim: ``mae_decoder``: width; ``mlp``: hidden width; ``inverse_swin``: width of the
            coarsest stage (halved at every upsampling); ``upconv``: width of the first up-conv.
        num_heads: Attention heads (``inverse_swin``: of the coarsest stage, halved per stage).
        mlp_ratio: MLP ratio of transformer blocks.
        window_size: ``inverse_swin``: attention window.
        stage_depths: ``inverse_swin``: blocks per stage from coarse to fine (SimMIM's
            inverse Swin-T: ``[2, 6, 2, 2]``); one stage per 2x upsampling plus one.
        kernel_size: ``conv_decoder`` (data2vec 2.0): side of each conv's kernel (odd).
        groups: ``conv_decoder``: groups of each conv (divides ``dim`` and the encoder's width).
        mask_noise: ``conv_decoder``: std of the Gaussian noise that fills the masked positions
            (data2vec 2.0's ``mask_noise_std``).

    ``kernel_size``, ``groups`` and ``mask_noise`` are left out of dumps at their defaults
    (hashes kept).
    """

    type: str = "linear"
    depth: int = Field(8, ge=1)
    dim: int = Field(512, ge=8)
    num_heads: int = Field(16, ge=1)
    mlp_ratio: float = 4.0
    window_size: int = Field(7, ge=1)
    stage_depths: list[int] | None = None
    kernel_size: int = Field(3, ge=1)
    groups: int = Field(1, ge=1)
    mask_noise: float = Field(0.0, ge=0.0)

    @field_validator("type")
    @classmethod
    def _known_head(cls, value: str) -> str:
        return check_name(HEADS, value)

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(
                f"head.kernel_size {value} is even: a 'same' convolution keeps the patch grid "
                f"only with an odd kernel; use {value - 1} or {value + 1}"
            )
        return value

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return omit_at_default(self, handler(self), ("kernel_size", "groups", "mask_noise"))


class HOGConfig(StrictModel):
    """Histograms of oriented gradients (MaskFeat's target, see :mod:`pretrain.maskfeat`).

    Attributes:
        orientations: Unsigned orientation bins over 180 degrees (MaskFeat: 9).
        cell_size: Cell side in pixels (MaskFeat: 8, so a 16 px patch holds 2x2 cells).
        gradient: ``sobel`` (MaskFeat, reflect-padded) or ``central`` ([-1, 0, 1] differences,
            zero at the image border: Dalal-Triggs and scikit-image).
        gaussian_window: Side of the Gaussian weighting window in pixels, repeated over the
            image (MaskFeat: 16, sigma = window / 2); 0 disables it.
    """

    orientations: int = Field(9, ge=2)
    cell_size: int = Field(8, ge=1)
    gradient: Literal["sobel", "central"] = "sobel"
    gaussian_window: int = Field(16, ge=0)


class TokenizerConfig(StrictModel):
    """Discrete visual tokens for BEiT-style targets (see :mod:`pretrain.tokenizers`); ``type``
    is a name registered in :data:`harness.core.config.axes.TOKENIZERS`.

    Attributes:
        type: ``dall_e`` (DALL-E's dVAE encoder, loaded from ``path``: 8192 tokens on 112 px
            inputs in BEiT), or a tokenizer the harness trains before pretraining: ``kmeans``
            (a k-means codebook over patch pixels, iGPT-style clusters), ``vqvae`` (a small
            VQ-VAE) or ``dvae`` (a small Gumbel-softmax dVAE).
        path: ``dall_e``: the weights (the official ``encoder.pkl`` or a state dict with its
            keys). Other types: optional file of an already trained tokenizer to reuse.
        vocab_size: Number of tokens (DALL-E: 8192).
        input_size: Side of the tokenizer's input in pixels (BEiT: 112 for DALL-E, so 8x
            downsampling gives the 14x14 patch grid); ``None``: the encoder's image size.
        hidden: ``vqvae``/``dvae``: conv width.
        code_dim: ``vqvae``/``dvae``: codebook vector width.
        train_steps: ``vqvae``/``dvae``: optimization steps before pretraining.
        train_images: Images drawn from the training split to fit the tokenizer.
        kmeans_iters: ``kmeans``: Lloyd iterations.
        lr: ``vqvae``/``dvae``: Adam learning rate.
        batch_size: Tokenizer training batch.
    """

    type: str = "dall_e"
    path: str | None = None
    vocab_size: int = Field(8192, ge=2)
    input_size: int | None = Field(None, ge=8)
    hidden: int = Field(64, ge=4)
    code_dim: int = Field(32, ge=2)
    train_steps: int = Field(500, ge=0)
    train_images: int = Field(2048, ge=1)
    kmeans_iters: int = Field(20, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(64, ge=1)

    @field_validator("type")
    @classmethod
    def _known_tokenizer(cls, value: str) -> str:
        return check_name(TOKENIZERS, value)


class IBOTConfig(StrictModel):
    """iBOT's online tokenizer (Zhou et al., ICLR 2022; reference: bytedance/ibot,
    ``main_ibot.py`` ``iBOTLoss`` and ``models/head.py`` ``iBOTHead``): a DINO projection head on
    the class token and the patch tokens, the student's copy trained and the teacher's an EMA of
    it, teacher outputs centred (an EMA of the batch mean) and sharpened (a low temperature).

    Attributes:
        out_dim: Prototypes of the class-token head (reference: 8192).
        patch_out_dim: Prototypes of the patch head (8192); equal to ``out_dim`` when
            ``shared_head``.
        shared_head: One last layer for the class token and the patches (the reference's
            ImageNet runs: true); false gives the patches their own last layer.
        hidden_dim: Width of the MLP (2048).
        bottleneck_dim: Width before the weight-normed last layer (256).
        num_layers: Linear layers of the MLP (3).
        norm_last_layer: Freeze the last layer's weight-norm gain at 1 (the reference's
            ViT-S/B runs: false).
        student_temp: Temperature of the student's softmax (0.1).
        teacher_temp: Teacher temperature of the class token after warm-up (0.07 in the runs).
        teacher_patch_temp: Teacher temperature of the patches after warm-up (0.07).
        warmup_teacher_temp: Class-token teacher temperature at step 0 (0.04).
        warmup_teacher_patch_temp: Patch teacher temperature at step 0 (0.04).
        warmup_teacher_temp_fraction: Share of the run's optimizer steps over which both
            temperatures rise linearly from their warm-up values (the reference: 30 epochs, of
            its default 100: 0.3; of the 800-epoch runs: 0.0375).
        center_momentum: EMA momentum of the class-token centre (0.9).
        patch_center_momentum: EMA momentum of the patch centre (0.9).
        cls_weight: Weight of the class-token (DINO) loss, ``lambda1`` (1.0).
        patch_weight: Weight of the masked-patch loss, ``lambda2`` (1.0).
    """

    out_dim: int = Field(8192, ge=2)
    patch_out_dim: int = Field(8192, ge=2)
    shared_head: bool = False
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    num_layers: int = Field(3, ge=1)
    norm_last_layer: bool = True
    student_temp: float = Field(0.1, gt=0.0)
    teacher_temp: float = Field(0.04, gt=0.0)
    teacher_patch_temp: float = Field(0.07, gt=0.0)
    warmup_teacher_temp: float = Field(0.04, gt=0.0)
    warmup_teacher_patch_temp: float = Field(0.04, gt=0.0)
    warmup_teacher_temp_fraction: float = Field(0.3, ge=0.0, le=1.0)
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    patch_center_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    cls_weight: float = Field(1.0, ge=0.0)
    patch_weight: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _shared_head_one_size(self) -> IBOTConfig:
        if self.shared_head and self.patch_out_dim != self.out_dim:
            raise ValueError(
                f"target.ibot.shared_head uses one last layer for class token and patches, but "
                f"out_dim {self.out_dim} != patch_out_dim {self.patch_out_dim}: set them equal "
                "or shared_head: false"
            )
        return self


class ClusteringConfig(StrictModel):
    """CAPI's online clustering of the teacher's patch tokens (Darcet et al., "Cluster and
    Predict Latent Patches for Improved Masked Image Modeling", 2025; reference:
    facebookresearch/capi, ``model.py`` ``OnlineClustering`` / ``sinkhorn_knopp`` and
    ``default_pretrain_config.yaml``).

    Attributes:
        num_clusters: Prototypes (reference: 16384).
        target_temp: Temperature of the logits fed to Sinkhorn-Knopp (0.06).
        pred_temp: Temperature of the clustering head's own prediction of the assignments in
            its loss (0.12).
        student_temp: Temperature of the student's predicted logits (0.12).
        sinkhorn_iters: Sinkhorn-Knopp iterations (3).
        bias: A bias in the clustering layer (true).
        positionwise: Balance the assignments over the batch at each position separately
            (the reference's default) instead of over all tokens at once.
    """

    num_clusters: int = Field(16384, ge=2)
    target_temp: float = Field(0.06, gt=0.0)
    pred_temp: float = Field(0.12, gt=0.0)
    student_temp: float = Field(0.12, gt=0.0)
    sinkhorn_iters: int = Field(3, ge=1)
    bias: bool = True
    positionwise: bool = True
class LatentConfig(StrictModel):
    """A latent target: features of the EMA teacher on the unmasked image (``target.type:
    latent``, see :class:`pretrain.teacher.LatentTarget`).

    The teacher's per-block outputs before its final norm (the encoder contract's
    :meth:`forward_blocks`), the last ``top_k`` of them each normalized by ``block_norm``,
    averaged, then normalized by ``target_norm``.

    Attributes:
        top_k: Blocks averaged (data2vec: 6 for ViT-B, data2vec 2.0: 10; I-JEPA: 1).
        block_norm: Per block before averaging: ``instance`` (each channel over the tokens of an
            image, data2vec's ``instance_norm_target_layer``), ``layer`` (each token over its
            channels, no affine), ``final`` (the teacher's own final norm: I-JEPA's target
            encoder output) or ``none``.
        target_norm: After averaging: ``layer`` (no affine: data2vec's ``layer_norm_targets``,
            I-JEPA's ``F.layer_norm`` of the target encoder's output), ``instance`` or ``none``.
        cls_weight: Weight of data2vec 2.0's class-token loss (``cls_loss`` 0.01): the student's
            class token regresses the mean of the image's patch targets; 0 (the default, left
            out of dumps) turns it off.
    """

    top_k: int = Field(1, ge=1)
    block_norm: Literal["none", "instance", "layer", "final"] = "none"
    target_norm: Literal["none", "instance", "layer"] = "layer"
    cls_weight: float = Field(0.0, ge=0.0)

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return omit_at_default(self, handler(self), ("cls_weight",))


class TeacherConfig(StrictModel):
    """An EMA teacher (see :mod:`pretrain.teacher`): a copy of the encoder that receives no
    gradient and follows the student after each optimizer step,
    ``teacher = m * teacher + (1 - m) * student``.

    Attributes:
        momentum: ``m`` at the first update.
        momentum_end: ``m`` from ``momentum_steps`` updates on.
        momentum_steps: Updates over which ``m`` goes from ``momentum`` to ``momentum_end``;
            ``None``: the whole run (data2vec's ``ema_anneal_end_step = max_update``, I-JEPA's
            schedule over every iteration).
        schedule: ``linear`` (data2vec, I-JEPA) or ``cosine`` (BYOL, iBOT: ``end - (end -
            start) * (1 + cos(pi * t)) / 2``).
        evaluate: What the encoder file holds, so what every task evaluates: the ``teacher``
            (I-JEPA's ``target_encoder``, iBOT) or the ``student`` (data2vec).
        collapse_std: A step whose target std (per channel over the batch's patches, averaged
            over channels: data2vec's ``target_var``) falls below this is a collapse, logged
            and counted in the summary (harness's choice: 0.01; data2vec 2.0 stops below
            ``min_target_var``).
    """

    momentum: float = Field(0.999, ge=0.0, le=1.0)
    momentum_end: float = Field(0.9999, ge=0.0, le=1.0)
    momentum_steps: int | None = Field(None, ge=1)
    schedule: Literal["linear", "cosine"] = "linear"
    evaluate: Literal["teacher", "student"] = "student"
    collapse_std: float = Field(0.01, ge=0.0)


class TargetConfig(StrictModel):
    """What the head predicts for each patch (see :mod:`pretrain.targets`); ``type`` is a name
    registered in :data:`harness.core.config.axes.TARGETS`.

    Attributes:
        type: ``pixels`` (SimMIM), ``norm_pixels`` (MAE: per-patch normalized), ``hog``
            (MaskFeat), ``color_bins`` (each pixel's channel values in ``bins`` bins: SimMIM
            Table 5's 8-bin and 256-bin, Table 13's 2 to 256), ``mean_color`` (the patch's mean
            color with ``bins`` per channel, one ``bins^3``-way class: ViT's 3-bit color with 8),
            ``tokens`` (BEiT), ``ibot`` (iBOT: the EMA teacher's softmax over projected tokens),
            ``online_clusters`` (CAPI: the EMA teacher's patch tokens clustered online with
            Sinkhorn-Knopp; named ``clusters`` until it was renamed, apart from the ``clusters``
            field below, which counts colour clusters: the old spelling is refused with the
            new one named),
            ``selfie`` (the right patch among the image's masked patches, Selfie) and
            ``relative_position`` (which of 8 neighbours a patch is, context prediction).
        bins: Color bins per channel for ``color_bins`` and ``mean_color``.
        hog: HOG parameters for ``hog``.
        tokenizer: The tokenizer for ``tokens``.
        resolution: Side in pixels of the target image (SimMIM Table 3's prediction
            resolution): the input is average-pooled to ``resolution x resolution`` before the
            target is taken, and the head predicts at that resolution. ``None``: the input's
            own size (today's behaviour). Only targets whose class says
            ``supports_resolution`` take it (``pixels``, ``norm_pixels``, ``color_bins``,
            ``color_clusters``); it must divide the input size, and either be a multiple of
            the patch grid or divide it. Left out of dumps at ``None``.
        clusters: ``color_clusters``: number of RGB colour clusters (iGPT's 512, SimMIM
            Table 5), fitted by k-means on training pixels before pretraining (with the
            ``tokenizer``'s ``train_images`` and ``kmeans_iters``). Left out of dumps at 512.
        ibot: The projection heads, temperatures and centring for ``ibot``. Left out of dumps
            at its default.
        clustering: The clustering head for the ``online_clusters`` target (CAPI). Left out of dumps
            at its default.
        latent: The teacher's features for ``latent`` (data2vec, I-JEPA); left out of dumps at
            its default, so configs hashed before it existed keep their hashes.
    """

    type: str = "pixels"
    bins: int = Field(8, ge=2, le=256)
    hog: HOGConfig = Field(default_factory=HOGConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    resolution: int | None = Field(None, ge=1)
    clusters: int = Field(512, ge=2)
    ibot: IBOTConfig = Field(default_factory=IBOTConfig)
    clustering: ClusteringConfig = Field(default_factory=ClusteringConfig)
    latent: LatentConfig = Field(default_factory=LatentConfig)

    @field_validator("type")
    @classmethod
    def _known_target(cls, value: str) -> str:
        if value == "clusters":  # CAPI's target before it was renamed
            raise ValueError(
                "target.type 'clusters' was renamed 'online_clusters' (CAPI: the EMA teacher's "
                "tokens clustered online), apart from target.clusters (the colour-cluster count "
                "of target.type color_clusters): use target.type: online_clusters"
            )
        return check_name(TARGETS, value)

    @model_validator(mode="after")
    def _resolution_applies(self) -> TargetConfig:
        if self.resolution is not None and not TARGETS.get(self.type).supports_resolution:
            takes = [n for n in TARGETS.names() if TARGETS.get(n).supports_resolution]
            raise ValueError(
                f"target.resolution applies to {_or_list(takes)} targets; target "
                f"'{self.type}' predicts on the patch grid: remove target.resolution"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # added after records and pretraining stages were hashed: left out of every dump at
        # their defaults so those hashes stay the same
        names = ("resolution", "clusters", "ibot", "clustering", "latent")
        return omit_at_default(self, handler(self), names)


class LossConfig(StrictModel):
    """Loss and where it is averaged (see :mod:`pretrain.losses`); ``type`` is a name
    registered in :data:`harness.core.config.axes.LOSSES`.

    Attributes:
        type: ``l1``, ``l2``, ``smooth_l1`` for continuous targets, ``cross_entropy`` for the
            discrete ones (color bins, mean color, tokens).
        on: ``masked`` patches only, or ``all`` patches (SimMIM Table 4).
        adv_weight: Weight of the adversarial loss (Context Encoder: 0.001, the reconstruction
            then weighs ``1 - adv_weight`` = 0.999); 0 disables the discriminator.
        beta: ``smooth_l1``'s transition point (SimMIM: 1; data2vec: ``loss_beta`` 2).
        patch_reduce: How the values of a patch make its loss: their ``mean``, or their sum
            divided by the square root of their number (``sum_rsqrt_dim``: data2vec's
            ``loss_scale = 1 / sqrt(dim)``).

    ``beta`` and ``patch_reduce`` are left out of dumps at their defaults (hashes kept).
    """

    type: str = "l1"
    on: Literal["masked", "all"] = "masked"
    adv_weight: float = Field(0.0, ge=0.0, lt=1.0)
    beta: float = Field(1.0, gt=0.0)
    patch_reduce: Literal["mean", "sum_rsqrt_dim"] = "mean"

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return omit_at_default(self, handler(self), ("beta", "patch_reduce"))

    @field_validator("type")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        return check_name(LOSSES, value)


class PairsConfig(StrictModel):
    """Patch pairs of context prediction (Doersch, Gupta, Efros, "Unsupervised Visual
    Representation Learning by Context Prediction", ICCV 2015, Sec. 3 and 3.1; see
    :mod:`pretrain.context_prediction`): a 3x3 grid of ``patch_size`` px patches with ``gap``
    px between neighbours is placed uniformly at random in the image, the centre patch and one
    of its 8 neighbours (uniform) are cut out, each moved by up to ``jitter`` px in x and y.

    Attributes:
        patch_size: Side of a patch in pixels (the paper: 96).
        gap: Pixels between neighbouring patches of the grid before jitter (the paper: 48).
        jitter: Largest shift of each patch in x and in y, in pixels (the paper: 7).
        color: The chromatic-aberration counter-measure (Sec. 3.1): ``none``, ``drop`` (keep one
            random channel per patch, the other two replaced by Gaussian noise) or ``project``
            (remove each pixel's green-magenta component, shifting those colours towards grey).
        noise_std: ``drop``: std of the replacing noise as a fraction of the kept channel's std.
    """

    patch_size: int = Field(96, ge=1)
    gap: int = Field(48, ge=0)
    jitter: int = Field(7, ge=0)
    color: Literal["none", "drop", "project"] = "drop"
    noise_std: float = Field(0.01, ge=0.0)

    @property
    def min_image_size(self) -> int:
        """The smallest image side that holds the grid with both outer patches jittered
        outwards: ``3 patch + 2 gap + 2 jitter``."""
        return 3 * self.patch_size + 2 * self.gap + 2 * self.jitter


class EncoderDefaults(StrictModel):
    """The encoder definition a recipe's paper uses, applied to the encoder fields the user left
    unset (ViT presets only: a Swin or conv encoder keeps its own definition). ``None`` leaves a
    field to the encoder's default. See :class:`harness.core.config.encoder.EncoderConfig`.

    Attributes:
        pos_embed: ``sincos``, ``learned`` or ``none``.
        rel_pos_bias: ``none``, ``per_block`` or ``shared``.
        layer_scale: Initial layer-scale value.
    """

    pos_embed: PosEmbed | None = None
    rel_pos_bias: RelPosBias | None = None
    layer_scale: float | None = Field(None, gt=0.0)

    def given(self) -> dict[str, Any]:
        """The fields the recipe sets (not ``None``)."""
        return {k: getattr(self, k) for k in VARIANT_FIELDS if getattr(self, k) is not None}


#: ``recipe.encoder_setup``: the paper's encoder (its init and definition) or one held equal.
EncoderSetup = Literal["paper", "controlled"]

#: The photometric augmentation sets of pretraining crops (``recipe.augment``): ``none``
#: (crop and flip only) and ``dino`` (DINO's / iBOT's ``DataAugmentationDINO`` /
#: ``DataAugmentationiBOT``: colour jitter, grayscale, Gaussian blur, solarization per view).
AUGMENTS = ("none", "dino")


class RecipeConfig(StrictModel):
    """A MIM recipe: masking + encoder mode + head + target + loss + encoder initialisation.

    The recipe ``name`` selects its recipe file (every recipe and train key, citing the paper:
    :func:`harness.core.config.recipe_files.recipe_file`); every key given explicitly overrides
    the file's, so an ablation changes one value.

    Attributes:
        encoder_init: How the freshly built encoder is initialised, a name registered in
            :data:`harness.core.config.axes.ENCODER_INITS` (:mod:`pretrain.inits`: ``timm``, the
            encoder's own initialisation, also named ``default``; ``mae``, ``beit``,
            ``simmim``: the papers' reference code). Left out of dumps at ``default``, so
            configs hashed before it existed keep their hashes.
        encoder_defaults: The paper's encoder definition (relative position bias, layer scale,
            absolute position embedding), applied to the encoder fields the user left unset
            (:func:`harness.core.config.train.resolve_encoder`); ``None``: the plain ViT.
        encoder_setup: ``paper`` (the recipe file's ``encoder_init`` and
            ``encoder_defaults``) or ``controlled``: every recipe gets the same plain encoder
            definition and ``timm`` initialisation, so a comparison across recipes holds the
            encoder equal (setting either key as well is refused).
        global_crops: Views of each image in a batch, each its own random resized crop (iBOT,
            DINO: 2); more than one needs a target that compares views (``ibot``). Left out of
            dumps at 1.
        local_crops: Smaller crops of each image seen by the student only, without masks
            (iBOT's / DINO's multi-crop): their class tokens join the class-token loss against
            every global crop of the teacher (a target that ``takes_local_crops``, ``ibot``).
            Left out of dumps at 0.
        local_crop_size: Side of the local crops in pixels (iBOT: 96 for 224 px global crops),
            a multiple of the encoder's patch size, at most ``encoder.img_size``; the encoder
            interpolates its position embedding to their grid. Unused without local crops; left
            out of dumps at 96.
        local_crop_scale: RandomResizedCrop area range of the local crops, in (0, 1] (the global
            crops' is ``train.crop_scale``). Unused without local crops; left out of dumps at
            the reference's default (0.05, 0.4).
        augment: The photometric augmentation set of the pretraining crops, after the random
            resized crop and flip (:data:`AUGMENTS`): ``none`` (crop and flip only) or ``dino``
            (DINO's and iBOT's colour jitter, grayscale, Gaussian blur and solarization, with the
            first global crop, the other global crops and the local crops each given their own
            probabilities: :func:`harness.core.data.datasets.photometric_ops`). Left out of
            dumps at ``none``.
        teacher: The EMA teacher of a target that has one (``latent``); ``None`` (left out of
            dumps) for every other target.
        pairs: The patch pairs of a target that classifies their relative position (context
            prediction, its class's ``needs_pairs``); ``None`` (left out of dumps) otherwise.
        clone_batch: Masked clones of each image (data2vec 2.0: 16): the student sees every
            clone with its own mask, the target (the EMA teacher's pass) is computed once per
            image and shared by its clones. 1 (the default, left out of dumps): no clones.
    """

    name: str
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    encoder_mode: Literal["mask_token", "visible"] = "mask_token"
    head: HeadConfig = Field(default_factory=HeadConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    encoder_init: str = "default"
    encoder_defaults: EncoderDefaults | None = None
    encoder_setup: EncoderSetup = "paper"
    global_crops: int = Field(1, ge=1)
    local_crops: int = Field(0, ge=0)
    local_crop_size: int = Field(96, ge=1)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    augment: str = "none"
    teacher: TeacherConfig | None = None
    pairs: PairsConfig | None = None
    clone_batch: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _fill_recipe_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" in data:
            base = recipe_file(data["name"])["recipe"]
            if data.get("encoder_setup") == "controlled":
                _check_controlled(data)
                base.update(encoder_init="timm", encoder_defaults=None)
            return deep_merge(base, data)
        return data

    @field_validator("local_crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(
                f"recipe.local_crop_scale {list(value)}: the crop's share of the image area, "
                "[low, high] with 0 < low <= high <= 1 (iBOT's README: [0.05, 0.25])"
            )
        return value

    @field_validator("augment")
    @classmethod
    def _known_augment(cls, value: str) -> str:
        if value not in AUGMENTS:
            raise ValueError(
                f"recipe.augment '{value}' is not an augmentation set: use "
                f"{_or_list(list(AUGMENTS))} (dino: DINO's / iBOT's colour jitter, grayscale, blur "
                "and solarization)"
            )
        return value

    @field_validator("encoder_init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        return check_name(ENCODER_INITS, value)

    @model_serializer(mode="wrap")
    def _omit_default_init(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # added after records and pretraining stages were hashed: left out of every dump at its
        # default so their config hashes stay the same
        names = (
            "encoder_init",
            "encoder_defaults",
            "encoder_setup",
            "teacher",
            "global_crops",
            "local_crops",
            "local_crop_size",
            "local_crop_scale",
            "augment",
            "pairs",
            "clone_batch",
        )
        return omit_at_default(self, handler(self), names)

    @model_validator(mode="after")
    def _axes_fit_together(self) -> RecipeConfig:
        self._check_discrete()
        self._check_teacher()
        self._check_pairs()
        if self.encoder_mode == "visible":
            if HEADS.get(self.head.type).requires_full_sequence:
                fill = [n for n in HEADS.names() if not HEADS.get(n).requires_full_sequence]
                raise ValueError(
                    f"encoder_mode 'visible' leaves masked positions empty; head '{self.head.type}' "
                    f"predicts from every encoder token: use head.type: {_or_list(fill)} or "
                    "encoder_mode: mask_token"
                )
            if self.masking.mask_token_prob < 1.0 or self.masking.random_token_prob > 0.0:
                raise ValueError(
                    "masking.mask_token_prob / random_token_prob corrupt masked embeddings inside "
                    "the encoder: they need encoder_mode: mask_token"
                )
        if self.loss.adv_weight > 0 and self.target.type not in ("pixels", "norm_pixels"):
            raise ValueError("loss.adv_weight (adversarial loss) needs a pixel target")
        if self.loss.adv_weight > 0 and self.target.resolution is not None:
            raise ValueError(
                "loss.adv_weight pastes the predicted pixels into the input: it needs the "
                f"input's resolution; remove target.resolution ({self.target.resolution})"
            )
        self._check_views()
        self._check_predict_fraction()
        self._check_equal_counts()
        return self

    def _check_equal_counts(self) -> None:
        """A head that needs the same predicted count in every image (its class's
        ``equal_counts``) refuses a masker whose count varies (``per_image_ratio``, or
        ``varying_predicted``)."""
        masker = MASKERS.get(self.masking.strategy)
        if HEADS.get(self.head.type).equal_counts and (
            masker.per_image_ratio or masker.varying_predicted
        ):
            fits = [n for n in MASKERS.names() if not MASKERS.get(n).per_image_ratio
                    and not MASKERS.get(n).varying_predicted and not MASKERS.get(n).causal]  # fmt: skip
            raise ValueError(
                f"head '{self.head.type}' predicts the same number of patches in every image, "
                f"but masking.strategy '{self.masking.strategy}' predicts a different number in "
                f"each: use masking.strategy: {_or_list(fits)}"
            )

    def _check_predict_fraction(self) -> None:
        """Predicting a subset of the masked patches needs a head that predicts at given
        positions (its class's ``predicts_subset``)."""
        f = self.masking.predict_fraction
        if f < 1.0 and not HEADS.get(self.head.type).predicts_subset:
            takes = [n for n in HEADS.names() if HEADS.get(n).predicts_subset]
            raise ValueError(
                f"masking.predict_fraction {f} predicts a random subset of the masked patches, "
                f"but head '{self.head.type}' predicts every position of the grid (a subset "
                f"would only drop loss terms): set masking.predict_fraction: 1 or head.type: "
                f"{_or_list(takes)}"
            )
        if f < 1.0 and self.loss.on == "all":
            raise ValueError(
                f"masking.predict_fraction {f} predicts a subset of the masked patches, but "
                "loss.on 'all' reads every patch: set loss.on: masked or predict_fraction: 1"
            )

    def _check_views(self) -> None:
        """Several crops need a target that compares them; per-image mask counts need mask
        tokens; the class-token loss needs two crops to compare."""
        target = TARGETS.get(self.target.type)
        if self.global_crops > 1 and not target.multi_view:
            takes = [n for n in TARGETS.names() if TARGETS.get(n).multi_view]
            raise ValueError(
                f"recipe.global_crops {self.global_crops} gives each image several views; target "
                f"'{self.target.type}' takes one: set global_crops: 1 or target.type: "
                f"{' or '.join(takes)}"
            )
        if target.multi_view and self.global_crops < 2 and self.target.ibot.cls_weight > 0:
            raise ValueError(
                f"target '{self.target.type}' compares the class tokens of two crops "
                f"(ibot.cls_weight {self.target.ibot.cls_weight}) but recipe.global_crops is "
                f"{self.global_crops}: set global_crops: 2 or target.ibot.cls_weight: 0"
            )
        if self.local_crops and not target.takes_local_crops:
            takes = [n for n in TARGETS.names() if TARGETS.get(n).takes_local_crops]
            raise ValueError(
                f"recipe.local_crops {self.local_crops}: target '{self.target.type}' takes no "
                f"local crops: set local_crops: 0 or target.type: {_or_list(takes)}"
            )
        if self.local_crops and (self.global_crops < 2 or self.target.ibot.cls_weight <= 0):
            raise ValueError(
                f"recipe.local_crops {self.local_crops}: local crops feed only the class-token "
                f"loss against the teacher's global crops, which needs recipe.global_crops >= 2 "
                f"(got {self.global_crops}) and target.ibot.cls_weight > 0 (got "
                f"{self.target.ibot.cls_weight}): set local_crops: 0 or both of those"
            )
        if self.clone_batch > 1 and self.global_crops > 1:
            raise ValueError(
                f"recipe.clone_batch {self.clone_batch} repeats each image with its own masks, "
                f"recipe.global_crops {self.global_crops} gives it several crops: the two cannot "
                "be combined; set clone_batch: 1 or global_crops: 1"
            )
        if self.encoder_mode == "visible" and MASKERS.get(self.masking.strategy).per_image_ratio:
            raise ValueError(
                f"masking.strategy '{self.masking.strategy}' masks a different count in each "
                "image, which encoder_mode 'visible' cannot batch: use encoder_mode: mask_token"
            )

    def _check_teacher(self) -> None:
        """A target that reads an EMA teacher (its class's ``needs_teacher``) needs
        ``recipe.teacher``, and a teacher needs such a target."""
        needs = bool(TARGETS.get(self.target.type).needs_teacher)
        if needs and self.teacher is None:
            raise ValueError(
                f"target '{self.target.type}' is computed by an EMA teacher: set recipe.teacher "
                "(e.g. teacher: {momentum: 0.999, momentum_end: 0.9999})"
            )
        if not needs and self.teacher is not None:
            users = [n for n in TARGETS.names() if TARGETS.get(n).needs_teacher]
            raise ValueError(
                f"recipe.teacher is set but target '{self.target.type}' has no teacher: remove "
                f"recipe.teacher or use target.type: {_or_list(users)}"
            )

    def _check_pairs(self) -> None:
        """A target that classifies patch pairs (its class's ``needs_pairs``) needs
        ``recipe.pairs``, and ``recipe.pairs`` needs such a target."""
        needs = bool(TARGETS.get(self.target.type).needs_pairs)
        if needs and self.pairs is None:
            raise ValueError(
                f"target '{self.target.type}' classifies patch pairs: set recipe.pairs "
                "(e.g. pairs: {patch_size: 8, gap: 3, jitter: 1})"
            )
        if not needs and self.pairs is not None:
            users = [n for n in TARGETS.names() if TARGETS.get(n).needs_pairs]
            raise ValueError(
                f"recipe.pairs is set but target '{self.target.type}' does not use patch pairs: "
                f"remove recipe.pairs or use target.type: {_or_list(users)}"
            )

    def _check_discrete(self) -> None:
        """A discrete target (class indices) needs a classification loss and a continuous one a
        regression loss; which is which the registered classes say (their ``discrete``)."""
        discrete = bool(TARGETS.get(self.target.type).discrete_target)
        if discrete == bool(LOSSES.get(self.loss.type).discrete):
            return
        losses = [n for n in LOSSES.names() if bool(LOSSES.get(n).discrete) == discrete]
        if discrete:
            raise ValueError(
                f"target '{self.target.type}' is discrete: set loss.type: {' or '.join(losses)} "
                f"(got '{self.loss.type}')"
            )
        targets = [n for n in TARGETS.names() if TARGETS.get(n).discrete_target]
        raise ValueError(
            f"loss '{self.loss.type}' needs a discrete target ({', '.join(targets)}); "
            f"target '{self.target.type}' is continuous: use {_or_list(losses)}"
        )


def _check_controlled(data: dict[str, Any]) -> None:
    """``encoder_setup: controlled`` replaces the recipe's encoder init and definition: a user
    value for either as well contradicts it."""
    init = data.get("encoder_init", "timm")
    if init not in ("timm", "default"):
        raise ValueError(
            f"encoder_setup 'controlled' initialises every encoder with 'timm', but encoder_init "
            f"is '{init}': remove encoder_init or use encoder_setup: paper"
        )
    if data.get("encoder_defaults") is not None:
        raise ValueError(
            "encoder_setup 'controlled' uses the plain encoder definition, but encoder_defaults "
            "is given: remove it (set the encoder's own fields instead) or use encoder_setup: paper"
        )


def _or_list(names: list[str]) -> str:
    """``a, b or c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_encoder_fits(recipe: RecipeConfig, encoder: EncoderConfig, where: str) -> None:
    """Everything about a recipe that depends on the encoder, checked once the encoder is
    resolved (a pretraining config, a suite's pretrained encoder): the target's resolution and
    patchwise encoding (:func:`check_target_fits`), a narrow head's width
    (:func:`check_head_width`), what the head's class says of the encoder's width (its
    ``check_config``: data2vec 2.0's grouped convolutions, CAPI's attention heads) and the teacher's blocks
    (:func:`check_top_k`).

    Args:
        recipe: The recipe.
        encoder: The encoder config (preset filled in).
        where: The key path of the recipe in messages.

    Raises:
        ValueError: The message names both values and the fix.
    """
    check_target_fits(recipe, encoder, where)
    check_head_width(recipe, encoder, where)
    check_local_crops_fit(recipe, encoder, where)
    try:
        HEADS.get(recipe.head.type).check_config(recipe.head, int(encoder.embed_dim))  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"{where}: {exc} (encoder '{encoder.arch}')") from None
    family = ENCODER_FAMILIES.get(encoder.family)
    check_target_encoder(recipe.target, bool(family.isotropic), int(family.num_prefix_tokens),
                         f"{where}.target", f"encoder '{encoder.arch}' ({encoder.family})")  # fmt: skip
    if TARGETS.get(recipe.target.type).needs_teacher and encoder.depth is not None:
        check_top_k(recipe.target.latent.top_k, int(encoder.depth), f"{where}.target.latent",
                    f"encoder '{encoder.arch}'")  # fmt: skip


def check_local_crops_fit(recipe: RecipeConfig, encoder: EncoderConfig, where: str) -> None:
    """Local crops (``recipe.local_crops > 0``) need an encoder family that takes another input
    size (its class's ``resizable_input``), a side that the encoder's patches tile and that is
    no larger than its ``img_size`` (the global crops' side).

    Raises:
        ValueError: The message names both values and the fix.
    """
    if not recipe.local_crops:
        return
    if not ENCODER_FAMILIES.get(encoder.family).resizable_input:
        raise ValueError(
            f"{where}.local_crops {recipe.local_crops}: local crops are {recipe.local_crop_size} "
            f"px, the encoder's input {encoder.img_size} px, and a {encoder.family} encoder takes "
            f"one input size ('{encoder.arch}'): use a ViT encoder without relative position "
            f"bias, or {where}.local_crops: 0"
        )
    size, patch, img = recipe.local_crop_size, int(encoder.patch_size), int(encoder.img_size)  # type: ignore[arg-type]
    if size % patch:
        fits = [k * patch for k in (size // patch, size // patch + 1) if 0 < k * patch <= img]
        raise ValueError(
            f"{where}.local_crop_size {size} is not a multiple of the patch size {patch} of "
            f"encoder '{encoder.arch}': use {_or_list([str(f) for f in fits] or [str(patch)])}"
        )
    if size > img:
        raise ValueError(
            f"{where}.local_crop_size {size} is larger than the global crops' side "
            f"encoder.img_size {img} of encoder '{encoder.arch}': local crops are the small ones; "
            f"lower local_crop_size (iBOT: 96 for 224)"
        )


def check_target_encoder(
    target: TargetConfig, isotropic: bool, class_tokens: int, where: str, encoder: str
) -> None:
    """The one rule for what a target needs of the encoder family's shape: an EMA teacher's
    targets (its class's ``needs_teacher``) read per-block outputs at one width and grid (an
    isotropic family: ViT, BEiT, iGPT), and a loss weight on the class token (its class's
    ``class_token_weights``) needs a class token. Config validation
    (:func:`check_encoder_fits`, reading the family's class in ``ENCODER_FAMILIES``) and the
    target's construction (:class:`pretrain.teacher.LatentTarget`, reading the built encoder)
    call it.

    Args:
        target: The recipe's target config.
        isotropic: Whether every block outputs the final grid and width.
        class_tokens: The encoder's class (prefix) tokens.
        where: The key path of the target in messages.
        encoder: The encoder's name in messages.

    Raises:
        ValueError: Naming the target, the encoder and the fix.
    """
    kind = TARGETS.get(target.type)
    if kind.needs_teacher and not isotropic:
        raise ValueError(
            f"{where}.type '{target.type}' is built from an EMA teacher's per-block outputs, "
            f"which {encoder} does not give at one width and grid: use a ViT or BEiT encoder "
            f"(encoder.arch: vit_*), or a pixel target ({where}.type: pixels)"
        )
    if class_tokens < 1:
        for key, weight in kind.class_token_weights(target).items():
            if weight > 0:
                raise ValueError(
                    f"{where}.{key} {weight} weights a loss on the class token, but {encoder} "
                    f"has no class token: set {where}.{key}: 0 or use an encoder with a class "
                    "token (encoder.arch: vit_*)"
                )


def check_top_k(top_k: int, depth: int, where: str, encoder: str) -> None:
    """The one rule for a teacher target's ``latent.top_k``: it averages the last ``top_k``
    block outputs, so it may not exceed the encoder's ``depth`` blocks. Config validation
    (:func:`check_encoder_fits`) and the target's construction
    (:class:`pretrain.teacher.LatentTarget`, for a model built without a validated config) call
    it.

    Args:
        top_k: ``target.latent.top_k``.
        depth: The encoder's blocks.
        where: The key path of ``latent`` in messages.
        encoder: The encoder's name in messages.

    Raises:
        ValueError: Naming both values and the fix.
    """
    if top_k > depth:
        raise ValueError(
            f"{where}.top_k {top_k} averages the teacher's last {top_k} blocks, but {encoder} "
            f"has {depth} blocks: set {where}.top_k to at most {depth} or use a deeper encoder "
            "(encoder.depth or a larger encoder.arch)"
        )


def check_head_width(recipe: RecipeConfig, encoder: EncoderConfig, where: str = "recipe") -> None:
    """A narrow head (I-JEPA's predictor, its class's ``narrow``) may not be wider than the
    encoder.

    Raises:
        ValueError: ``head.dim`` exceeds ``encoder.embed_dim``.
    """
    width = int(encoder.embed_dim)  # type: ignore[arg-type]
    if HEADS.get(recipe.head.type).narrow and recipe.head.dim > width:
        raise ValueError(
            f"{where}.head.dim {recipe.head.dim} is wider than the encoder ({encoder.arch}: "
            f"embed_dim {width}); head '{recipe.head.type}' is a bottleneck: set {where}.head.dim "
            f"to at most {width} (I-JEPA: 384 for ViT-H's 1280)"
        )


def check_target_fits(recipe: RecipeConfig, encoder: EncoderConfig, where: str) -> None:
    """Refuse a ``target.resolution`` that the encoder's input or the head cannot produce.

    The rule is :func:`target_grid`'s (the resolution divides the input size
    and divides or is a multiple of the patch grid) and the head's
    (:meth:`pretrain.heads.Head.upsampling`: the prediction grid is a whole multiple of the
    encoder's output grid; MAE's decoder and the up-conv head predict on the patch grid only).

    Args:
        recipe: The recipe.
        encoder: The encoder config (preset filled in).
        where: The key path of the recipe in messages.

    Raises:
        ValueError: The message names the resolution and the size or grid it does not fit.
    """
    check_patchwise_fits(recipe, encoder, where)
    k = recipe.target.resolution
    if k is None:
        return
    size, patch = int(encoder.img_size), int(encoder.patch_size)  # type: ignore[arg-type]
    grid = size // patch
    try:
        target_grid(k, patch, (grid, grid))
    except ValueError as exc:
        raise ValueError(f"{where}.{exc} (encoder '{encoder.arch}')") from None
    if encoder.family == "conv":
        return  # its output grid is not in the config; the up-conv head refuses at build time
    stages = ENCODER_PRESETS[encoder.arch].get("stage_depths")
    feature = grid // 2 ** (len(stages) - 1) if stages else grid  # Swin halves it per stage
    try:
        HEADS.get(recipe.head.type).upsampling(min(k, grid), grid, feature)
    except ValueError as exc:
        raise ValueError(
            f"{where}.target.resolution {k} with head '{recipe.head.type}' on encoder "
            f"'{encoder.arch}': {exc}"
        ) from None


def check_patchwise_fits(recipe: RecipeConfig, encoder: EncoderConfig, where: str) -> None:
    """Refuse what a target that encodes image patches one by one cannot do (Selfie, context
    prediction: its class's ``patchwise_encoder``): an encoder that takes one input size (ViT,
    Swin), a patch the conv encoder's strides do not divide, and context prediction's 3x3 grid
    of pairs larger than the image.

    Args:
        recipe: The recipe.
        encoder: The encoder config (preset filled in).
        where: The key path of the recipe in messages.

    Raises:
        ValueError: The message names the sizes and the smallest one that fits.
    """
    if not TARGETS.get(recipe.target.type).patchwise_encoder:
        return
    if encoder.family != "conv":
        raise ValueError(
            f"{where}.target.type '{recipe.target.type}' encodes each image patch on its own, "
            f"which needs a convolutional encoder (any input size); '{encoder.arch}' is a "
            f"{encoder.family} encoder of one input size: use a conv preset (ce_conv_32, "
            "ce_conv_128)"
        )
    size, stride = int(encoder.img_size), 2 ** int(encoder.depth)  # type: ignore[arg-type]
    if recipe.pairs is not None:
        p = recipe.pairs
        if p.min_image_size > size:
            raise ValueError(
                f"{where}.pairs: the 3x3 grid of {p.patch_size} px patches with gap {p.gap} and "
                f"jitter {p.jitter} needs an image of at least {p.min_image_size} px "
                f"(3 patch + 2 gap + 2 jitter); encoder '{encoder.arch}' takes {size} px: use "
                f"encoder.img_size >= {p.min_image_size} or smaller pairs values"
            )
        patch = p.patch_size
    else:
        patch = int(recipe.masking.mask_patch_size or encoder.patch_size)  # type: ignore[arg-type]
    if patch % stride:
        raise ValueError(
            f"{where}: '{recipe.target.type}' encodes {patch} px patches, but encoder "
            f"'{encoder.arch}' ({encoder.depth} stride-2 convs) needs a multiple of {stride} px"
        )


def target_grid(
    resolution: int, patch_size: int, grid: tuple[int, int]
) -> tuple[tuple[int, int], int]:
    """The prediction grid and the target pixels per cell side for a ``resolution`` target.

    Args:
        resolution: Side of the target image in pixels (the input's side: every pixel).
        patch_size: The encoder's patch size.
        grid: The encoder's patch grid (square).

    Returns:
        ``(pred_grid, cell)``: the patch grid and ``resolution / grid`` when ``resolution`` is
        a multiple of the grid, else ``(resolution, resolution)`` and 1.

    Raises:
        ValueError: ``resolution`` does not divide the input size, or neither divides nor is a
            multiple of the patch grid (the message names both values).
    """
    size = patch_size * grid[0]
    if grid[0] != grid[1] and resolution != size:
        raise ValueError(f"target.resolution needs a square patch grid, got {grid[0]}x{grid[1]}")
    if resolution > size or size % resolution:
        raise ValueError(
            f"target.resolution {resolution} does not divide the input size {size}: use a "
            f"divisor of {size}"
        )
    if resolution % grid[0] == 0:
        return tuple(grid), resolution // grid[0]  # type: ignore[return-value]
    if grid[0] % resolution:
        raise ValueError(
            f"target.resolution {resolution} neither divides nor is a multiple of the "
            f"{grid[0]}x{grid[0]} patch grid (input {size}, patch {patch_size}): target pixels "
            "would straddle patches"
        )
    return (resolution, resolution), 1
