"""The Triton attention kernels, burst_attention and split_attention, against the written-out masked attention
and an independent float64 reference: on the CPU in Triton's interpreter, compiled where CUDA is.

Block sizes are shrunk so that small shapes still span several row blocks and key blocks (and, for the split
kernel, several splits, some empty). Sequences have different |S_l| and padded rows; cache slots past T and the
list's entries past |S_l| point at NaNs, so that a kernel reading what it must not read fails.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
DEVICE = torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")
if DEVICE.type == "cpu":
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.max, InterpretedFunction):
        raise RuntimeError("triton was imported before TRITON_INTERPRET was set (see tests/conftest.py)")

from lazyprefill.attention import decode_mask, listed_positions, row_ranges  # noqa: E402
from lazyprefill.decoding import masked_attention  # noqa: E402
from lazyprefill.kernels import burst_attention as ba  # noqa: E402
from lazyprefill.kernels import split_attention as sa  # noqa: E402

# The split kernel's empty parts take log-sum-exp log(0) = -inf on purpose (weight 0 in the merge): numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

KV_HEADS, DH, T, P = 2, 16, 48, 56  # P > T: cache slots past the attended keys hold NaNs, never to be read
SCALING = DH**-0.5
WINDOW = 7
# |error| <= atol + rtol |expected|. fp32: rounding only (seen: 6e-7). 16 bits: the outputs and the softmax weights
# fed to P V are rounded (relative 2^-9 each in bf16, 2^-12 in fp16), in masked_attention too (seen: 2e-2 and 2e-3
# at outputs up to ~3, at most 2/3 of these bounds).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def make_case(group: int, R: int, dtype: torch.dtype, seed: int, shuffle: bool = False):
    """Two sequences: 75% and 45% of T in S_l, R and R - 6 real rows (members, in position order unless
    `shuffle`), the rest padded at the scratch slot P - 1. q: [B, H, R, dh] a transposed view, as decoding's;
    idx: listed_positions, its entries past |S_l| pointing at slot T (NaN)."""
    g = torch.Generator().manual_seed(seed)
    H = KV_HEADS * group
    q = torch.randn(2, R, H, DH, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(2, KV_HEADS, P, DH, generator=g).to(dtype)
    v = torch.randn(2, KV_HEADS, P, DH, generator=g).to(dtype)
    k[:, :, T:], v[:, :, T:] = float("nan"), float("nan")
    in_s = torch.stack([torch.rand(T, generator=g) < share for share in (0.75, 0.45)])  # [B, T]
    idx = listed_positions(in_s)
    idx[torch.arange(T) >= in_s.sum(1, keepdim=True)] = T
    rows = torch.full((2, R), P - 1, dtype=torch.long)
    valid = torch.zeros(2, R, dtype=torch.bool)
    for b, n in enumerate((R, R - 6)):
        members = in_s[b].nonzero()[:, 0]
        assert len(members) >= n, "a sequence with too few members for its rows: change the seed"
        rows[b, :n] = members[torch.randperm(len(members), generator=g)[:n]].sort().values
        valid[b, :n] = True
        if shuffle:
            order = torch.randperm(R, generator=g)
            rows[b], valid[b] = rows[b, order], valid[b, order]
    return tuple(x.to(DEVICE) for x in (q, k, v, in_s, idx, rows, valid))


def reference(q, k, v, in_s, rows, window):
    """float64 softmax over the keys each row may see: members at or before its position, within the window."""
    group = q.shape[1] // k.shape[1]
    keys = torch.arange(in_s.shape[1], device=DEVICE)
    sees = in_s[:, None, :] & (keys <= rows[:, :, None])  # [B, R, T]
    if window is not None:
        sees &= keys > rows[:, :, None] - window
    k64, v64 = (x[:, :, : in_s.shape[1]].double().repeat_interleave(group, 1) for x in (k, v))
    logits = (q.double() @ k64.transpose(2, 3) * SCALING).masked_fill(~sees[:, None], float("-inf"))
    return logits.softmax(-1).nan_to_num() @ v64  # [B, H, R, dh]


def check(out, q, k, v, in_s, rows, valid, window) -> tuple[float, float]:
    """Asserts out (real rows) close to the float64 reference and to masked_attention; returns both max |errors|."""
    assert out.shape == q.shape and out.dtype == q.dtype
    written = masked_attention(q, k[:, :, :T], v[:, :, :T], decode_mask(in_s, rows, T, window), SCALING)
    real = valid[:, None, :, None].expand_as(out)
    out, ref, written = out[real].double(), reference(q, k, v, in_s, rows, window)[real], written[real].double()
    torch.testing.assert_close(out, ref, **TOL[q.dtype])
    torch.testing.assert_close(out, written, **TOL[q.dtype])
    return (out - ref).abs().max().item(), (out - written).abs().max().item()


def run_burst(group, dtype, window, shuffle=False, seed=0, **blocks):
    R = 22
    q, k, v, in_s, idx, rows, valid = make_case(group, R, dtype, seed, shuffle)
    lo, hi = row_ranges(in_s, rows, valid, window)
    out = ba.burst_attention(q, k, v, idx, lo, hi, SCALING, **blocks)
    padded = ~valid[:, None, :, None].expand_as(out)
    assert padded.any() and (out[padded] == 0).all()  # finite: 0
    return check(out, q, k, v, in_s, rows, valid, window)


SMALL_BLOCKS = dict(block_m=16, block_n=16)  # rows: 16 / Gp per block, so 2 to 6 row blocks; keys: up to 3 blocks
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def bf16_dot(monkeypatch):
    """Triton's interpreter keeps bf16 as its uint16 bits and tl.dot multiplies those bits (triton-lang/triton#11584,
    bf16 "not supported yet"): widen bf16 operands to fp32 first (exact), which the GPU's bf16 dot with fp32
    accumulation matches. Compiled kernels are left alone."""
    if DEVICE.type != "cpu":
        return
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype != triton.language.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), triton.language.float32)

    def dot(self, a, b, *rest):
        return create_dot(self, widen(a), widen(b), *rest)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dot)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("group", [1, 2, 4, 3])
def test_burst(group, window, dtype, bf16_dot):
    run_burst(group, dtype, window, **SMALL_BLOCKS)


@pytest.mark.parametrize("window", [None, WINDOW])
def test_burst_rows_out_of_order(window):
    """Correctness must not hang on rows coming in position order: only the block's key range loosens."""
    run_burst(3, torch.float32, window, shuffle=True, seed=1, **SMALL_BLOCKS)


