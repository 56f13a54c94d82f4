"""The few collectives a sharded solve needs, on one ``torch.distributed`` group.

Everything that crosses ranks goes through :class:`Ranks`, so the communication of a
solve can be read (and counted, see docs/distributed.md) in one place:

* :meth:`Ranks.total`: an all-reduce SUM (masses, violations, ``<f, a>``, products
  ``P^T u`` over the rows of every rank);
* :meth:`Ranks.logsumexp`: the stable log-sum-exp over ranks of per-rank partial
  log-sum-exps (the column update of a row-sharded problem);
* :meth:`Ranks.exchange`: one ``all_gather_object`` of small Python objects (the
  collective validation, once per call);
* :meth:`Ranks.ring`: the blocks of the other ranks one after another (point-to-point
  along a ring), for problems whose columns are sharded too.

Every rank must call the same collectives in the same order: the solver makes all of
its decisions (stop, fall back, raise) from values that are identical on every rank
after a collective. That relies on an all-reduce delivering bit-identical results to
all ranks, which holds for gloo's and NCCL's algorithms (reduce-scatter then
all-gather: each chunk is reduced once and copied to everyone).

Autograd convention (docs/distributed.md, "Gradients"): every rank backpropagates the
same scalar loss. A value summed over ranks then passes its gradient back unchanged
(:class:`SumOverRanks`), and a replicated input whose gradient is assembled from the
local rows of every rank has its gradient summed over ranks (:class:`SumGradients`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist


class Ranks:
    """A ``torch.distributed`` process group and the collectives of a sharded solve.

    Args:
        group: a process group (``dist.group.WORLD`` or one from ``dist.new_group``).

    Example:
        >>> import torch.distributed as dist
        >>> from sinkhorn_ot._collectives import Ranks
        >>> dist.is_initialized()  # outside torchrun there is no group to use
        False
    """

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    # ------------------------------------------------------------------ reductions
    def total(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``t`` (any shape), a new tensor; no autograd."""
        out = t.detach().clone(memory_format=torch.contiguous_format)
        # Also with one rank: `torchrun --nproc_per_node 1` then exercises the backend.
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def maximum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over ranks of ``t``, a new tensor; no autograd."""
        out = t.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out

    def logsumexp(self, lse: torch.Tensor) -> torch.Tensor:
        """``log sum_r exp(lse_r)`` elementwise over ranks, stable: two all-reduces.

        The maximum over ranks first (``-inf`` where every rank has no mass), then the
        sum of ``exp(lse_r - max)``, each term in ``[0, 1]``.
        """
        top = self.maximum(lse)
        safe_top = torch.where(torch.isfinite(top), top, 0)
        return safe_top + self.total(torch.exp(lse - safe_top)).log()

    def shifted_logsumexp(
        self, lse: torch.Tensor, shift: torch.Tensor, extra: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``log sum_r exp(lse_r)`` with ONE all-reduce, and the sum over ranks of ``extra``.

        ``shift`` (same shape as ``lse``, identical on every rank) is a guess of the
        result: the sum over ranks of ``exp(lse_r - shift)`` is all-reduced together with
        ``extra`` in one buffer. In the Sinkhorn loop the guess is ``-g / eps`` of the
        previous iterate, so the sum is the column mass of the plan over ``b`` (about 1
        near convergence), far from over- and underflow. Where any entry of the sum is
        not finite or below ``tiny / eps_machine`` (digits lost), the first result is
        ``None`` and the caller uses :meth:`logsumexp` instead; that decision reads only
        all-reduced values, so every rank takes it alike.

        Returns:
            ``(log-sum-exp or None, sum of extra)``.
        """
        # float64 whatever the dtype: the violation is accumulated in float64 (as the
        # single-process loop does), and one buffer has one dtype.
        scaled = torch.exp((lse - shift).double())
        flat = self.total(torch.cat([scaled.reshape(-1), extra.reshape(-1).double()]))
        summed, extra_total = flat[: scaled.numel()].view_as(scaled), flat[scaled.numel() :]
        extra_total = extra_total.to(extra.dtype).view_as(extra)
        info = torch.finfo(summed.dtype)
        usable = bool((torch.isfinite(summed) & (summed >= info.tiny / info.eps)).all())
        return (shift + summed.log().to(lse.dtype) if usable else None), extra_total

    # ------------------------------------------------------------------ objects
    def exchange(self, obj: object) -> list:
        """Every rank's ``obj`` (picklable), in rank order: one ``all_gather_object``."""
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    # ------------------------------------------------------------------ ring
    def ring(self, block: torch.Tensor, shapes: list[tuple[int, ...]]) -> Iterator:
        """``(owner, block of owner)`` for every rank, own block first, then along a ring.

        Rank ``r`` receives from ``r - 1`` and sends to ``r + 1``: after ``k`` steps it
        holds the block of rank ``r - k``. The transfer of the next block is posted before
        the current one is handed out, so it overlaps the caller's work on it.

        Args:
            block: this rank's block (contiguous).
            shapes: the shape of every rank's block (they may differ, uneven shards).
        """
        current, owner = block.contiguous(), self.rank
        ranks = dist.get_process_group_ranks(self.group) if self.size > 1 else [0]
        for step in range(self.size):
            pending, incoming = None, None
            if step + 1 < self.size:
                source = (self.rank - step - 1) % self.size
                incoming = current.new_empty(shapes[source])
                ops = [
                    dist.P2POp(dist.isend, current, ranks[(self.rank + 1) % self.size], self.group),
                    dist.P2POp(
                        dist.irecv, incoming, ranks[(self.rank - 1) % self.size], self.group
                    ),
                ]
                pending = dist.batch_isend_irecv(ops)
            yield owner, current
            if pending is not None:
                for request in pending:
                    request.wait()
                current, owner = incoming, (owner - 1) % self.size


class SumOverRanks(torch.autograd.Function):
    """``sum_r t_r`` over ranks; the gradient passes back unchanged.

    Every rank backpropagates the same loss, so the output's gradient is the same on
    every rank and is exactly the gradient of each rank's own term.
    """

    @staticmethod
    def forward(ctx, t, ranks):
        return ranks.total(t)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SumGradients(torch.autograd.Function):
    """Identity on a replicated tensor; its gradient is summed over ranks.

    For inputs such as a replicated ``y``: each rank's backward sees only the terms of
    its own rows, and the sum over ranks is the whole gradient (the same on every rank).
    """

    @staticmethod
    def forward(ctx, t, ranks):
        ctx.ranks = ranks
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return ctx.ranks.total(grad), None


__all__ = ["Ranks", "SumGradients", "SumOverRanks"]
