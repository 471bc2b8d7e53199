"""``avap``: annotator variation and annotator preference (Guo et al., section III).

Three parts share one backbone ``F_img = F_B(x)`` (eq. 1):

- **AVM** (annotator variation, eq. 2-3): the R binary masks of a structure become one
  ``(R+1)``-class map, the number of raters who marked each pixel, learnt as a
  multi-class segmentation with Dice + cross-entropy (eq. 7-9). Its soft output, the
  expected vote count divided by R, is the calibrated consensus: ``probabilities``.
  Multi-class label maps get one branch per foreground class (the paper's disc and
  cup branches). Missing raters: see :func:`raterseg.nn.avap_net.vote_count_target`
  (votes among the raters who annotated; the missing votes imputed with that fraction).
- **APM** (annotator preference, eq. 4-6): dynamic convolutions (3×3, 3×3, 1×1) whose
  kernels a controller generates from ``GAP(F_img) ‖ V_m``, V_m the one-hot code of
  rater m; it gives each rater's segmentation: ``rater_estimates``.
- **Two-step training** (section III-E): step 1 trains backbone + AVM; step 2 freezes
  them and trains APM, each step a full run of the training engine with its own
  early stopping and best-epoch weights (one run over both would compare the two
  steps' different losses and could stop before step 2). ``apm_fraction`` of the
  epochs go to step 2. In step 2 each image trains the APM on one rater drawn at
  random among those who annotated it (the paper's "randomly select different
  annotators' codes"; ``apm_raters="one"``) or on all of them (``"all"``); the
  validation loss always scores all of them. Raters who did not annotate an image never
  enter an APM step on it.

Outputs: ``probabilities`` (AVM), ``rater_estimates`` ``(R, L, *S)`` (APM, every rater,
missing or not), ``rater_maps`` = ``Σ_c q_r,c · p_c``, the probability that rater r's
label (drawn from its APM estimate) equals the consensus label (drawn from the AVM),
as CM's maps are the probability that the rater is right; ``rater_confusion``
``[r, i, j] = Σ q_r,i p_j / Σ p_j`` over the image, the same pairing as a matrix.

Choices where the paper is silent or differs from this project: the backbone is the
shared BasicUNet trunk by default (see :class:`AVAP`); every rater's APM output is
computed in each forward pass (grouped convolutions), so the APM's batch norm sees
all raters in training and inference alike; the optimiser is the project's Adam
(``lr`` 1e-3, no weight decay) rather than the paper's 1e-4 with decay 1e-5, so that
``avap`` and the baselines train under one budget; the Dice loss adds ε to its
numerator too (a class absent from a batch costs 0); the APM's output is a softmax
over the L classes, trained with the rater's own labels.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

from ..nn.avap_net import BACKBONES, AVAPNetwork, dice_ce_loss, expected_fraction, vote_count_target
from ..types import RaterSegError, TrainingEvent
from ._base import param
from ._learned import LearnedMethod
from ._registry import register_method

STEP_NAMES = {1: "backbone + AVM", 2: "APM"}


@register_method("avap", learned=True)
class AVAP(LearnedMethod):
    """Annotator variation (AVM) + annotator preference (APM) with two-step training.

    ``backbone="unet"`` (default) is the BasicUNet trunk every learned method here
    shares (1.9 M parameters with the default widths), so comparisons with ``cm``,
    ``unet`` etc. measure the method and not the backbone, and it trains on a CPU at
    small sizes. ``"resnet34"`` is the paper's U-Net with a ResNet-34 encoder (MONAI
    ``FlexibleUNet``, ``pretrained=False``: the paper's ImageNet weights are not
    downloaded; its table III puts their worth at 0.2-2.7 Dice points): 23.6 M
    parameters in 2D, 64 M in 3D, a GPU backbone; ``features`` reversed are its
    decoder widths. Both work in 2D and 3D.

    ``epochs`` covers both steps (step 2 gets ``apm_fraction`` of them), so the AVM trains
    for half the epochs by default. To compare with a ``unet`` trained for E epochs, give
    AVAP 2E: step 1 then trains as long as the U-Net (on LIDC that turned the AVM from
    6.6 points behind the U-Net on the mean into 6.8 ahead; docs/BENCHMARKS.md, "AVAP").

    ``history`` holds one record per epoch run with ``step`` (1 or 2) and ``epoch``
    counted on the planned schedule (step 2's first epoch is ``epochs - apm epochs + 1``
    even when step 1 stopped early).

    Reference: X. Guo, S. Lu et al., "Modeling Annotator Variation and Annotator
    Preference for Multiple Annotations Medical Image Segmentation" (eq. 1-9).

    Examples:
        >>> res = rs.fuse(raters, image=image, method="avap", epochs=40)
        >>> res.probabilities[1]        # expected share of raters marking class 1
        >>> res.rater_estimates[2, 1]   # rater 2's modelled p(class 1)
    """

    @dataclass(frozen=True)
    class Config(LearnedMethod.Config):
        backbone: str = param("unet", "feature extractor: the shared BasicUNet trunk, or the "
                                      "paper's ResNet-34 U-Net (FlexibleUNet, no pretrained "
                                      "weights; features reversed = decoder widths)",
                              choices=BACKBONES)
        apm_fraction: float = param(0.5, "share of the epochs for step 2 (APM, backbone and "
                                         "AVM frozen); the rest train backbone + AVM",
                                    low=0.0, high=1.0)
        apm_raters: str = param("one", "APM step: one random annotating rater per image "
                                       "(paper) or all annotating raters",
                                choices=("one", "all"))
        apm_channels: int = param(8, "channels of the dynamic convolutions (eq. 6)", low=1)
        epochs: int = param(40, "training epochs of both steps together (passes over the "
                                "slices or patches; step 2 gets apm_fraction of them)", low=2)

    def check_config(self) -> None:
        cfg = self.config
        if not 0.0 < cfg.apm_fraction < 1.0:
            raise RaterSegError(f"apm_fraction: expected a share strictly between 0 and 1 "
                                f"(both steps need epochs), got {cfg.apm_fraction}")

    def step_epochs(self) -> tuple[int, int]:
        """Epochs of step 1 (backbone + AVM) and step 2 (APM); each at least 1."""
        e = self.config.epochs
        e2 = min(e - 1, max(1, round(e * self.config.apm_fraction)))
        return e - e2, e2

    def build_network(self, in_channels, num_classes, num_raters, spatial_dims):
        return AVAPNetwork(self.config.backbone, spatial_dims, in_channels, self.config.features,
                           num_classes, num_raters, self.config.apm_channels)

    def configure_optimizer(self, parameters, lr):
        return torch.optim.Adam([p for p in parameters if p.requires_grad], lr=lr)

    # -- two-step training ---------------------------------------------------------------
    def _run_training(self, network, samples, device, *,
                      parallel: bool = True) -> Generator[TrainingEvent, None, list[dict]]:
        from .. import train

        cfg = self.config
        steps = self.step_epochs()
        total = sum(steps)
        history: list[dict] = []
        offset = 0
        try:
            for stage, epochs in ((1, steps[0]), (2, steps[1])):
                network.set_stage(stage)
                inner = train.iter_train(
                    self, network, samples, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                    val_fraction=cfg.val_fraction, patience=cfg.patience, device=device,
                    seed=self.seed, parallel=parallel)
                try:
                    while True:
                        ev = next(inner)
                        detail = ev.message.split(": ", 1)[-1]
                        yield TrainingEvent(
                            offset + ev.step, total,
                            f"{self.name} step {stage}/2 ({STEP_NAMES[stage]}): {detail}",
                            {**ev.metrics, "step": float(stage)})
                except StopIteration as stop:
                    for rec in stop.value:
                        history.append({**rec, "epoch": offset + rec["epoch"], "step": stage})
                finally:
                    inner.close()
                offset += epochs
        finally:
            network.set_stage(0)
            network.eval()
        return history

    # -- losses ----------------------------------------------------------------------------
    def loss(self, outputs, raters, annotated, state):
        # the network computes only what its stage trains: "avm" in step 1, "apm" in step 2
        if "apm" not in outputs:
            return self._avm_loss(outputs["avm"], raters, annotated)
        return self._apm_loss(outputs["apm"], raters, annotated, state)

    def _avm_loss(self, avm, raters, annotated):
        b, R = raters.shape[:2]
        spatial = avm.shape[2:]
        logits = avm.reshape(b, -1, R + 1, *spatial)
        dice_sum = ce_sum = 0.0
        for c in range(1, logits.shape[1] + 1):
            target, weight = vote_count_target(raters, annotated, c, R)
            d, ce = dice_ce_loss(logits[:, c - 1], target, weight)
            dice_sum, ce_sum = dice_sum + d, ce_sum + ce
        n = logits.shape[1]
        dice, ce = dice_sum / n, ce_sum / n
        return dice + ce, {"avm_dice": float(dice.detach()), "avm_ce": float(ce.detach())}

    def _apm_loss(self, apm, raters, annotated, state):
        b, R = raters.shape[:2]
        spatial = apm.shape[2:]
        L = apm.shape[1] // R
        logits = apm.reshape(b, R, L, *spatial)
        if self.config.apm_raters == "one" and state.training:
            # one rater per image among those who annotated it (random scores, missing -1)
            has = annotated.reshape(b, R, -1).any(-1)
            score = torch.rand(b, R, generator=state.generator).to(raters.device)
            pick = torch.where(has, score, torch.full_like(score, -1.0)).argmax(1)
            sel = pick.view(b, 1, *([1] * len(spatial)))
            lab = raters.gather(1, sel.expand(b, 1, *spatial))[:, 0]
            ann = annotated.gather(1, sel.expand(b, 1, *spatial))[:, 0]
            lg = logits.gather(1, sel.unsqueeze(2).expand(b, 1, L, *spatial))[:, 0]
        else:
            lab, ann = raters.reshape(b * R, *spatial), annotated.reshape(b * R, *spatial)
            lg = logits.reshape(b * R, L, *spatial)
        onehot = torch.nn.functional.one_hot(lab, L).movedim(-1, 1).to(lg.dtype)
        dice, ce = dice_ce_loss(lg, onehot, ann.to(lg.dtype))
        return dice + ce, {"apm_dice": float(dice.detach()), "apm_ce": float(ce.detach())}

    # -- outputs ---------------------------------------------------------------------------
    def interpret(self, outputs):
        R, L = self.num_raters, self.network_classes
        apm = outputs["apm"]
        b, spatial = apm.shape[0], apm.shape[2:]
        p = expected_fraction(outputs["avm"], L, R)  # (B, L, *s)
        q = torch.softmax(apm.reshape(b, R, L, *spatial), dim=2)  # (B, R, L, *s)
        maps = (q * p.unsqueeze(1)).sum(2)
        flat_q = q.reshape(b, R, L, 1, -1)
        flat_p = p.reshape(b, 1, 1, L, -1)
        weight = flat_p.sum(-1)  # (B, 1, 1, L)
        confusion = (flat_q * flat_p).sum(-1) / weight.clamp_min(1e-12)
        return {"probabilities": p, "rater_estimates": q, "rater_maps": maps,
                "rater_confusion": confusion, "confusion_weight": weight}
