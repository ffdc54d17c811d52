"""Training on several processes with PyTorch's own engine: torchrun, DDP, FSDP2.

``lorakit train --nproc N`` starts ``torchrun --standalone --nproc-per-node N -m lorakit train``
on this machine; on several machines the user runs torchrun directly (README "Training on
several processes"). Inside each process ``from_environment`` joins the process group
torchrun describes (gloo on CPU, nccl on CUDA).

What each process does, and why a run on N processes equals the run on one:

- Data: ``--batch-size B`` is the global micro-batch. ``epoch_indices`` is the rank's share of
  torch's DistributedSampler (seeded per epoch with set_epoch); rank r takes positions r, r+N,
  r+2N ... of the epoch's permutation, so its micro-batch k of B/N rows and the other ranks'
  together are exactly rows k*B .. (k+1)*B of that permutation, the rows a single process
  takes. The position in the data is kept in global micro-batches, so a checkpoint written by
  N processes resumes on M.
- Loss: every rank's loss is a mean over its own targets (rows, or labelled tokens for a
  causal LM). ``loss_weight`` rescales it by n_rank * N / n_global so that DDP's average of the
  gradients is the gradient of the mean over the global batch (exact for unequal token counts).
- Gradients: DDP over the trainable (adapter) parameters only; the frozen base is neither
  broadcast nor reduced. With ``--shard`` FSDP2 (``fully_shard``) splits every parameter,
  frozen base included, across the processes, each decoder block its own unit and the
  embeddings and head in the root unit (``LossOf``, whose forward is the whole training loss).
- Files: only rank 0 writes (metrics, checkpoints, the adapter, plots) and shows progress;
  logged losses, token counts and held-out metrics are sums over all ranks.
- Checkpoints have one format whatever the process count or sharding: the full adapter and
  the optimizer state of full tensors (sharded ones are gathered), written by rank 0.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import ConfigError
from lorakit.speed.allocator import return_freed_memory_to_the_system
from lorakit.train.launch import RESUME_ARGV_ENV, launch, without_nproc  # noqa: F401 (their old home)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, and whether the base is sharded."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    shard: bool = False
    device: str = "cpu"  # this process's device: cuda:LOCAL_RANK under nccl

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)


def backend(d: Dist) -> str | None:
    """The process group's backend (nccl between GPUs, gloo between CPU processes), None for one process."""
    return ("nccl" if torch.device(d.device).type == "cuda" else "gloo") if d.active else None


def uses_cuda(device: str | None) -> bool:
    """Processes train on GPUs (one each, cuda:LOCAL_RANK, nccl) when CUDA is present and --device allows it."""
    return torch.cuda.is_available() and (device is None or device.startswith("cuda"))


def check_gpus(processes: int, device: str | None, *, local_rank: int | None = None) -> None:
    """Refuse, in one line, more GPU processes than GPUs, or one device index for several processes."""
    if processes <= 1 or not uses_cuda(device):
        return
    if device not in (None, "cuda"):
        raise ConfigError(f"--device {device} with {processes} processes: each process trains on its own GPU, "
                          "cuda:LOCAL_RANK (pick the GPUs with CUDA_VISIBLE_DEVICES); give --device cuda")
    count = torch.cuda.device_count()
    if processes > count if local_rank is None else local_rank >= count:
        raise ConfigError(f"{processes} processes on this machine's {count} CUDA device(s): lorakit runs one process "
                          f"per GPU (nccl); use --nproc {count} (torchrun --nproc-per-node {count}), or --device cpu "
                          f"for {processes} CPU processes (gloo)")


