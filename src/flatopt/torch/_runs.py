"""Run planning: which kernel calls a step makes.

torch.optim skips a parameter whose grad is None and keeps a step count per parameter.
The kernel runs once per maximal run of consecutive participating parameters of one
group that share a step count: one run per group in the usual case.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .._optimizer import _Run
from ._packing import Bucket

#: The parameter range ``(a, b)`` whose step counts a run advances (None: no state).
Advance = tuple[int, int] | None


def plan_runs(bucket: Bucket, taking_part: npt.NDArray[np.bool_],
              uses_state: Callable[[dict[str, Any]], bool],
              keys: npt.NDArray[Any] | None = None) -> tuple[list[_Run], list[Advance]]:
    """The runs of one bucket for the NumPy step routine: a list of
    ``(gi, lo, hi, step, fresh)`` (see ``flatopt.Optimizer._finish_step``) and, beside
    it, for each run, the parameter range ``(a, b)`` whose step counts it advances (None
    when its group keeps no state). With ``keys`` (a value per parameter, such as NAdam's
    mu_product), the parameters of a run also share their key.

    ``bucket.uniform`` (one run per group, counts shared) is trusted for counts; keys
    (live in the state entries, where a user may write them in place) are compared on
    every step."""
    steps_written(bucket)
    if taking_part is bucket.all_taking_part and bucket.uniform and keys is None:
        # The usual case: every parameter takes part and each group's parameters share
        # one step count (kept true by the step that made it so): one run per group.
        return usual_runs(bucket, usual_plan(bucket, uses_state))
    runs: list[_Run] = []
    advance: list[Advance] = []
    counts = bucket.counts
    for gi, (first, stop) in enumerate(bucket.ranges):
        counting = uses_state(bucket.opt.param_groups[gi])
        for a, b, count in param_runs(taking_part, counts, first, stop, keys):
            runs.append((gi, int(bucket.starts[a]), int(bucket.stops[b - 1]), count + 1, count == 0))
            advance.append((a, b) if counting else None)
    # After this step, is every group's count uniform again?
    bucket.uniform = taking_part is bucket.all_taking_part and all(
        len(r) <= 1 for r in _per_group(runs, len(bucket.ranges)))
    return runs, advance


def steps_written(bucket: Bucket) -> bool:
    """Whether a step count of ``bucket`` was written through a state entry since the
    last call (then its groups' counts may differ: their runs are planned afresh)."""
    version = bucket.steps._version
    if version == bucket.steps_version:
        return False
    bucket.steps_version = version
    bucket.uniform = False
    bucket.usual = None
    return True


#: A run of the usual step (see :func:`usual_plan`): ``(gi, lo, hi, first, advance)``.
UsualRun = tuple[int, int, int, int, Advance]


def usual_plan(bucket: Bucket, uses_state: Callable[[dict[str, Any]], bool]) -> list[UsualRun]:
    """The runs of a step in which every parameter takes part and each group's
    parameters share one step count: one per non-empty group ``gi``, over its elements
    ``[lo, hi)``, at the count of its parameter ``first``, advancing the counts of
    ``advance`` (its parameter range, None when the group keeps no state)."""
    return [(gi, *bucket.group_bounds[gi], first, (first, stop) if uses_state(bucket.opt.param_groups[gi]) else None)
            for gi, (first, stop) in enumerate(bucket.ranges) if first != stop]


def usual_runs(bucket: Bucket, plan: list[UsualRun]) -> tuple[list[_Run], list[Advance]]:
    """:func:`plan_runs`'s result for ``plan`` at today's counts."""
    counts = bucket.counts
    runs: list[_Run] = []
    for gi, lo, hi, first, _ in plan:
        count = int(counts[first])
        runs.append((gi, lo, hi, count + 1, count == 0))
    return runs, [entry[4] for entry in plan]


def advance_counts(bucket: Bucket, runs: Sequence[_Run], advance: Sequence[Advance]) -> None:
    """Give the parameters each run advances that run's step (they share its count:
    set, not add, 2x faster)."""
    counts = bucket.counts
    for run, span in zip(runs, advance):
        if span is not None:
            counts[span[0]:span[1]] = run[3]


def _per_group(runs: Sequence[_Run], n_groups: int) -> list[list[_Run]]:
    groups: list[list[_Run]] = [[] for _ in range(n_groups)]
    for run in runs:
        groups[run[0]].append(run)
    return groups


def param_runs(taking_part: npt.NDArray[np.bool_], counts: npt.NDArray[Any], first: int,
               stop: int, keys: npt.NDArray[Any] | None = None) -> list[tuple[int, int, int]]:
    """Maximal runs ``(a, b, count)`` of consecutive participating parameters in
    ``[first, stop)`` that share a step count (and a key, with ``keys``)."""
    if stop <= first:
        return []
    part, cnt = taking_part[first:stop], counts[first:stop]
    if part.all() and (cnt == cnt[0]).all() and (keys is None or (keys[first:stop] == keys[first]).all()):
        return [(first, stop, int(cnt[0]))]
    runs: list[tuple[int, int, int]] = []
    start: int | None = None
    for j in range(first, stop + 1):
        if start is not None and (j == stop or not taking_part[j] or counts[j] != counts[start]
                                  or (keys is not None and keys[j] != keys[start])):
            runs.append((start, j, int(counts[start])))
            start = None
        if j < stop and taking_part[j] and start is None:
            start = j
    return runs


def updated_params(bucket: Bucket, taking_part: npt.NDArray[np.bool_]) -> list[torch.Tensor]:
    """The parameters a step with ``taking_part`` writes (for their version counters)."""
    if taking_part is bucket.all_taking_part:
        return bucket.params
    return [p for p, t in zip(bucket.params, taking_part) if t]

