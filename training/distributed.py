"""Training across processes on ``torch.distributed`` (launched by ``torchrun``), and the
same code in one plain process.

What a stage needs, in a few lines (``unet`` and ``vae`` are the examples)::

    dist = distributed.current(device)           # rank, size, device; size 1 without torchrun
    dist.check_batch(tc["batch_size"], "unet.batch_size", accumulate)
    net = dist.wrap(unet)                        # DDP (or FSDP, ``shard="fsdp"``); the module itself alone
    out = net(...)                               # or forward_as(net, "encode_dist", x) for another method
    gen = dist.step_generator(seed, step, device)    # this step's draws: the same on every rank
    noise = dist.shard(torch.randn(global_shape, generator=gen, device=device), per=frames)
    loss.backward()                              # DDP averages the gradients over the ranks
    if dist.main: log, EMA, save, export       # rank 0's duties; then dist.barrier()

Batch semantics: a config's ``batch_size`` is the **global** batch of one optimizer step. With W
processes and ``accumulate`` A, each process runs A micro-batches of ``batch_size / (W * A)``
clips. The global batch is one seeded draw: the clips are draws ``k`` of one numbered stream
(``ClipStream``; clip ``k`` is made from the seed ``(seed, k)``), the per-step noise, timesteps and
caption drops come from a generator seeded by ``(seed, step)``, and rank ``r`` takes the clips at
positions ``r, r + W, ...`` of each global batch (``shard``). So any W (and any A) sees the same
clips with the same noise; only the floating-point order of the sums differs.

Resume: the data position is a function of the step (the stream's first draw and every
per-step seed are computed from it), and the model and optimizer states are saved whole by
rank 0 (``full_state``), so a run saved by N processes resumes on M.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass
class Dist:
    """This process's place among the training processes (``size`` 1: a plain run)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, keeps the EMA, saves and exports."""
        return self.rank == 0

    def check_batch(self, batch: int, name: str, accumulate: int = 1) -> int:
        """The clips this process runs per micro-batch; stops when the global batch does not split."""
        if accumulate < 1 or batch % (self.size * accumulate):
            raise SystemExit(f"{name} is the global batch ({batch} clips per optimizer step); it must split evenly "
                             f"over {self.size} process(es) x accumulate {accumulate}")
        return batch // (self.size * accumulate)

    def shard(self, x, per: int = 1):
        """This rank's share of a global batch: clips ``rank, rank + size, ...``. ``x`` is a list
        (one item a clip) or a tensor with ``per`` rows a clip (``per=frames`` for ``[(b f), ...]``)."""
        if self.size == 1:
            return x
        if isinstance(x, list):
            return x[self.rank :: self.size]
        return x.unflatten(0, (-1, per))[self.rank :: self.size].flatten(0, 1)

    def step_generator(self, seed: int, step: int, device=None) -> torch.Generator:
        """A generator for one step's draws (noise, timesteps, ...), seeded by ``(seed, step)``:
        the same on every rank and after a resume, whatever the number of processes."""
        return torch.Generator(device or self.device).manual_seed(mix_seed(seed, step))

    def wrap(self, module: torch.nn.Module, shard: str = "ddp") -> torch.nn.Module:
        """DDP (gradients averaged over the ranks in the backward pass) or FSDP (``shard="fsdp"``:
        parameters, gradients and optimizer states split over the ranks; torch's ``fully_shard``
        per block, then the whole, in place). One process: the module itself. A module without
        trainable parameters is only sharded (an EMA copy that FSDP keeps in shards)."""
        if self.size == 1 or (shard != "fsdp" and not any(p.requires_grad for p in module.parameters())):
            return module
        if shard == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in fsdp_units(module):
                fully_shard(block)
            return fully_shard(module)
        if shard != "ddp":
            raise SystemExit(f"shard: expected ddp or fsdp, found {shard!r}")
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def no_sync(self, wrapped: list, last: bool):
        """For gradient accumulation: DDP's all-reduce waits for the last micro-batch."""
        stack = contextlib.ExitStack()
        if not last:
            for m in wrapped:
                if isinstance(m, torch.nn.parallel.DistributedDataParallel):
                    stack.enter_context(m.no_sync())
                elif hasattr(m, "set_requires_gradient_sync"):  # FSDP2
                    m.set_requires_gradient_sync(False)
                    stack.callback(m.set_requires_gradient_sync, True)
        return stack

    def mean(self, value: torch.Tensor) -> float:
        """A logged number averaged over the ranks (call on every rank)."""
        value = value.detach().float()
        if self.size > 1:
            value = value.clone()
            td.all_reduce(value)
            value = value / self.size
        return float(value)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor summed over the ranks (call on every rank)."""
        if self.size > 1:
            value = value.detach().clone()
            td.all_reduce(value)
        return value

    def gather(self, items: list) -> list[list]:
        """Every rank's list, in rank order (pickled; for small things such as a pool's new latents)."""
        if self.size == 1:
            return [items]
        out = [None] * self.size
        td.all_gather_object(out, items)
        return out

    def broadcast(self, obj):
        """Rank 0's value on every rank (a decision that must be the same everywhere)."""
        if self.size == 1:
            return obj
        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.size > 1:
            td.barrier()


