"""Tensor parallelism through torch.distributed: each rank holds its share of the attention heads and of the MLP,
and every rank runs the same engine steps on the same tokens. Launch with torchrun, or `lazyprefill generate --tp N`
and `lazyprefill serve --tp N`, which start torchrun themselves (a server's ranks follow rank 0: mirror.py).

The split is transformers' own plan (`config.base_model_tp_plan`, DTensor): q/k/v and the MLP's gate/up split by
heads and intermediate columns, o_proj and down_proj by rows, each followed by one all-reduce; embeddings and norms
replicated. A model gets it in one of two ways, and the engine treats both alike:
- `load(path, tp)`: transformers' `from_pretrained(..., distributed_config=DistributedConfig(tp_size=tp))`, which
  reads only each rank's shard of the checkpoint (what a 70B model needs; its LM head is split by vocabulary and
  its logits gathered);
- `shard(model)`: a model already in memory with the same weights on every rank (random weights drawn with one
  seed, as the benchmarks' shapes are), split in place with torch's `parallelize_module` (its LM head replicated).
Why transformers' plan rather than a split of our own: checked first on the CPU with gloo (a tiny Llama saved with
save_pretrained, TP=2), the engine calls its sharded projections directly as it calls plain ones: q_proj returns
this rank's heads ([n, H/tp * dh]) and o_proj and down_proj the all-reduced sum (tests/test_parallel.py: the tokens
of one process, logits within 1e-5). Its price is host time per call (a DTensor projection dispatches more than a
plain matmul), not measured on a GPU yet.

What the engine adds (adapters.py calls it), so that every rank selects the same tokens (SPEC.md):
- scores need every head: each rank reduces its own heads and one all-reduce per pruning layer gives every rank the
  same scores (`TensorParallel.reduce_heads`: a sum for a mean over heads, a max for a max);
- the bookkeeping of which tokens stopped where is compared across ranks after every prefill and decoding step
  (`TensorParallel.check_same`), and a difference raises RanksDiverged on every rank.
A rank that fails closes its connections: the others' next collective fails at once, and torchrun stops the job and
names the failed rank. A rank that hangs alive fails the others' collectives after TIMEOUT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

# How long a collective waits for the other ranks before it fails: longer than any one engine step between two
# collectives (a 128K-token prefill layer), shorter than torch's default of 30 minutes for a rank that hangs alive.
TIMEOUT = timedelta(minutes=10)


class RanksDiverged(RuntimeError):
    """The ranks of a tensor-parallel group no longer agree on which tokens were selected."""


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the group that splits a model's heads (`size` ranks, this one `rank`)."""

    group: dist.ProcessGroup
    size: int
    rank: int

    @classmethod
    def of(cls, q_weight: torch.Tensor) -> TensorParallel | None:
        """The group a model is split over, read from its first q_proj weight: None for a plain tensor (one process)."""
        if not isinstance(q_weight, DTensor):
            return None
        mesh = q_weight.device_mesh
        if mesh.ndim != 1 or tuple(q_weight.placements) != (Shard(0),):
            raise ValueError(
                f"q_proj is split as {q_weight.placements} over a {mesh.ndim}-D mesh: lazyprefill runs tensor "
                "parallelism as transformers' plan splits it (q_proj by heads over one 1-D mesh); load the model "
                "with lazyprefill.parallel.load or split it with lazyprefill.parallel.shard"
            )
        return cls(mesh.get_group(), mesh.size(), mesh.get_local_rank())

    def local(self, count: int, what: str) -> int:
        """This rank's share of `count` heads (or columns) named `what`."""
        return local_count(count, self.size, what)

    def reduce_heads(self, probs: torch.Tensor, heads: str, total_heads: int) -> torch.Tensor:
        """probs: [B, H_local, w, W] this rank's heads -> [B, w, W] the mean or max over every rank's heads, the same
        on every rank: one all-reduce."""
        if heads == "mean":
            out = probs.sum(dim=1)
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
            return out / total_heads
        out = probs.amax(dim=1)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out

    def check_same(self, what: str, *tensors: torch.Tensor) -> None:
        """Raise RanksDiverged unless each of these integer or bool tensors is equal on every rank: one all-reduce of
        their checksums (the max of [sums, -sums] gives the largest and the smallest) and one wait for it."""
        sums = torch.stack([checksum(t) for t in tensors])  # [n] int64
        extremes = torch.cat([sums, -sums])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.group)
        high, low = extremes[: len(tensors)], -extremes[len(tensors) :]
        if not torch.equal(high, low):
            raise RanksDiverged(
                f"the {self.size} tensor-parallel ranks disagree on {what} (checksums from {low.tolist()} to "
                f"{high.tolist()}; this rank, {self.rank}: {sums.tolist()}): every rank must select the same tokens. "
                "Give every rank the same prompts, schedule and sampling seed"
            )


