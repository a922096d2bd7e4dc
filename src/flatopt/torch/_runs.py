"""Run planning: which kernel calls a step makes.

torch.optim skips a parameter whose grad is None and keeps a step count per parameter.
The kernel runs once per maximal run of consecutive participating parameters of one
group that share a step count: one run per group in the usual case.
"""


def plan_runs(bucket, taking_part, uses_state):
    """The runs of one bucket for the NumPy step routine: a list of
    ``(gi, lo, hi, step, fresh)`` (see ``flatopt.Optimizer._finish_step``) and, beside
    it, the parameter ranges ``(a, b)`` whose step counts advance."""
    runs, advance = [], []
    counts = bucket.counts
    for gi, (first, stop) in enumerate(bucket.ranges):
        counting = uses_state(bucket.opt.param_groups[gi])
        for a, b, count in param_runs(taking_part, counts, first, stop):
            runs.append((gi, int(bucket.starts[a]), int(bucket.stops[b - 1]), count + 1, count == 0))
            if counting:
                advance.append((a, b))
    return runs, advance


def param_runs(taking_part, counts, first, stop):
    """Maximal runs ``(a, b, count)`` of consecutive participating parameters in
    ``[first, stop)`` that share a step count."""
    if stop <= first:
        return []
    part, cnt = taking_part[first:stop], counts[first:stop]
    if part.all() and (cnt == cnt[0]).all():
        return [(first, stop, int(cnt[0]))]
    runs, start = [], None
    for j in range(first, stop + 1):
        if start is not None and (j == stop or not taking_part[j] or counts[j] != counts[start]):
            runs.append((start, j, int(counts[start])))
            start = None
        if j < stop and taking_part[j] and start is None:
            start = j
    return runs


def updated_params(bucket, taking_part):
    """The parameters a step with ``taking_part`` writes (for their version counters)."""
    if taking_part is bucket.all_taking_part:
        return bucket.params
    return [p for p, t in zip(bucket.params, taking_part) if t]