def test_burst_default_blocks():
    assert ba.warm_up(torch.float32, DH, 3, DEVICE)
    run_burst(3, torch.float32, WINDOW, seed=2)


@pytest.mark.parametrize("merge_kernel", [True, False])
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split(dtype, group, merge_kernel, bf16_dot):
    R = 8  # a decoding step: q and a few revived rows
    q, k, v, in_s, idx, rows, valid = make_case(group, R, dtype, seed=3)
    n_s = in_s.sum(1, dtype=torch.int32)
    # 16 keys a block over T = 48 and 4 programs a "SM": 3 parts, the last one empty for the sparser sequence
    out = sa.split_attention(q, k, v, idx, n_s, rows.int(), SCALING, block_n=16, merge_kernel=merge_kernel)
    check(out, q, k, v, in_s, rows, valid, None)


@pytest.mark.parametrize("layout", ["rows", "heads"])
def test_split_reads_q_by_its_strides_and_writes_the_rows_layout(layout):
    """q as decoding passes it (a [B, H, R, dh] view of [B, R, H, dh]) or contiguous [B, H, R, dh]: the same output,
    laid out so that the step's [B * R, H, dh] rows are a view of it, not a copy."""
    q, k, v, in_s, idx, rows, valid = make_case(3, 8, torch.float32, seed=5)
    if layout == "heads":
        q = q.contiguous()
    out = sa.split_attention(q, k, v, idx, in_s.sum(1, dtype=torch.int32), rows.int(), SCALING, block_n=16)
    check(out, q, k, v, in_s, rows, valid, None)
    assert out.transpose(1, 2).is_contiguous()


def test_row_ranges_and_listed_positions():
    in_s = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    listed = listed_positions(in_s)
    assert listed.dtype == torch.int32
    assert listed[0].tolist() == [0, 2, 3, 5, 0, 0] and listed[1, :2].tolist() == [1, 2]
    rows = torch.tensor([[2, 5], [2, 9]])  # sequence 1's second row is padding, past T
    valid = torch.tensor([[True, True], [True, False]])
    lo, hi = row_ranges(in_s, rows, valid, None)
    assert lo.dtype == hi.dtype == torch.int32
    assert hi.tolist() == [[2, 4], [2, 0]] and lo.tolist() == [[0, 0], [0, 0]]
    lo, hi = row_ranges(in_s, rows, valid, 3)  # (p - 3, p]: position 5 sees 3 and 5 = listed[2:4]
    assert lo.tolist() == [[0, 2], [0, 0]] and hi.tolist() == [[2, 4], [2, 0]]
    lo, hi = row_ranges(in_s, rows, valid, 1)  # itself only
    assert lo.tolist() == [[1, 3], [1, 0]] and hi.tolist() == [[2, 4], [2, 0]]


def test_kernels_read_v_by_its_own_strides():
    """V laid out [B, P, Hkv, dh] under a [B, Hkv, P, dh] view, unlike K: the same values must come out."""
    q, k, v, in_s, idx, rows, valid = make_case(2, 8, torch.float32, seed=4)
    v_other = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert v_other.stride() != k.stride()
    lo, hi = row_ranges(in_s, rows, valid, None)
    burst = ba.burst_attention(q, k, v_other, idx, lo, hi, SCALING, **SMALL_BLOCKS)
    split = sa.split_attention(q, k, v_other, idx, in_s.sum(1, dtype=torch.int32), rows.int(), SCALING, block_n=16)
    for out in (burst, split):
        check(out, q, k, v, in_s, rows, valid, None)
