"""A linear probe on a network's frozen features, and a classifier head that starts from it.

LP-FT (Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features"): a head that starts
at zero (or random) sends large, uninformative gradients into the backbone for the first steps,
and those steps move the pretrained features before the head has learned anything. Fitting the
head first as a linear probe on the frozen features, then fine-tuning everything from there,
starts the backbone's updates from a head that already classifies. `train.head_init: probe`.

The probe is multinomial logistic regression with an L2 penalty, fitted full-batch with
torch's L-BFGS on the model's device (seconds on a GPU for Food-101's 75,750 photos, where a
CPU solver takes minutes), on centred features scaled by one overall standard deviation; that
scaling is folded into the head's weights afterwards. Its strength is chosen on the validation
split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from food101.models import classifier_head

log = logging.getLogger(__name__)

# L2 penalty per photo (sklearn's C = 1 / (penalty * n)), strongest first: ties go to the smoother head.
PENALTIES = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
DEFAULT_PENALTY = 1e-2  # with no validation photos to choose on
MAX_ITER = 300


@dataclass(frozen=True)
class Probe:
    """A fitted probe: `weight` (classes, features) and `bias` apply to raw (unstandardised) features."""

    weight: torch.Tensor
    bias: torch.Tensor
    penalty: float
    train_top1: float
    val_top1: float | None


@torch.no_grad()  # not inference_mode: the probe's solver takes gradients through these features
def pooled_features(model: nn.Module, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels): the input of the classifier head (the pooled backbone output) for every
    batch, in order, with the model in eval mode; float32 on the batches' device."""
    captured: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    head = classifier_head(model)[1]
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().flatten(1).float()))
    was_training = model.training
    model.eval()
    try:
        device = head.weight.device
        for x, y in batches:
            model(x.to(device, non_blocking=True))
            labels.append(y.to(device, non_blocking=True))
    finally:
        hook.remove()
        model.train(was_training)
    if not captured:
        raise ValueError("no batches to compute features on (is the split empty?)")
    return torch.cat(captured), torch.cat(labels).long()


def _solve(x: torch.Tensor, y: torch.Tensor, num_classes: int, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + penalty/2 * ||W||^2 (bias free) over standardised `x`."""
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    solver = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=MAX_ITER, history_size=20,
                               tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        solver.zero_grad()
        loss = nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.5 * penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        solver.step(closure)
    return weight.detach(), bias.detach()


def _top1(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    return float(((x @ weight.T + bias).argmax(1) == y).float().mean())


def fit_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None,
              num_classes: int) -> Probe:
    """Logistic regression on `train`'s features, its penalty the best of PENALTIES on `val`
    (DEFAULT_PENALTY without validation photos); the standardisation folded into the result."""
    x, y = train
    # Centred per feature, scaled by one number: a per-feature scale, folded back, gives features
    # that hardly vary (dead channels) huge raw weights, and the fine-tune's first steps then push
    # large gradients through them (a collapse to one class, measured on Lite0).
    mean, std = x.mean(0), x.std().clamp_min(1e-6)
    xs = (x - mean) / std
    has_val = val is not None and len(val[1]) > 0
    vs = ((val[0] - mean) / std, val[1]) if has_val else None
    best: tuple[float, float, torch.Tensor, torch.Tensor] | None = None
    for penalty in PENALTIES if has_val else (DEFAULT_PENALTY,):
        weight, bias = _solve(xs, y, num_classes, penalty)
        score = _top1(*vs, weight, bias) if vs is not None else 0.0
        log.debug("probe penalty %g: validation top-1 %.4f", penalty, score)
        if best is None or score > best[0]:
            best = (score, penalty, weight, bias)
    score, penalty, weight, bias = best
    # logits = ((f - mean) / std) W^T + b = f (W / std)^T + (b - (mean / std) W^T), std a scalar
    raw_weight = weight / std
    raw_bias = bias - (mean / std) @ weight.T
    return Probe(raw_weight, raw_bias, penalty, _top1(xs, y, weight, bias), score if has_val else None)


@torch.no_grad()
def set_head(model: nn.Module, probe: Probe) -> None:
    """Copy the probe into the model's classifier head (a linear layer or a 1x1 convolution)."""
    head = classifier_head(model)[1]
    if head.weight.shape[0] != probe.weight.shape[0] or head.weight[0].numel() != probe.weight.shape[1]:
        raise ValueError(f"the probe ({tuple(probe.weight.shape)}) does not fit the head "
                         f"({tuple(head.weight.shape)})")
    head.weight.copy_(probe.weight.reshape(head.weight.shape).to(head.weight))
    if head.bias is not None:
        head.bias.copy_(probe.bias.to(head.bias))


def init_head_from_probe(model: nn.Module, train_batches: Iterable, val_batches: Iterable | None,
                         num_classes: int) -> Probe:
    """Fit a probe on `train_batches` (the train split without augmentation), choose its penalty on
    `val_batches` (None: no validation photos), and start the model's head from it."""
    train = pooled_features(model, train_batches)
    val = pooled_features(model, val_batches) if val_batches is not None else None
    probe = fit_probe(train, val, num_classes)
    set_head(model, probe)
    return probe
