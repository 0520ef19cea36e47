"""Block-sparse prefill attention: on long prompts each row attends to a few blocks of keys, not all of them.

Token pruning saves nothing in the layers before the first pruning layer, and on a long prompt attention is
most of a layer's work (two thirds of llama3-8b's prefill FLOPs at 128K), so pruning alone stops at about 1.7x
there (issue 24). This option lets the full-attention layers from `from_layer` on attend sparsely, pruned
layers included (over their compacted rows), so that those get both savings. Its pattern, per sequence and
query head, in blocks of `block` keys, is the one long-context studies find in trained models (StreamingLLM's
sinks and local window, MInference's vertical lines): every query block sees
  - the first `sink` key blocks,
  - the `local` key blocks that end at its own (the diagonal block causal inside),
  - the `top` fraction of key blocks that the attention of the last `rows` rows ranks highest (the blocks the
    question reads, the same for every row of the head),
and the query blocks holding the last `rows` rows see every earlier block, so the rows that end the prompt,
q among them, attend exactly. Each (token, layer) is still computed once; only which keys a row's attention
reads changes. It runs through FlexAttention with a BlockMask built from block indices (no per-element mask
evaluation: at 128K that would cost more than the attention it saves), compiled on CUDA.

Legend: B sequences, H query heads, Hkv key/value heads, W padded rows of a sequence, nb blocks of W, dh head size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch._dynamo.exc import BackendCompilerFailed
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .packing import upload

logger = logging.getLogger(__name__)

# Bytes of float32 attention probabilities the block ranking holds at once (its chunks of K/V heads)
SCORE_BYTES = 256 * 2**20
# Lengths that are multiples of this fill every tile of FlexAttention's fused kernel: Inductor keeps only tile sizes
# (BLOCK_M, BLOCK_N) that divide the BlockMask's block, and itself sets IS_DIVISIBLE for lengths it can prove are
# multiples of 128
TILE_ROWS = 128


@dataclass(frozen=True)
class Sparse:
    """Which key blocks a prefill row attends to at the full-attention layers from `from_layer` on (module doc).

    top: fraction of a sequence's key blocks kept by the last rows' attention (per head); sink, local: key blocks
    every row sees at the start and ending at its own; rows: the last rows that rank the blocks and attend
    densely; block: keys (and query rows) per block, a multiple of 128 for the fused kernel on CUDA;
    min_tokens: a sequence shorter than this attends densely (below it the mask costs more than it saves).
    """

    top: float = 0.05
    sink: int = 1
    local: int = 8
    rows: int = 64
    block: int = 128
    from_layer: int = 2
    min_tokens: int = 8192

    def __post_init__(self) -> None:
        if not (isinstance(self.top, (int, float)) and 0.0 < self.top <= 1.0):
            raise ValueError(f"sparse top={self.top!r} must be in (0, 1]: the fraction of key blocks each head keeps")
        for name in ("sink", "from_layer", "min_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"sparse {name}={getattr(self, name)!r} must be an int >= 0")
        for name in ("local", "rows", "block"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"sparse {name}={getattr(self, name)!r} must be an int >= 1")
        if self.block & (self.block - 1):
            raise ValueError(f"sparse block={self.block} must be a power of two (128 on CUDA)")

    def spec(self) -> str:
        """'sparse(top=0.1, local=16)': the fields that differ from the defaults, as `parse_sparse` reads them."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return f"sparse({', '.join(changed)})" if changed else "sparse"

    def applies(self, layer: int, window: int | None) -> bool:
        """Whether `layer` attends sparsely: a full-attention layer (a sliding window is sparse already) from
        `from_layer` on."""
        return window is None and layer >= self.from_layer

    def pairs(self, n: int) -> float:
        """(query, key) pairs a sequence of n rows attends to under the pattern, at most: as if every top block lay
        outside the sinks and the window (flops.py's ideal speedup; the measured pattern can only attend fewer)."""
        if n < self.min_tokens:
            return n * (n + 1) / 2
        blocks = -(-n // self.block)
        top = max(1, math.ceil(round(self.top * blocks, 6)))
        dense_from = max(n - self.rows, 0) // self.block
        seen = [i + 1 if i >= dense_from else min(i + 1, self.sink + self.local + top) for i in range(blocks)]
        return self.block * self.block * (sum(seen) - blocks / 2)

    def block_mask(self, q: torch.Tensor, k: torch.Tensor, counts: list[int], scaling: float,
                   allowed: list[bool] | None = None) -> BlockMask | None:
        """q: [B, H, W, dh], k: [B, Hkv, W, dh], right-padded; counts: each sequence's rows (host ints); allowed:
        the sequences that may attend sparsely (None: all) -> the BlockMask of the pattern, or None where no
        sequence is allowed with at least `min_tokens` rows (plain causal attention is then exact and faster).
        The mask covers nb * block rows and keys, W padded to whole blocks: pass it to `sparse_attention`, which
        pads q/k/v to match (FlexAttention refuses a mask made for other lengths)."""
        allowed = [True] * len(counts) if allowed is None else allowed
        sparse = [n >= self.min_tokens and a for n, a in zip(counts, allowed)]
        if not any(sparse):
            return None
        seen = self.blocks(q, k, counts, scaling, sparse)  # [B, H, nb, nb]
        B, H, nb, _ = seen.shape
        qb = torch.arange(nb, device=q.device)
        full = seen & (qb[None, :] < qb[:, None])  # the diagonal block is the only one that needs the causal mask
        # each query block's own block first (the kernels read only the first kv_num_blocks of a row); contiguous, as
        # the fused kernel indexes every sequence and head from the head stride alone
        diagonal = torch.argsort(~torch.eye(nb, dtype=torch.bool, device=q.device), dim=-1, stable=True)
        return BlockMask.from_kv_blocks(
            torch.ones(B, H, nb, dtype=torch.int32, device=q.device),
            diagonal.to(torch.int32).expand(B, H, nb, nb).contiguous(),
            full.sum(-1, dtype=torch.int32), torch.argsort(~full, dim=-1, stable=True).to(torch.int32),
            BLOCK_SIZE=self.block, mask_mod=_pattern_mod(seen, self.block),
            seq_lengths=(nb * self.block, nb * self.block), compute_q_blocks=False,  # rows padded to whole blocks
        )

    def blocks(self, q: torch.Tensor, k: torch.Tensor, counts: list[int], scaling: float, sparse: list[bool]
               ) -> torch.Tensor:
        """The pattern as [B, H, nb (query blocks), nb (key blocks)] bool, causal by block; a sequence whose `sparse`
        is False sees every earlier block (`block_mask`'s args)."""
        W = q.shape[2]
        nb = -(-W // self.block)
        dev = q.device
        # ceil(top * blocks) per sequence, rounded as Schedule.kept_count rounds, so no sequence sees its batch;
        # uploaded from pinned memory: a plain copy from the host would wait for the layers queued before it
        top = [max(1, math.ceil(round(self.top * -(-c // self.block), 6))) for c in counts]
        n, top, on = upload(np.asarray([counts, top, sparse], dtype=np.int64), dev)  # [B] each
        ranked = self._block_scores(q, k, n, scaling, nb)  # [B, H, nb]
        real = torch.arange(nb, device=dev) < (-(-n // self.block))[:, None]  # [B, nb] blocks holding real rows
        ranked = ranked.masked_fill(~real[:, None], -1.0)
        order = ranked.argsort(dim=-1, descending=True, stable=True)  # [B, H, nb]
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nb, device=dev).expand_as(order))
        vertical = rank < top[:, None, None]  # [B, H, nb] each head's top blocks
        qb = torch.arange(nb, device=dev)[:, None]  # [nb, 1] query block
        kb = torch.arange(nb, device=dev)[None, :]  # [1, nb] key block
        pattern = (kb < self.sink) | (kb > qb - self.local)  # [nb, nb] sinks and the local window
        dense_from = torch.where(on.bool(), (n - self.rows).clamp(min=0) // self.block, 0)  # [B]
        dense_rows = qb[None] >= dense_from[:, None, None]  # [B, nb, 1] the question's blocks, short sequences
        seen = ((pattern[None] | dense_rows)[:, None] | vertical[:, :, None, :]) & (kb <= qb)
        return seen & real[:, None, :, None] | (kb == qb)  # a padding block of rows sees only itself

    def _block_scores(self, q: torch.Tensor, k: torch.Tensor, n: torch.Tensor, scaling: float, nb: int
                      ) -> torch.Tensor:
        """The attention the last `rows` rows of each sequence (n: [B] its rows) pay each key block, summed:
        [B, H, nb] float32.

        K/V head groups in chunks, so that the [rows, W] float32 probabilities stay within SCORE_BYTES at 128K."""
        B, H, W, dh = q.shape
        kv_heads = k.shape[1]
        G = H // kv_heads
        dev = q.device
        row = (n[:, None] - self.rows + torch.arange(self.rows, device=dev)).clamp(min=0)  # [B, r] last rows
        present = row >= (n[:, None] - self.rows).clamp(min=0)  # [B, r] False: repeated row of a short sequence
        causal = torch.arange(W, device=dev)[None, None, :] <= row[:, :, None]  # [B, r, W]
        q_last = q.gather(2, row[:, None, :, None].expand(B, H, self.rows, dh))  # [B, H, r, dh]
        out = torch.zeros(B, H, nb * self.block, dtype=torch.float32, device=dev)
        chunk = max(1, SCORE_BYTES // (B * G * self.rows * W * 4))  # K/V heads a chunk
        for g in range(0, kv_heads, chunk):
            c = min(chunk, kv_heads - g)
            heads = slice(g * G, (g + c) * G)
            qg = q_last[:, heads].reshape(B, c, G * self.rows, dh)
            logits = torch.matmul(qg, k[:, g:g + c].transpose(-1, -2)).float() * scaling  # [B, c, G*r, W]
            logits = logits.view(B, c * G, self.rows, W).masked_fill(~causal[:, None], float("-inf"))
            out[:, heads, :W] = (logits.softmax(dim=-1) * present[:, None, :, None]).sum(dim=2)
        return out.view(B, H, nb, self.block).sum(dim=-1)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scaling: float,
                     compiled: bool | None = None) -> torch.Tensor:
    """q: [B, H, W, dh], k/v: [B, Hkv, W, dh] -> [B, H, W, dh], attending where `mask` says (Sparse.block_mask).

    The rows are laid out over the mask's whole blocks (zeros after the last row, which causality keeps every real
    row from seeing), so that the compiled kernel can be told that its lengths divide its tiles (IS_DIVISIBLE), as
    a per-shape compile infers at some lengths and a dynamic one at none: it then reads and writes whole tiles
    with no bounds checks. compiled: FlexAttention's fused kernel (default: on CUDA; elsewhere the reference path).
    """
    W, width = q.shape[2], mask.seq_lengths[0]
    if width != W:
        q, k, v = (F.pad(x, (0, 0, 0, width - W)) for x in (q, k, v))
    options = {"IS_DIVISIBLE": True} if width % TILE_ROWS == 0 else None
    attend = _compiled_flex() if (q.is_cuda if compiled is None else compiled) else flex_attention
    out = attend(q, k, v, block_mask=mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1], kernel_options=options)
    return out[:, :, :W]


@cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """FlexAttention's fused kernel (uncompiled it materializes every score), compiled with dynamic shapes: every
    prompt brings new row counts (a pruned prefill three per length), and compiled per shape each cost 2.7-7 s on
    an H100, where the dynamic version compiled once in 4.2 s and then met new lengths in 3-5 ms with the same
    output (benchmarks/results/profiles/sdpa-new-shapes-h100-2026-12-07b.md). Its kernel ran up to 39% slower than a
    per-shape one at 16K-65K, for want of knowing that its lengths fill the tiles; told so by `sparse_attention`, it
    ran as fast (sdpa-new-shapes-h100-2026-12-07c.md). A batch of several prompts gives it a symbolic batch too,
    the kind of size on which torch 2.11's Triton code generation once failed for the decoding step's selection
    (benchmarks/NOTES.md, "Ninth GPU session"), and FlexAttention's batch-dependent block masks had bugs of their
    own under dynamic shapes: where the dynamic version fails to compile, the process compiles per shape from then
    on, with one warning. The limit of recompiles is raised so that the versions a run of prompts makes never send
    it to the unfused path, whose [H, W, W] scores do not fit at 32K."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    dynamic, per_shape = torch.compile(flex_attention, dynamic=True), torch.compile(flex_attention, dynamic=False)
    failed = False

    def attend(*args: torch.Tensor, **kwargs) -> torch.Tensor:
        nonlocal failed
        if not failed:
            try:
                return dynamic(*args, **kwargs)
            except BackendCompilerFailed as err:
                cause = getattr(err, "inner_exception", err)
                logger.warning("FlexAttention failed to compile with dynamic shapes; it compiles per shape from now "
                               "on: %s: %s", type(cause).__name__, (str(cause).splitlines() or [""])[0])
                failed = True
        return per_shape(*args, **kwargs)

    return attend


def _pattern_mod(seen: torch.Tensor, block: int):
    """The mask_mod of a pattern [B, H, nb, nb]: causal within the blocks it sees. The fused kernel applies it only
    to the diagonal blocks (the others are listed full or skipped); uncompiled FlexAttention applies it to every
    element and reads no block lists, so it must hold the whole pattern."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & seen[b, h, q_idx // block, kv_idx // block]

    return mask_mod


_ARG = re.compile(r"\s*([a-z_]+)\s*=\s*([0-9.eE+-]+)\s*")


def parse_sparse(text: str) -> Sparse:
    """'sparse' or 'sparse(top=0.1, local=16)' -> Sparse, with a message naming the fields when it is not one."""
    m = re.fullmatch(r"\s*sparse\s*(?:\((.*)\))?\s*", text)
    fields = {f.name: f for f in dataclasses.fields(Sparse)}
    usage = "write sparse or sparse(field=value, ...), fields: " + ", ".join(
        f"{n}={f.default}" for n, f in fields.items())
    if m is None:
        raise ValueError(f"cannot read {text!r} as a sparse attention option: {usage}")
    kwargs: dict[str, float | int] = {}
    for item in filter(str.strip, (m.group(1) or "").split(",")):
        arg = _ARG.fullmatch(item)
        if arg is None or arg.group(1) not in fields:
            raise ValueError(f"sparse option {item.strip()!r} in {text!r}: {usage}")
        name, value = arg.groups()
        try:
            kwargs[name] = float(value) if isinstance(fields[name].default, float) else int(value)
        except ValueError:
            raise ValueError(f"sparse {name}={value!r} must be a number (an int except for top)") from None
    return Sparse(**kwargs)
