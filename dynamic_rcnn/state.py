"""Training state of Dynamic R-CNN: the windows S_I, S_E and the values T_now, beta_now.

Paper Algorithm 1: every training iteration appends one IoU statistic to
S_I and (when there were positives) one beta statistic to S_E; every C iterations

    T_now    = max(mean(S_I), IOU_FLOOR)                    (keep T_now if S_I is empty)
    beta_now = min(median(S_E), BETA_CAP)                   (keep beta_now if S_E is empty or
                                                             the median is < BETA_EPS)

and both windows are cleared; the new values apply from the next iteration on.

Everything is kept in buffers of this module, so `DetectionCheckpointer` saves it and a resumed
run continues exactly. To make that hold for every process of a distributed run (the checkpoint
is written by rank 0 only), every process keeps the state of *all* ranks: the per-iteration
statistics are all-gathered (a 4-number message per iteration), each rank's row is updated with
that rank's own statistics (``sync=False``, as in every reference code base) or all rows with
the pooled statistics (``sync=True``). Rank r reads row r. A checkpoint of another world size or
update period is fitted by `DynamicTrainingState.fit_checkpoint_state` (the rule is in its
docstring).

Buffers (W = world size, C = update period):
    iteration   () int64    executed training iterations
    iou_thr     (W,) f64    T_now of each rank
    beta        (W,) f64    beta_now of each rank
    iou_window  (W, C) f64  S_I of each rank; iou_count (W,) int64 entries used
    beta_window (W, C) f64  S_E of each rank; beta_count (W,) int64 entries used
The windows are bounded by construction: at most one entry per iteration, cleared every C.
"""
import logging
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .statistics import window_median

__all__ = ["DynamicTrainingState"]

logger = logging.getLogger(__name__)

