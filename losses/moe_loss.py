"""Load-balancing auxiliary loss for the gates of SSIU's Mixture-of-Experts feature selector."""
from __future__ import annotations

import torch
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from .loss_util import check_reduction, reduce


@LOSS_REGISTRY.register()
class MoELoadBalancingLoss(nn.Module):
    """Squared coefficient of variation of expert importance: 0 iff the experts are used equally.

    For gate probabilities ``g`` of shape (N, E, C, H, W) (softmax over the E experts on dim 1, per
    pixel and channel), the importance of expert ``e`` in image ``n`` is its mean gate over channels
    and pixels, ``I[n, e]``, and the loss per image is

        ``CV^2(I[n]) = Var_e(I[n, e]) / Mean_e(I[n, e])^2 = E * sum_e I[n, e]^2 - 1``,

    the importance loss of Shazeer et al. (2017). It is 0 exactly when every expert has importance
    ``1 / E`` and grows to ``E - 1`` when one expert takes every gate. The Switch-Transformer loss
    ``E * sum_e f_e P_e`` (Fedus et al., 2021) needs the hard fraction ``f_e`` of tokens dispatched
    to each expert; SSIU's gates are dense (every expert contributes everywhere, nothing is
    dispatched), so ``f_e`` is replaced by the soft ``P_e = I_e``, which gives ``CV^2 + 1``: the
    same gradient, but with a minimum of 1 instead of 0. We use the CV^2 form for its zero.

    Args:
        loss_weight: multiplier of the loss. Default: 1.0.
        reduction: ``'none'`` (one value per image, shape (N,)), ``'mean'`` or ``'sum'`` over the batch.
            Default: ``'mean'``.
        atol: tolerance of the check that gates sum to one over the experts. Default: 1e-3.
    """

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean', atol: float = 1e-3) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.reduction = check_reduction(reduction)
        self.atol = atol

    def forward(self, gates: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``gates``: (N, E, C, H, W) probabilities over the experts (dim 1); further arguments are ignored."""
        if gates.dim() != 5:
            raise ValueError(f'MoELoadBalancingLoss: expected gates of shape (N, E, C, H, W) with experts on '
                             f'dim 1, got {tuple(gates.shape)}')
        with torch.no_grad():
            total = gates.sum(dim=1)
            if gates.min() < 0 or not torch.allclose(total, torch.ones_like(total), atol=self.atol, rtol=0):
                raise ValueError('MoELoadBalancingLoss: gates must be probabilities summing to one over the '
                                 f'experts (dim 1); got sums in [{total.min():.4g}, {total.max():.4g}], '
                                 f'min gate {gates.min():.4g} (pass softmax outputs, not logits)')
        num_experts = gates.shape[1]
        importance = gates.to(torch.promote_types(gates.dtype, torch.float32)).mean(dim=(2, 3, 4))
        loss = num_experts * importance.square().sum(dim=1) - 1
        return self.loss_weight * reduce(loss, self.reduction)
