"""flatopt.flatten and FlatLayout: packing, alignment, views, dtype rules."""

import pickle

import numpy as np
import pytest

import flatopt


def test_flatten_packs_in_order_without_gaps():
    arrays = [np.arange(6.0).reshape(2, 3), np.array(7.0), np.zeros((0, 4)), np.arange(3.0)]
    flat, views = flatopt.flatten(arrays)
    assert flat.ndim == 1 and flat.flags.c_contiguous and flat.size == 10
    assert flat.ctypes.data % 64 == 0
    np.testing.assert_array_equal(flat, [0, 1, 2, 3, 4, 5, 7, 0, 1, 2])
    for v, a in zip(views, arrays):
        assert v.shape == a.shape and np.shares_memory(v, flat) or v.size == 0
        np.testing.assert_array_equal(v, a)
    views[0][1, 2] = 42.0
    assert flat[5] == 42.0
    assert arrays[0][1, 2] == 5.0  # inputs were copied


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flatten_dtype_conversion(dtype):
    flat, views = flatopt.flatten([np.arange(3), np.ones(2, np.float16)], dtype=dtype)
    assert flat.dtype == dtype and all(v.dtype == dtype for v in views)
    np.testing.assert_array_equal(flat, [0, 1, 2, 1, 1])


@pytest.mark.parametrize(
    "arrays, dtype, exc, match",
    [
        ([np.ones(2, np.float32), np.ones(2)], None, TypeError, "share one dtype"),
        ([np.arange(3)], None, TypeError, r"arrays\[0\] must have float32 or float64"),
        ([np.ones(3, np.float16)], None, TypeError, "float16"),
        ([np.ones(3, complex)], np.float64, TypeError, "complex"),
        ([np.ones(3, bool)], np.float64, TypeError, "bool"),
        ([np.ones(3)], np.int32, TypeError, "dtype must be float32 or float64"),
        (np.ones(3), None, TypeError, "sequence of arrays"),
        ("ab", None, TypeError, "arrays must be a sequence of arrays, got str 'ab'"),
    ],
)
def test_flatten_rejects(arrays, dtype, exc, match):
    with pytest.raises(exc, match=match):
        flatopt.flatten(arrays, dtype=dtype)


def test_flatten_accepts_array_likes():
    flat, views = flatopt.flatten([[1.0, 2.0], [[3.0]]])
    np.testing.assert_array_equal(flat, [1, 2, 3])
    assert views[1].shape == (1, 1)


def test_layout_roundtrip_and_split():
    layout = flatopt.FlatLayout.from_arrays([np.ones((2, 2), np.float32), np.ones(3, np.float32)])
    assert layout.size == 7 and layout.offsets == (0, 4) and len(layout) == 2
    assert layout.dtype == np.float32
    buf = layout.zeros()
    assert buf.dtype == np.float32 and buf.ctypes.data % 64 == 0 and not buf.any()
    a, b = layout.split(buf)
    b[:] = 1
    np.testing.assert_array_equal(buf, [0, 0, 0, 0, 1, 1, 1])
    assert flatopt.FlatLayout.from_dict(layout.to_dict()) == layout
    assert pickle.loads(pickle.dumps(layout)) == layout
    packed = layout.pack([np.full((2, 2), 2.0), np.arange(3.0)])
    np.testing.assert_array_equal(packed, [2, 2, 2, 2, 0, 1, 2])


def test_layout_split_and_pack_validate():
    layout = flatopt.FlatLayout(((3,), (2,)), np.float64)
    with pytest.raises(ValueError, match="flat must have length 5, got 4"):
        layout.split(np.zeros(4))
    with pytest.raises(TypeError, match="flat must have dtype float64, got float32"):
        layout.split(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="flat must be C-contiguous"):
        layout.split(np.zeros(10)[::2])
    with pytest.raises(ValueError, match=r"arrays\[1\] must have shape \(2,\), got \(3,\)"):
        layout.pack([np.zeros(3), np.zeros(3)])
    with pytest.raises(ValueError, match="must have 2 entries, got 1"):
        layout.pack([np.zeros(3)])
    with pytest.raises(ValueError, match="non-negative"):
        flatopt.FlatLayout(((-1,),), np.float64)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got None"):
        flatopt.FlatLayout(((3,),), None)  # NumPy would read None as float64


def test_large_buffers_start_at_staggered_page_offsets():
    # Consecutive large buffers (an optimizer's param, grad and state) must not share their
    # offset within a 4 KiB page (4K aliasing, see flatopt._layout); all stay 64-byte aligned.
    from flatopt import _layout

    n = _layout.STAGGER_MIN_BYTES // 4
    layout = flatopt.FlatLayout([(n,)], np.float32)
    bufs = [layout.zeros() for _ in range(_layout.PAGE // _layout.STAGGER_STEP)]
    offsets = [b.ctypes.data % _layout.PAGE for b in bufs]
    assert len(set(offsets)) == len(bufs)
    assert all(o % 64 == 0 for o in offsets)
    assert all(b.size == n and b.dtype == np.float32 and not b.any() for b in bufs)
    small = flatopt.FlatLayout([(7,)], np.float64).zeros()
    assert small.ctypes.data % 64 == 0 and small.size == 7
