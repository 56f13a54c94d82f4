"""ELIM-Attention: a learned cross-attention weight in place of the OT ID shift.

Appendix §4.3: each identity's feature set goes through a multi-head self-attention
layer; a cross-attention layer then lets every target sample attend to the reference
set; a linear layer with one output turns each target sample into a scalar weight. The
``m`` weights of a target set replace the ID shift ``mu`` of OT matching.

All target sets of a training step are processed in one batched call; ragged sets are
padded and described by boolean masks (``True`` = real sample). The residual +
LayerNorm wiring follows the authors' (non-running) ``CrossHeadAttention``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ELIMAttention"]


def _check_mask(name: str, mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    if mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(
            f"`{name}` must be a bool tensor of shape {shape}, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    if not bool(mask.any(-1).all()):
        raise ValueError(f"`{name}` must mark at least one valid sample in every set")
    return mask


class ELIMAttention(nn.Module):
    """Self-attention per identity set, cross-attention target -> reference, FC to 1.

    With ``feature_dim = 64`` it has 33,601 parameters (the appendix: "less than 100K").

    Args:
        feature_dim: feature size ``D``; must be divisible by ``num_heads``.
        num_heads: attention heads of both MHA layers.
        dropout: attention dropout (off in ``eval()``).

    Example:
        >>> att = ELIMAttention(feature_dim=16, num_heads=4)
        >>> ref = torch.randn(5, 16)                      # (n_ref, D)
        >>> tgt = torch.randn(3, 4, 16)                   # (T, m_max, D)
        >>> mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
        >>> w = att(ref, tgt, mask)
        >>> w.shape, bool((w[~mask] == 0).all())
        (torch.Size([3, 4]), True)
    """

    def __init__(self, feature_dim: int, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"`feature_dim` must be a positive int, got {feature_dim!r}")
        if not isinstance(num_heads, int) or num_heads < 1 or feature_dim % num_heads:
            raise ValueError(
                f"`num_heads` must be a positive divisor of feature_dim={feature_dim}, "
                f"got {num_heads!r}"
            )
        # One self-attention layer shared by all identities: it describes "a set of
        # samples of one person", whichever person it is.
        self.self_attn = nn.MultiheadAttention(feature_dim, num_heads, dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(feature_dim)
        self.cross_attn = nn.MultiheadAttention(feature_dim, num_heads, dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(feature_dim)
        self.fc = nn.Linear(feature_dim, 1)
        self.feature_dim = feature_dim

    def _self_block(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.self_attn(x, x, x, key_padding_mask=~mask, need_weights=False)
        return self.norm_self(x + out)

    def forward(
        self,
        reference: torch.Tensor,
        targets: torch.Tensor,
        target_mask: torch.Tensor | None = None,
        reference_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weights for every target sample.

        Args:
            reference: reference features, ``(n_ref, D)`` shared by all targets, or
                ``(T, n_max, D)`` one (padded) reference set per target set.
            targets: padded target sets ``(T, m_max, D)``.
            target_mask: ``(T, m_max)`` bool, ``True`` for real samples; ``None`` =
                no padding.
            reference_mask: ``(T, n_max)`` bool for a padded 3-D ``reference``;
                ``None`` = no padding.

        Returns:
            Weights ``(T, m_max)``; exactly 0 at padded positions. Values at real
            positions do not depend on padded features.
        """
        d = self.feature_dim
        if targets.dim() != 3 or targets.shape[-1] != d:
            raise ValueError(
                f"`targets` must have shape (T, m_max, {d}), got {tuple(targets.shape)}"
            )
        n_sets, m_max, _ = targets.shape
        if reference.dim() == 2:
            reference = reference.unsqueeze(0)
            if reference_mask is not None:
                raise ValueError("`reference_mask` must be None for a 2-D (n_ref, D) `reference`")
        if (
            reference.dim() != 3
            or reference.shape[-1] != d
            or reference.shape[0] not in (1, n_sets)
        ):
            raise ValueError(
                f"`reference` must have shape (n_ref, {d}) or ({n_sets}, n_max, {d}), "
                f"got {tuple(reference.shape)}"
            )
        device = targets.device
        t_mask = _check_mask("target_mask", target_mask, (n_sets, m_max)).to(device)
        r_mask = _check_mask("reference_mask", reference_mask, tuple(reference.shape[:2]))
        r_mask = r_mask.to(device)

        # Zeroing padding keeps NaN/inf there from leaking through 0 * value products.
        targets = targets.masked_fill(~t_mask.unsqueeze(-1), 0.0)
        reference = reference.masked_fill(~r_mask.unsqueeze(-1), 0.0)

        ref = self._self_block(reference, r_mask)
        tgt = self._self_block(targets, t_mask)
        if ref.shape[0] != n_sets:
            # The shared reference is attended once, then viewed (not copied) per target.
            ref = ref.expand(n_sets, -1, -1)
            r_mask = r_mask.expand(n_sets, -1)
        out, _ = self.cross_attn(tgt, ref, ref, key_padding_mask=~r_mask, need_weights=False)
        out = self.norm_cross(tgt + out)
        return self.fc(out).squeeze(-1).masked_fill(~t_mask, 0.0)