_PER_RANK = ("iou_thr", "beta", "iou_window", "iou_count", "beta_window", "beta_count")


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class DynamicTrainingState(nn.Module):
    """Windows and current values of the dynamic IoU threshold and SmoothL1 beta."""

    def __init__(
        self,
        *,
        update_iters: int,
        initial_iou: float,
        iou_floor: float,
        initial_beta: float,
        beta_cap: float,
        beta_eps: float,
        median: str,
        sync: bool,
        world_size: Optional[int] = None,
    ):
        """
        Args:
            update_iters: C, iterations between two updates.
            initial_iou, iou_floor: T_now before the first update; floor of T_now.
            initial_beta, beta_cap: beta_now before the first update; cap of beta_now.
            beta_eps: keep beta_now when the window median is below this value.
            median: "numpy" or "upper" (see `statistics.window_median`).
            sync: pool the statistics of all processes (every rank gets the same values).
            world_size: number of processes; default: from torch.distributed (1 if not
                initialized).
        """
        super().__init__()
        if update_iters < 1:
            raise ValueError(f"MODEL.DYNAMIC_RCNN.UPDATE_ITERS must be >= 1, got {update_iters}")
        if not 0.0 < initial_iou <= 1.0 or not 0.0 < iou_floor <= 1.0:
            raise ValueError(
                "MODEL.DYNAMIC_RCNN.INITIAL_IOU and IOU_FLOOR must lie in (0, 1], got "
                f"{initial_iou} and {iou_floor}"
            )
        if initial_beta < 0 or beta_cap < 0:
            raise ValueError(
                "MODEL.DYNAMIC_RCNN.INITIAL_BETA and BETA_CAP must be >= 0, got "
                f"{initial_beta} and {beta_cap}"
            )
        if median not in ("numpy", "upper"):
            raise ValueError(
                f"MODEL.DYNAMIC_RCNN.MEDIAN must be 'numpy' or 'upper', got {median!r}"
            )
        self.update_iters = int(update_iters)
        self.iou_floor = float(iou_floor)
        self.beta_cap = float(beta_cap)
        self.beta_eps = float(beta_eps)
        self.median = median
        self.sync = bool(sync)
        w = int(world_size) if world_size is not None else _world_size()
        c = self.update_iters
        f64 = torch.float64
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        self.register_buffer("iou_thr", torch.full((w,), float(initial_iou), dtype=f64))
        self.register_buffer("beta", torch.full((w,), float(initial_beta), dtype=f64))
        self.register_buffer("iou_window", torch.zeros((w, c), dtype=f64))
        self.register_buffer("iou_count", torch.zeros((w,), dtype=torch.int64))
        self.register_buffer("beta_window", torch.zeros((w, c), dtype=f64))
        self.register_buffer("beta_count", torch.zeros((w,), dtype=torch.int64))

    @property
    def world_size(self) -> int:
        return self.iou_thr.numel()

    def current(self, rank: Optional[int] = None) -> Tuple[float, float]:
        """(T_now, beta_now) in force for ``rank`` (default: this process)."""
        r = _rank() if rank is None else rank
        if r >= self.world_size:
            raise RuntimeError(
                f"Dynamic R-CNN state was built for {self.world_size} process(es); rank {r} has "
                "no entry (build the model after torch.distributed is initialized)"
            )
        return float(self.iou_thr[r]), float(self.beta[r])

    # ------------------------------------------------------------------ per iteration
    @torch.no_grad()
    def record(
        self, iou_stat: Optional[torch.Tensor], beta_stat: Optional[torch.Tensor]
    ) -> bool:
        """Append this iteration's statistics (None = nothing to record) and update every C.

        Must be called once per training iteration by every process (it is a collective call
        when more than one process exists). Returns True when T_now / beta_now were updated
        (the new values apply from the next iteration on).
        """
        msg = torch.zeros(4, dtype=torch.float64)
        if iou_stat is not None:
            msg[0], msg[1] = float(iou_stat), 1.0
        if beta_stat is not None:
            msg[2], msg[3] = float(beta_stat), 1.0
        rows = self._gather(msg).to(self.iou_window.device)
        if rows.shape[0] != self.world_size:
            raise RuntimeError(
                f"Dynamic R-CNN state was built for {self.world_size} process(es) but the "
                f"process group has {rows.shape[0]}"
            )
        for window, count, value, present in (
            (self.iou_window, self.iou_count, rows[:, 0], rows[:, 1] > 0),
            (self.beta_window, self.beta_count, rows[:, 2], rows[:, 3] > 0),
        ):
            ranks = present.nonzero()[:, 0].to(window.device)
            if ranks.numel() and bool((count[ranks] >= window.shape[1]).any()):
                raise RuntimeError(
                    f"Dynamic R-CNN window overflow at iteration {int(self.iteration)}: "
                    f"{window.shape[1]} entries since the last update (UPDATE_ITERS="
                    f"{self.update_iters}); the state is inconsistent"
                )
            if ranks.numel():
                window[ranks, count[ranks]] = value[present].to(window)
                count[ranks] += 1
        self.iteration += 1
        if int(self.iteration) % self.update_iters == 0:
            self.update()
            return True
        return False

    @staticmethod
    def _gather(msg: torch.Tensor) -> torch.Tensor:
        """(W, 4) messages of all processes (W = 1 without torch.distributed)."""
        if _world_size() == 1:
            return msg[None]
        device = torch.device("cuda", torch.cuda.current_device()) if (
            dist.get_backend() == "nccl"
        ) else torch.device("cpu")
        msg = msg.to(device)
        out = [torch.zeros_like(msg) for _ in range(dist.get_world_size())]
        dist.all_gather(out, msg)
        return torch.stack(out).cpu()

    # ------------------------------------------------------------------ window update
    @torch.no_grad()
    def update(self) -> None:
        """Window update of T_now and beta_now, then clear the windows."""
        if self.sync:
            ious = torch.cat(
                [self.iou_window[r, : self.iou_count[r]] for r in range(self.world_size)]
            )
            betas = torch.cat(
                [self.beta_window[r, : self.beta_count[r]] for r in range(self.world_size)]
            )
            thr = self._new_threshold(ious, self.iou_thr[0])
            beta = self._new_beta(betas, self.beta[0])
            self.iou_thr.fill_(thr)
            self.beta.fill_(beta)
        else:
            for r in range(self.world_size):
                self.iou_thr[r] = self._new_threshold(
                    self.iou_window[r, : self.iou_count[r]], self.iou_thr[r]
                )
                self.beta[r] = self._new_beta(
                    self.beta_window[r, : self.beta_count[r]], self.beta[r]
                )
        self.iou_window.zero_()
        self.beta_window.zero_()
        self.iou_count.zero_()
        self.beta_count.zero_()

    def _new_threshold(self, window: torch.Tensor, old: torch.Tensor) -> float:
        """T = max(mean(S_I), floor); the mean divides by the entries present."""
        if window.numel() == 0:
            return float(old)
        return max(float(window.mean()), self.iou_floor)

    def _new_beta(self, window: torch.Tensor, old: torch.Tensor) -> float:
        """beta = min(median(S_E), cap); keep the old beta for an empty window or median < eps."""
        if window.numel() == 0:
            return float(old)
        m = float(window_median(window, self.median))
        if m < self.beta_eps:
            return float(old)
        return min(m, self.beta_cap)

    # ------------------------------------------------------------------ checkpoints
    def fit_checkpoint_state(self, state_dict, prefix: str = "") -> None:
        """Rewrite this module's entries of a checkpoint in place to fit this run.

        The rule for a checkpoint of another world size W' or update period C':

        * same W and C: nothing changes (exact resume);
        * T_now and beta_now carry over: rank r takes saved rank ``r % W'``;
        * the partial windows S_I, S_E (statistics since the last update) carry over the same
          way when C is unchanged; with another C they are dropped (they were collected for
          the old period); the next update happens when the iteration counter reaches the next
          multiple of the new C, from the statistics recorded after the resume;
        * the iteration counter carries over.

        Called by `projects.engine.checkpoint.VerifiedCheckpointer` before Detectron2 drops
        entries whose shape differs from the model's, and by ``load_state_dict``.
        """
        keys = [prefix + name for name in _PER_RANK]
        if not all(k in state_dict for k in keys):
            return
        w, c = self.world_size, self.update_iters
        saved_w = state_dict[prefix + "iou_thr"].shape[0]
        saved_c = state_dict[prefix + "iou_window"].shape[1]
        if (saved_w, saved_c) == (w, c):
            return
        rows = torch.arange(w) % saved_w
        for name in _PER_RANK:
            state_dict[prefix + name] = state_dict[prefix + name][rows].clone()
        if saved_c != c:
            for name in ("iou_window", "beta_window"):
                state_dict[prefix + name] = torch.zeros((w, c), dtype=torch.float64)
            for name in ("iou_count", "beta_count"):
                state_dict[prefix + name] = torch.zeros((w,), dtype=torch.int64)
        logger.warning(
            f"Dynamic R-CNN state in the checkpoint is of {saved_w} process(es) with "
            f"UPDATE_ITERS={saved_c}; this run has {w} and {c}: T_now and beta_now continue "
            f"(rank r from saved rank r % {saved_w})"
            + ("; the partial statistics windows are dropped (another update period)."
               if saved_c != c else "; so do the partial statistics windows.")
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """All or nothing: a checkpoint with only part of the state (e.g. Detectron2's plain
        checkpointer dropped the entries whose shape changed with the world size) restores
        none of it, with a warning, instead of mixing saved and initial values."""
        names = ("iteration",) + _PER_RANK
        present = [n for n in names if prefix + n in state_dict]
        if present and len(present) < len(names):
            for n in present:
                state_dict.pop(prefix + n)
            logger.warning(
                f"Dynamic R-CNN state ({prefix}*) is incomplete in the checkpoint (missing: "
                f"{', '.join(n for n in names if n not in present)}): none of it is restored; "
                "T_now, beta_now, the windows and the counter keep their initial values. "
                "Load with projects' Trainer or VerifiedCheckpointer to restore it across "
                "world sizes and update periods."
            )
        self.fit_checkpoint_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (
            f"update_iters={self.update_iters}, iou_floor={self.iou_floor}, "
            f"beta_cap={self.beta_cap}, median={self.median!r}, sync={self.sync}"
        )
