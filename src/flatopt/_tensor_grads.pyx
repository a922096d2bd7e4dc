# cython: language_level=3
"""The gradient checks of flatopt.torch's usual step, as one C loop.

flatopt.torch's ``step()`` reads each parameter's gradient where autograd left it (see
``flatopt.torch._packing``). Before the kernel may, every gradient must be a contiguous
tensor of its parameter's layout, dtype and shape, and every parameter must still view
its flat buffer. Done with Python-level ``map`` calls, these checks and the
``GradTable`` over the gradients' addresses took 3.2 us a step for one tensor; with
this loop, which makes the same torch calls from C, 1.2 us (Python 3.11, Intel Xeon,
one session). torch is not imported here: the tensors are Python objects like any other.
"""

from libc.stdint cimport intptr_t


def usual_grads(list params, list data_ptrs, list signatures, intptr_t[::1] sources not None):
    """The gradients of ``params`` for the usual step, or None when it is not one.

    It is one when, for every ``i``: ``params[i].data_ptr() == data_ptrs[i]``, the
    parameter is contiguous (not replaced by a transposed view of its memory, which the
    kernel would update in another element order than its gradient's), and
    ``params[i].grad`` is a contiguous tensor whose ``(layout, dtype, shape)`` is
    ``signatures[i]``. Then ``sources[2*i]`` is set to that gradient's address for
    every ``i`` (a ``GradTable``'s sources, a parameter's gradient and the padding after
    it alternating) and the list of gradients is returned; the caller keeps it alive
    while a kernel reads the addresses. On None, ``sources`` may have been partly
    written: it is scratch that every step writes afresh.
    """
    cdef Py_ssize_t i, n = len(params)
    if len(data_ptrs) != n or len(signatures) != n or sources.shape[0] < 2 * n:
        raise ValueError(f"usual_grads: {n} params need {n} data_ptrs and signatures and "
                         f"{2 * n} sources, got {len(data_ptrs)}, {len(signatures)} and "
                         f"{sources.shape[0]}")
    cdef list grads = [None] * n
    cdef tuple signature
    for i in range(n):
        p = params[i]
        if p.data_ptr() != data_ptrs[i] or not p.is_contiguous():
            return None
        g = p.grad
        if g is None:
            return None
        signature = signatures[i]
        if g.layout is not signature[0] or g.dtype is not signature[1] or g.shape != signature[2]:
            return None
        if not g.is_contiguous():
            return None
        sources[2 * i] = g.data_ptr()
        grads[i] = g
    return grads
