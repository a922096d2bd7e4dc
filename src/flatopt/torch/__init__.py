"""Drop-in ``torch.optim`` optimizers whose step is one flatopt kernel call.

``flatopt.torch.SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adadelta``, ``Adagrad``,
``NAdam``, ``RAdam``, ``Adamax``, ``Lion`` and ``Momentum`` are
:class:`torch.optim.Optimizer` subclasses with the constructor arguments and defaults of
the ``torch.optim`` class of the same name, plus a keyword-only ``n_threads`` (Momentum
and Lion have no torch twin: they take :class:`flatopt.Momentum`'s and
:class:`flatopt.Lion`'s). They
are thin adapters over flatopt's NumPy optimizers (``flatopt.SGD``, ...): no update
formula lives here.

Example::

    import flatopt.torch
    opt = flatopt.torch.SGD(model.parameters(), lr=0.1, momentum=0.9)  # was torch.optim.SGD
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30)
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()                        # one fused kernel call
        sched.step()
    torch.save(opt.state_dict(), "opt.pt")  # loads into torch.optim.SGD too

How it works
------------
At construction the parameters (CPU, float32 or float64) are copied into one flat,
64-byte-aligned buffer per dtype, owned by a NumPy optimizer, and each parameter is
rebound to a view of it (``p.data = view``). Gradients stay where autograd puts them,
as with torch.optim: ``step()`` runs the NumPy optimizer's fused kernel over zero-copy
NumPy views of the parameter and state buffers, one kernel call per parameter group and
dtype, whatever the number of tensors, and the kernel reads each gradient in place
through a table of addresses (``kernels.GradTable``). Parameters of other dtypes, on other
devices, or with sparse gradients are rejected with a clear error.

Why not attach flat-buffer views as ``p.grad``: with a view attached, autograd must
*add* each fresh gradient into it (a read-modify-write pass over every gradient in the
backward pass) where, with ``grad`` None, it hands the fresh tensor over without a copy;
views also need a gradient hook per parameter to come back after ``zero_grad()``. The
gradients are copied into a flat buffer only where something reads one:
``step(skip_if_nonfinite=True)``'s check, ``grad_norm()`` and ``clip_grad_norm_()``;
16-bit gradients are read in place too.

Gradients that are None
-----------------------
torch.optim skips a parameter whose ``grad`` is None: no update, no weight decay, no
state change, and its ``step`` count does not advance. flatopt.torch does the same,
exactly. The participating parameters are grouped into maximal runs of consecutive
parameters that share a group and a per-parameter step count, and the kernel runs once
per run. When every parameter has a gradient (the usual case) that is one call per
group; each parameter that is skipped costs at most two extra kernel calls (a split of
its run). ``zero_grad()`` does what torch.optim's does (``set_to_none=True`` by
default), skipping torch's profiler wrapper, as ``step()`` does, when no profiler runs.

16-bit models: ``master_dtype``
-------------------------------
``flatopt.torch.Adam(model.parameters(), ..., master_dtype=torch.float32)`` on a
``model.to(torch.bfloat16)`` (or ``torch.float16``) model: parameters and gradients stay
16-bit (the parameters are views of a 16-bit flat buffer), while the optimizer keeps
float32 master weights and float32 state. Each step widens the 16-bit gradients, runs the
float32 kernel on the master and state, and writes the master, rounded to nearest even,
back into the 16-bit parameters, in the same pass over memory (the kernels read the
16-bit gradients where autograd left them). The result is bit for bit that of the float32
optimizer on the master followed by torch's cast. ``opt.state[p]`` has a live
``"master_param"`` entry for every 16-bit parameter, which ``state_dict()`` saves; a
checkpoint without it (torch.optim's) loads with the 16-bit weights widened as the
master. Weights written by other code (``model.load_state_dict()``, in-place edits under
``no_grad``, seen through torch's version counters; not writes through ``p.data``, NumPy
or collectives, which those do not count) are where the next step starts: the master is
kept only where it still rounds to them. float32/float64 parameters in the same model are stepped as usual (no master).
bfloat16 needs the ``ml_dtypes`` package; without ``master_dtype`` a 16-bit parameter is
refused.

Checkpoints and state
---------------------
``state_dict()`` returns torch.optim's own format for the optimizer of the same name:
``param_groups`` with the same keys (including ``foreach``, ``fused``, ...) and integer
parameter ids numbered as torch numbers them, and per-parameter ``state`` entries with
torch's names (``momentum_buffer`` for SGD; ``step``, ``exp_avg``, ``exp_avg_sq`` and, with
amsgrad, ``max_exp_avg_sq`` for Adam; ...) that exist for exactly the parameters torch
would have state for (all of them from construction for Adagrad, as in torch). ``step``
is the per-parameter count, a scalar tensor of torch's dtype. A checkpoint saved by
``torch.optim.Adam`` (of any torch version: keys added by later versions get the defaults
torch's ``__setstate__`` gives them) loads into ``flatopt.torch.Adam`` and the other way
round, and training continues identically.

``opt.state`` is torch's ``defaultdict(dict)``: ``opt.state[p]`` is ``{}`` for a parameter
without state, entries written into it are kept (and saved), and a parameter with state
maps to tensors that are live views of the flat state buffers (``step`` a 0-d view of its
count); assigning a tensor to one of those entries copies it in. Removing a parameter's
entry (``del opt.state[p]``, ``pop``, ``clear()``, or assigning ``{}``) makes it start
afresh at its next step, as in torch, and assigning a saved entry loads it (checked as a
checkpoint's is). A value written into an entry, by assignment or by an in-place tensor
operation (``step`` included), is what the next step uses (not one written through
``.data`` or ``.numpy()``, which torch's version counter, how flatopt.torch notices a
written step count, does not see).

``add_param_group`` packs the parameters once more into new flat buffers (parameters
rebound, state and gradients carried over); ``copy.deepcopy`` and pickling rebuild the
optimizer over new buffers (a deep copy's parameters are the copied ones when they were
deep-copied with it, as with torch.optim). Each step bumps the autograd version counter
of every parameter it updates, so a backward through a graph that saved the old weights
raises, as with torch.optim.

Accuracy
--------
Results match torch.optim's to rounding: torch orders some expressions differently, so
over 100 float64 steps each tensor agrees with torch's to within about 2e-15 of its
largest element, and element by element to about 5e-13 (RMSprop), 2e-13 (SGD), 1.5e-13
(Adam, AdamW), 5e-14 (Adagrad), 2e-14 (Adadelta), measured; float32 trajectories drift
apart slowly, as torch's own for-loop and fused paths do.

Differences from torch.optim
----------------------------
* Parameters are rebound to views of a flat buffer at construction (and by
  ``add_param_group``): references to the old ``p.data`` go stale, and replacing
  ``p.data`` later (``module.to(dtype)``) is detected and rejected at the next ``step()``.
  Reason: one buffer per role is what makes a step one kernel call.
* State buffers span every parameter given, frozen ones included (torch allocates state
  only for parameters that received a gradient): pass only trainable parameters to save
  that memory. Reason: the same.
* The tensors in ``state_dict()`` are copies (torch's are the live state tensors).
  Reason: torch replaces its state tensors rarely, flatopt's live in shared flat buffers
  that a later step or load would change under a saved dict.
* ``foreach`` and ``fused`` are accepted and kept in the parameter groups (so state dicts
  interchange) but have no effect: the step is always fused. ``differentiable`` and
  ``capturable`` must be False. Reason: NumPy kernels are neither differentiable nor
  capturable.
* A parameter listed twice in a group (torch warns) is updated once per step; torch
  updates it twice. Reason: it occupies one place in the flat buffer.
* ``copy.copy(opt)`` raises TypeError (use ``copy.deepcopy``); torch's shallow copy
  shares the state. Reason: only one optimizer can own the buffers its parameters view.
* ``param_groups[i]["params"]`` cannot be changed in place (TypeError), and a group
  whose list was replaced by other parameters makes the next ``step()`` raise; torch steps
  whatever the list holds. Use ``add_param_group``. Parameters that overlap in memory
  (views of one tensor) are refused. Reason: the parameters were packed into the flat
  buffer when their group was added; a parameter added to the list would silently not be
  stepped, and overlapping ones would stop sharing memory.
* Hyperparameters are validated by the constructor's rules at every step that sees them
  change (a scheduler's value, an edit of ``param_groups``), and by ``add_param_group``
  for every group: a negative ``lr``, ``betas`` outside [0, 1), ``eps <= 0`` and the like
  raise ValueError before anything is written, where torch checks only in its
  constructor and steps with what an edit put there. Reason: the kernels' formulas
  assume the constructor's ranges.
* A state buffer that a flag turned on after the first step needs (Adam's ``amsgrad``,
  RMSprop's ``momentum`` or ``centered``; also one a checkpoint lacks) starts at zero, as
  at a first step; torch's step raises KeyError. A step then adds it to every
  parameter's entry, and ``state_dict()`` has it. Reason: the flat state is allocated
  for every parameter at once.
* A tensor ``lr`` is read as a Python float each step; torch computes some terms in the
  tensor's dtype (a float32 ``lr`` on float64 parameters: AdamW differs by about 3e-7
  relative after 20 steps; a float64 ``lr`` matches).
* ``Adagrad``: a parameter added by ``add_param_group``, loaded without state or whose
  ``opt.state`` entry was removed, gets a fresh ``sum`` (the constructor's ``initial_accumulator_value``) where torch fails at
  its first step.
* ``NAdam``: each parameter's ``mu_product`` is a scalar tensor of torch's dtype for it
  (the default scalar dtype where a first step made it, the parameter's dtype after
  ``load_state_dict``, an assigned entry's own, float32 for a 16-bit one), and the
  product rounds in that dtype, as in torch; but assigning a tensor to the key of a live
  entry (``opt.state[p]["mu_product"] = t``) copies ``t`` into it, in the entry's dtype,
  where torch replaces the tensor (assign the whole entry to change its dtype).

Importing this module imports torch; ``import flatopt`` never does.
"""

from ._optimizers import (SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, Lion, Momentum, NAdam, RAdam,
                          RMSprop)

__all__ = ["SGD", "Momentum", "Adam", "AdamW", "RMSprop", "Adadelta", "Adagrad", "NAdam", "RAdam",
           "Adamax", "Lion"]