def checksum(t: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of an integer or bool tensor: int64 [], on its device (equal tensors, equal sums)."""
    flat = t.reshape(-1).long()
    return (flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum()


def local_count(count: int, size: int, what: str) -> int:
    """count // size, or a ValueError that names the sizes that would split `what` evenly."""
    if count % size:
        fits = [n for n in range(1, min(count, 64) + 1) if count % n == 0]
        raise ValueError(f"{what} = {count} cannot be split over {size} tensor-parallel ranks: use a size that "
                         f"divides it ({', '.join(map(str, fits))})")
    return count // size


# ------------------------------------------------------------------------------------ the process group
def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(timeout: timedelta = TIMEOUT) -> int:
    """Join the job this process was launched in (gloo on the CPU, NCCL on CUDA), once -> this rank.

    On CUDA each rank takes the GPU of its local rank."""
    if not launched():
        raise RuntimeError("tensor parallelism needs one process per rank: start this under torchrun "
                           "(torchrun --nproc-per-node N ...)")
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return dist.get_rank()


def is_main() -> bool:
    """True in rank 0 of a job, and in a process that is not part of one: the one that prints and writes."""
    return not dist.is_initialized() or dist.get_rank() == 0


def relaunch(tp: int, argv: list[str]) -> NoReturn:
    """Run `lazyprefill ARGV` again under torchrun with `tp` processes on this machine; exit with its status.

    Each rank gets an equal share of the CPU cores (OMP_NUM_THREADS), unless that is already set. SIGINT and SIGTERM
    go on to torchrun, which stops the ranks: stopping this process stops the job (a server, say)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tp)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
               "-m", "lazyprefill", *argv]
    job = subprocess.Popen(command, env=env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: job.send_signal(signum))
    raise SystemExit(job.wait())


# ------------------------------------------------------------------------------------------- the model
def load(where: str, tp: int, **kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(where, **kwargs)` split over `tp` ranks: each reads only its shard."""
    from transformers import AutoConfig, AutoModelForCausalLM, DistributedConfig

    config = AutoConfig.from_pretrained(where, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    check_split(config, tp)
    init()
    return AutoModelForCausalLM.from_pretrained(where, distributed_config=DistributedConfig(tp_size=tp), **kwargs)


def shard(model: nn.Module, timeout: timedelta = TIMEOUT) -> nn.Module:
    """Split `model` in place over every rank of this torchrun job, by its transformers plan; returns it.

    Every rank must hold the same weights (the same checkpoint, or random weights drawn with the same seed): each
    keeps its slice of them. The LM head stays whole on every rank (its logits are then already everywhere)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    init(timeout)
    size = dist.get_world_size()
    check_split(model.config, size)
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    # replicated norms (Qwen3, Gemma 3) only matter for training's gradients: they stay plain tensors here
    plan = {f"model.{name}": styles[style]() for name, style in model.config.base_model_tp_plan.items()
            if style in styles}
    mesh = init_device_mesh(model.device.type, (size,))
    return parallelize_module(model, mesh, plan)


def check_split(config, size: int) -> None:
    """Raise ValueError unless `size` ranks split the model's heads and MLP columns evenly."""
    if not getattr(config, "base_model_tp_plan", None):
        raise ValueError(f"{config.model_type} models have no tensor-parallel plan in transformers")
    for what in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        local_count(getattr(config, what), size, what)
