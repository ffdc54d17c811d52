"""kernels.workspace: one reused buffer per slot, dtype and thread; dequantising into it equals a fresh dequantisation."""

import threading

import pytest
import torch

from lorakit.kernels import quantize as kq
from lorakit.kernels import workspace


def test_scratch_reuses_one_buffer_and_grows_to_the_largest_size():
    workspace.release()
    big = workspace.scratch((8, 16), torch.float32, "cpu")
    small = workspace.scratch((4, 4), torch.float32, "cpu")
    assert small.shape == (4, 4) and small.data_ptr() == big.data_ptr()
    other_slot = workspace.scratch((4, 4), torch.float32, "cpu", slot="codes")
    other_dtype = workspace.scratch((4, 4), torch.bfloat16, "cpu")
    assert len({big.data_ptr(), other_slot.data_ptr(), other_dtype.data_ptr()}) == 3
    grown = workspace.scratch((32, 16), torch.float32, "cpu")
    assert grown.numel() == 512 and workspace.scratch((8, 16), torch.float32, "cpu").data_ptr() == grown.data_ptr()
    workspace.release()


def test_each_thread_has_its_own_buffer():
    mine = workspace.scratch((4, 4), torch.float32, "cpu").data_ptr()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(workspace.scratch((4, 4), torch.float32, "cpu").data_ptr()))
    thread.start()
    thread.join()
    assert seen and seen[0] != mine


def test_widened_copies_into_the_buffer_and_leaves_a_same_dtype_weight_alone():
    w = torch.randn(6, 10).bfloat16()
    wide = workspace.widened(w, torch.float32)
    assert wide.dtype == torch.float32 and torch.equal(wide, w.float())
    assert wide.data_ptr() == workspace.scratch((6, 10), torch.float32, "cpu").data_ptr()
    assert workspace.widened(wide, torch.float32) is wide
    conv1d_layout = torch.randn(10, 6).bfloat16().t()  # a transposed view widens to the same values
    assert torch.equal(workspace.widened(conv1d_layout, torch.float32), conv1d_layout.float())


@pytest.mark.parametrize("fmt", [kq.Int8Format(), kq.NF4Format(64), kq.NF4Format(32, True), kq.Int4Format(32)],
                         ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantizing_into_a_buffer_equals_a_fresh_dequantization(fmt, dtype, monkeypatch):
    monkeypatch.setattr(kq, "LOOKUP_BYTES", 64)  # several blocks of rows through the index buffer
    w = torch.randn(48, 128)
    tensors = fmt.quantize(w)
    fresh = fmt.dequantize(tensors, dtype)
    out = torch.full((48, 128), float("nan"), dtype=dtype)
    assert fmt.dequantize(tensors, dtype, None, out) is out
    assert torch.equal(out, fresh)
    rows = slice(8, 40)
    part = torch.empty(32, 128, dtype=dtype)
    assert torch.equal(fmt.dequantize(tensors, dtype, rows, part), fresh[rows])


def test_a_buffer_first_made_in_inference_mode_serves_training_afterwards():
    """(an inference tensor cannot be written in place outside inference mode: a generate() or a reward model
    under torch.inference_mode() before training must not poison the buffer)"""
    workspace.release()
    w = torch.randn(8, 8).bfloat16()
    with torch.inference_mode():
        inside = workspace.widened(w, torch.float32)
        assert torch.equal(inside, w.float())
    assert torch.equal(workspace.widened(w, torch.float32), w.float())
    fmt = kq.Int4Format(32)
    tensors = fmt.quantize(torch.randn(8, 64))
    with torch.inference_mode():
        fmt.dequantize(tensors, torch.float32, None, workspace.scratch((8, 64), torch.float32, "cpu", slot="x"))
    out = workspace.scratch((8, 64), torch.float32, "cpu", slot="x")
    assert torch.equal(fmt.dequantize(tensors, torch.float32, None, out), fmt.dequantize(tensors, torch.float32))
    workspace.release()