def from_environment(*, shard: bool = False, device: str | None = None) -> Dist:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR ...); a plain run is Dist()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not launched_by_torchrun():
        if shard:
            raise ConfigError("--shard splits the model across processes, but this is one process; "
                              "run with --nproc N (N >= 2) or under torchrun")
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = uses_cuda(device)
    check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", world)), device, local_rank=local_rank)
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    if shard and not cuda:
        return_freed_memory_to_the_system()
    return Dist(rank=rank, world=world, local_rank=local_rank, shard=shard, device=f"cuda:{local_rank}" if cuda else "cpu")


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- data
def epoch_indices(n_rows: int, seed: int, epoch: int, d: Dist) -> list[int]:
    """This rank's rows of ``epoch`` in order (DistributedSampler, shuffled, seeded with seed + epoch).

    Rank r gets positions r, r+N, ... of the permutation; with one process it is the whole
    permutation. When n_rows is not a multiple of N the sampler pads the list with repeated rows;
    the first ``real_rows(n_rows, d)`` entries are the real ones (the trainer gives the padding
    no weight, so the epoch is exactly the one-process epoch).
    """
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(range(n_rows), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return list(sampler)


def real_rows(n_rows: int, d: Dist) -> int:
    """How many of this rank's epoch_indices are real rows (positions r, r+N, ... below n_rows)."""
    return len(range(d.rank, n_rows, d.world))


def rank_batch_size(batch_size: int, d: Dist) -> int:
    if batch_size % d.world:
        raise ConfigError(f"--batch-size {batch_size} is the global batch and must divide evenly among {d.world} processes; "
                          f"use a multiple of {d.world}")
    return batch_size // d.world


# ---------------------------------------------------------------------- reductions
def sum_across(d: Dist, values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum over all ranks (the values themselves on one process)."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def step_totals(d: Dist, loss: float, tokens: int, device: torch.device | str = "cpu") -> tuple[float, int]:
    """One optimizer step's loss (the mean of the ranks' weighted losses: the global batch's) and tokens (the sum);
    on one process, the values themselves."""
    if not d.active:
        return loss, tokens
    total_loss, total_tokens = sum_across(d, [loss, float(tokens)], device)
    return total_loss / d.world, int(total_tokens)


def loss_weight(d: Dist, n_targets: int, device: torch.device | str = "cpu") -> float:
    """n_rank * N / n_global: the factor that makes DDP's gradient average the global-batch mean."""
    if not d.active:
        return 1.0
    (total,) = sum_across(d, [float(n_targets)], device)
    return n_targets * d.world / total if total > 0 else 1.0


def broadcast_object(d: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(d: Dist, fn: Callable[[], Any], error_type: type[Exception]) -> Any:
    """``fn()`` run by rank 0 alone; its result on every rank. An ``error_type`` it raises is raised on every
    rank (the others would otherwise wait for rank 0 at the next collective)."""
    result = failure = None
    if d.is_main:
        try:
            result = fn()
        except error_type as exc:
            if not d.active:
                raise
            failure = str(exc)
    result, failure = broadcast_object(d, (result, failure))
    if failure is not None:
        raise error_type(failure)
    return result


def gather(d: Dist, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not d.active:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


# ---------------------------------------------------------------------- wrapping
class LossOf(nn.Module):
    """The model's training loss as a module, so that DDP and FSDP2 see the whole step as one forward.

    ``forward(batch)`` is ``model(**batch).loss`` (the adapted model's fast forward in training, see
    ``lorakit.speed.forward``); ``forward(batch, outputs=True)`` is the model's whole output (evaluation). With FSDP2 this root unit gathers the embeddings, final norm and
    head, which the fused loss uses outside the decoder blocks.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], outputs: bool = False):
        if outputs:
            return self.model(**batch)
        return self.model(**batch).loss


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the largest nn.ModuleList of modules with parameters): FSDP2's units."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and all(
                any(True for _ in m.parameters()) for m in module):
            best = list(module)
    return best


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """LossOf(model), under DDP (trainable parameters only) or FSDP2 (--shard), or as is on one process."""
    engine = LossOf(model)
    if not d.active:
        return engine
    if d.shard:  # the model may still be on the CPU: fully_shard moves each process's slice to its device
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(torch.device(d.device).type, (d.world,))
        for block in decoder_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(engine, mesh=mesh)
        return engine
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [f"model.{name}" for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [f"model.{name}" for name, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(engine, frozen)  # the base is identical everywhere: no broadcast
    ids = [d.local_rank] if torch.device(d.device).type == "cuda" else None
    return DDP(engine, device_ids=ids)


def gradient_sync(engine: nn.Module, sync: bool):
    """DDP's no_sync unless ``sync`` (the last micro-batch of an accumulated step); FSDP2 and one process: nothing."""
    return contextlib.nullcontext() if sync or not hasattr(engine, "no_sync") else engine.no_sync()


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank if sharded: all ranks must call)."""
    return t.full_tensor() if is_sharded(t) else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``param`` is: sharded the same way, or as is."""
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


@contextlib.contextmanager
def whole_trainable(model: nn.Module) -> Iterator[None]:
    """Inside, every sharded trainable parameter is a whole ordinary tensor (save_adapter, load_adapter
    and the norm hooks work as on one process); on exit the values are sharded back. All ranks call."""
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and is_sharded(p):
                module._parameters[name] = nn.Parameter(p.detach().full_tensor(), requires_grad=True)
                swapped.append((module, name, p))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, p in swapped:
                p.copy_(like(module._parameters[name].detach(), p))
                module._parameters[name] = p


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with whole tensors (sharded state gathered): the same on any process count."""
    sd = optimizer.state_dict()
    sd["state"] = {k: {n: full(v) if isinstance(v, torch.Tensor) else v for n, v in s.items()} for k, s in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a state of whole tensors, then shard each like its parameter."""
    optimizer.load_state_dict(sd)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        if is_sharded(p):
            state = optimizer.state.get(p, {})
            for n, v in state.items():
                if isinstance(v, torch.Tensor) and not is_sharded(v) and v.shape == p.shape:
                    state[n] = like(v, p)


def per_rank_seed(seed: int, rank: int, step: int) -> int:
    """A different random stream per rank (dropout masks) that a resume at ``step`` recreates."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63)
