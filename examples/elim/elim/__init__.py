"""ELIM: optimal-transport identity matching for facial valence/arousal regression.

Reference application of :mod:`sinkhorn_ot` (Kim & Song, NeurIPS 2022). Submodules:

- :mod:`elim.models`: backbones ``f_phi`` (AlexNet, ResNet-18, MLP-Mixer) and the
  projector ``f_theta``.
- :mod:`elim.attention`: the cross-attention alternative to OT matching (ELIM-Attention).
- :mod:`elim.matching`: identity grouping, Gumbel top-k sampling and the batched
  Sinkhorn ID shift.
- :mod:`elim.losses`: the regression loss, the ELIM loss and its warm-up ramp.
- :mod:`elim.metrics`: RMSE, SAGR, PCC and CCC over a whole evaluation set.
- :mod:`elim.analysis`: trained runs -> frozen features, identity and valence/arousal
  linear probes, identity-shift pairs, t-SNE.

Submodules are not imported here so that ``import elim`` stays cheap (the backbones pull
in torchvision and timm).
"""

__all__ = ["analysis", "attention", "losses", "matching", "metrics", "models"]
