"""Decoding attention over a pruned candidate set S: which formulation is fastest on this GPU?

One query row attends to the keys at positions S (a sorted subset of 0..t) of a layer's K/V cache.
For each variant prints device time (CUDA events) and host time per call (launch cost, no sync), and
the relative error against the gathered fp32 reference.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

FLASH = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


def variants(q, K, V, cand, in_s, scale, gqa):
    def sdpa(k, v, mask=None):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=gqa)[0]

    def manual():
        hkv, g = K.shape[0], q.shape[0] // K.shape[0]
        s = torch.matmul(q.view(hkv, g, -1), K.transpose(1, 2)).float() * scale  # [Hkv, G, t]
        p = s.masked_fill(~in_s, float("-inf")).softmax(-1).to(V.dtype)
        return torch.matmul(p, V).view(q.shape)

    def flash(fn):
        def run():
            with sdpa_kernel(FLASH, set_priority=True):
                return fn()
        return run

    return {
        "gather[] + sdpa default": lambda: sdpa(K[:, cand], V[:, cand]),
        "index_select + sdpa default": lambda: sdpa(K.index_select(1, cand), V.index_select(1, cand)),
        "index_select + sdpa flash": flash(lambda: sdpa(K.index_select(1, cand), V.index_select(1, cand))),
        "full + bool mask sdpa": lambda: sdpa(K, V, in_s[None]),
        "manual matmul softmax": manual,
        "full sdpa flash (dense)": flash(lambda: sdpa(K, V)),
        "full sdpa default (dense)": lambda: sdpa(K, V),
    }


def main() -> None:
    torch.manual_seed(0)
    H, dh = 32, 128
    for t in (8192, 32768):
        for hkv in (32, 8):
            q = torch.randn(H, 1, dh, device="cuda", dtype=torch.bfloat16)
            K = torch.randn(hkv, t, dh, device="cuda", dtype=torch.bfloat16)
            V = torch.randn(hkv, t, dh, device="cuda", dtype=torch.bfloat16)
            cand = torch.randperm(t - 1, device="cuda")[: int(0.7 * t)].sort().values
            cand = torch.cat([cand, torch.tensor([t - 1], device="cuda")])
            in_s = torch.zeros(t, dtype=torch.bool, device="cuda")
            in_s[cand] = True
            scale = dh**-0.5
            ref = F.scaled_dot_product_attention(q[None].float(), K[:, cand][None].float(), V[:, cand][None].float(),
                                                 scale=scale, enable_gqa=hkv != H)[0]
            print(f"\nt={t} Hkv={hkv} |S|={cand.numel()}")
            for name, fn in variants(q, K, V, cand, in_s, scale, hkv != H).items():
                out = fn()
                err = ((out.float() - ref).norm() / ref.norm()).item() if "dense" not in name else float("nan")
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(50):
                    fn()
                host = (time.perf_counter() - t0) / 50 * 1e3
                end.record()
                end.synchronize()
                dev = start.elapsed_time(end) / 50
                print(f"  {name:30s} device {dev * 1e3:8.1f} us  host {host * 1e3:8.1f} us  rel err {err:.1e}")


if __name__ == "__main__":
    main()