def fsdp_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP gathers one at a time: a VideoUNet's blocks (not ``input_blocks.0``, whose
    conv the UNet runs by hand) or a text encoder's; other modules are one unit."""
    if hasattr(module, "input_blocks"):
        return [*module.input_blocks[1:], module.middle_block, *module.output_blocks]
    return list(getattr(module, "blocks", []))


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (a stable hash, not Python's salted one)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_CURRENT = None


def setup(device: str) -> Dist:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` set): NCCL on GPUs,
    gloo on CPUs, one GPU a process (``LOCAL_RANK``). A plain launch is rank 0 of 1."""
    global _CURRENT
    dev = torch.device(device)
    if "WORLD_SIZE" not in os.environ:
        _CURRENT = Dist(0, 1, dev)
        return _CURRENT
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if not td.is_initialized():
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    _CURRENT = Dist(td.get_rank(), td.get_world_size(), dev)
    return _CURRENT


def current(device=None) -> Dist:
    """The Dist ``setup`` made; a plain one-process Dist on ``device`` when there is none (a
    stage called directly, as the tests do)."""
    if _CURRENT is None or (device is not None and _CURRENT.device != torch.device(device)):
        return Dist(0, 1, torch.device(device or "cpu"))
    return _CURRENT


def teardown():
    global _CURRENT
    if td.is_initialized():
        td.destroy_process_group()
    _CURRENT = None


def _whole(x):
    """A tensor whole on the CPU: an FSDP shard (DTensor) gathered from every rank."""
    if not torch.is_tensor(x):
        return x
    return (x.full_tensor() if hasattr(x, "full_tensor") else x).cpu()


def is_sharded(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in module.parameters())


def full_state(module: torch.nn.Module) -> dict:
    """The whole state dict of a module, wrapped or sharded or not, on the CPU. Under FSDP every
    rank must call it (it gathers); rank 0 saves it."""
    return {k: _whole(v) for k, v in unwrap(module).state_dict().items()}


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with every sharded state gathered whole: the plain form that
    one process, DDP and FSDP on any number of processes all load (``load_optimizer_state``)."""
    sd = opt.state_dict()
    return {"state": {i: {k: _whole(v) for k, v in st.items()} for i, st in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict):
    """Load a whole optimizer state; the states of sharded parameters are cut to this rank's shard."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        for p in group["params"]:
            if not hasattr(p, "device_mesh"):
                continue
            from torch.distributed.tensor import distribute_tensor

            for k, v in opt.state[p].items():
                if torch.is_tensor(v) and not hasattr(v, "device_mesh") and v.shape == p.shape:
                    opt.state[p][k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


def plain_copy(module: torch.nn.Module, state: dict) -> torch.nn.Module:
    """A sharded module's own class, unsharded, holding ``state`` (for rank 0 to export); any
    other module as it is."""
    if not is_sharded(module):
        return module
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        copy = cls(module.config)
    copy.load_state_dict(state, assign=True)
    return copy.eval().requires_grad_(False)


def clip_grad_norm_(params: list, max_norm: float) -> torch.Tensor:
    """torch's gradient clipping over plain and FSDP-sharded gradients together (the norm of
    the sharded ones is reduced over the ranks)."""
    params = [p for p in params if p.grad is not None]
    sharded = [p for p in params if hasattr(p.grad, "device_mesh")]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p for p in params if not hasattr(p.grad, "device_mesh")]
    norms = [torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()]
    if plain:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in plain]).to(norms[0].device))
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, plain):  # torch's foreach ops take no mix of the two
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def forward_as(wrapped: torch.nn.Module, method: str, *args, **kwargs):
    """Call ``method`` of the wrapped module (``encode_dist``, ``decode_raw``) through the wrapper's
    forward, so DDP sees it: DDP prepares its gradient all-reduce in ``forward`` only."""
    inner = unwrap(wrapped)
    if inner is wrapped:
        return getattr(inner, method)(*args, **kwargs)
    inner.forward = getattr(inner, method)
    try:
        return wrapped(*args, **kwargs)
    finally:
        del inner.forward


class DrawSampler(Sampler):
    """This rank's draws of one numbered stream: ``k = first, first + 1, ...`` with
    ``k % size == rank``, endlessly (the interleaving of torch's DistributedSampler, started at
    any position, which is what resuming on another world size needs)."""

    def __init__(self, first: int, rank: int, size: int):
        self.first, self.rank, self.size = first, rank, size

    def __iter__(self):
        k = self.first + (self.rank - self.first) % self.size
        while True:
            yield k
            k += self.size


def _as_is(item):
    return item


class ClipStream:
    """A numbered stream of clips read through a DataLoader (``workers`` processes decode ahead).

    ``dataset[k]`` makes draw ``k`` from its own seed, so who makes it does not change it.
    ``take(n)`` advances the stream by ``n`` global draws and returns this rank's share of them
    (draws with ``k % size == rank``), in order; one process takes them all.
    """

    def __init__(self, dataset: Dataset, first: int = 0, dist: Dist | None = None, workers: int = 0):
        self.dataset, self.next, self.dist = dataset, first, dist or Dist()
        sampler = DrawSampler(first, self.dist.rank, self.dist.size)
        loader = DataLoader(dataset, sampler=sampler, batch_size=None, collate_fn=_as_is, num_workers=workers,
                            persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
        self._items = iter(loader)

    def draws(self, n: int) -> range:
        """The global draw numbers of the next ``n`` draws (before ``take``)."""
        return range(self.next, self.next + n)

    def take(self, n: int) -> list:
        mine = sum(1 for k in self.draws(n) if k % self.dist.size == self.dist.rank)
        self.next += n
        return [next(self._items) for _ in range(mine)]

    def interleave(self, n: int, per_rank: list[list]) -> list:
        """Put the ranks' shares of ``n`` draws just taken (``Dist.gather`` of each rank's items,
        rank order) back in draw order."""
        first = self.next - n
        queues = [iter(items) for items in per_rank]
        return [next(queues[k % len(per_rank)]) for k in range(first, first + n)]
