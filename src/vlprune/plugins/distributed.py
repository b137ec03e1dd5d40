"""Several processes: the one place where vlprune talks to ``torch.distributed``.

The convention users rely on: inside an initialised process group of more than one process, every
data-driven call (AMP importance and width search, layer similarity / block influence / angular
distance, the intrinsic-dimension profile) treats the batches it is given on each rank as that
rank's shard of the data, and returns the same result on every rank as one process would on the
union of the shards (within float tolerance). Shards may be uneven. Nothing extra is passed; the
opt-out is the :func:`local_only` context manager (each rank then computes on its own batches
alone, with no collective). Each criterion stays single-process code and calls the few helpers
here:

* :func:`is_active`, :func:`rank`, :func:`world_size`, :func:`is_main`;
* :class:`guard` — wraps a call's validation (and any purely local work), then, before any real
  collective, all-gathers a small report from every rank: a fingerprint of the call's config, of the
  model's parameter names / shapes / dtypes, the rank's batch count, and the error it hit if any.
  Different configs or model shapes on the ranks, an error on one rank (e.g. a rank with no data:
  its "empty batches" error) or unequal batch counts where a call needs them equal, become a
  :class:`~vlprune.errors.VLPruneError` on **every** rank naming what differs, instead of a hang;
* :func:`all_reduce_sum` — sums of tensors / dicts of tensors / numbers (in float64);
* :func:`gather_rows` — the rows of every rank's tensor concatenated in rank order (uneven row
  counts: sizes are all-gathered first, then a padded all-gather, then trimmed); ``grad=True``
  keeps the autograd graph (``torch.distributed.nn.functional.all_gather``: the gradient of a
  rank's rows is the sum over ranks of the gradients they produced);
* :func:`broadcast_module` / :func:`broadcast_object` — rank ``src``'s weights / a picklable object
  on every rank.

A rank with no data is an error (a ``VLPruneError`` on every rank, naming the rank): a call's
statistics would still be defined from the other ranks, but an empty shard is almost always a
sharding mistake, and treating it like the single-process "empty batches" error keeps one rule.

Errors raised after the guard (a forward that fails on one rank only) cannot be seen by the other
ranks; they wait in the next collective until the process group's ``timeout``.

Tensors travel on the backend's device (CUDA for NCCL, CPU for gloo) and come back where they were.

Example (``torchrun --nproc_per_node 2 script.py``):
    >>> import torch.distributed as dist
    >>> from vlprune.plugins import distributed
    >>> dist.init_process_group("gloo")                                          # doctest: +SKIP
    >>> distributed.gather_rows(torch.full((distributed.rank() + 1, 2), 1.0)).shape  # doctest: +SKIP
    torch.Size([3, 2])
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from vlprune import errors
from vlprune.errors import VLPruneError

__all__ = [
    "is_active",
    "rank",
    "world_size",
    "is_main",
    "local_only",
    "guard",
    "all_reduce_sum",
    "gather_rows",
    "broadcast_module",
    "broadcast_object",
    "barrier",
    "model_fingerprint",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("vlprune_distributed_local", default=False)
_MAX_DIMS = 8


# -- who am I --------------------------------------------------------------------------------------


def is_active() -> bool:
    """True inside an initialised process group of more than one process, outside :func:`local_only`."""
    return (
        not _LOCAL.get()
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


def rank() -> int:
    """This process's rank (0 when not :func:`is_active`)."""
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    """Number of processes (1 when not :func:`is_active`)."""
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files."""
    return rank() == 0


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Opt out: inside this block every vlprune call computes on this rank's batches alone, with no
    collective, as in a single process.

    Example:
        >>> with local_only():
        ...     is_active()
        False
    """
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def _device() -> torch.device:
    """The device collectives run on: the current CUDA device for NCCL, else the CPU."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op when not :func:`is_active`)."""
    if is_active():
        dist.barrier()


# -- fingerprints and the guard --------------------------------------------------------------------


def _stable(value: Any) -> Any:
    """A picklable, rank-independent description of a config value (no memory addresses)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype | torch.device | os.PathLike):
        return str(value)
    if isinstance(value, torch.Tensor):
        data = value.detach().float().cpu() if value.is_floating_point() else value.detach().cpu().double()
        return ("tensor", tuple(value.shape), str(value.dtype), round(float(data.double().sum()), 9) if data.numel() else 0.0)
    if isinstance(value, Mapping):
        return {str(k): _stable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_stable(v) for v in items]
    if isinstance(value, nn.Module):
        return ("module", type(value).__name__)
    if callable(value):
        module = getattr(value, "__module__", None) or ""
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return ("callable", f"{module}:{name}")
    return ("object", type(value).__qualname__)


def model_fingerprint(model: nn.Module | None) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of every parameter and buffer of ``model`` (empty for None)."""
    if model is None:
        return []
    out = [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    out += [(n, tuple(b.shape), str(b.dtype)) for n, b in model.named_buffers()]
    return out


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _error_class(name: str) -> type[VLPruneError]:
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, VLPruneError) else VLPruneError


class guard:  # noqa: N801 - used as a context manager, like contextlib's helpers
    """Check, before any real collective, that every rank calls ``what`` alike; errors on every rank.

    Wrap a call's validation (and any purely local work: it may run forward passes, but no
    collective) in ``with guard(...) as g:``. On exit every rank all-gathers a small report and
    compares, in this order: model parameter shapes, config, errors raised inside the block,
    ``g.count(...)`` values. Any difference raises on every rank: the rank whose block raised
    re-raises its own error, the others a ``VLPruneError`` (the same ``vlprune.errors`` class when
    there is one) naming the rank and the error. Outside a process group it does nothing.

    Args:
        what: the call's name, for the messages (``"AMP neuron_importance"``).
        model: the model every rank must hold with equal parameter names, shapes and dtypes.
        config: the call's arguments that must be equal on every rank (callables compare by
            qualified name, tensors by shape / dtype / sum).

    Example:
        >>> with guard("layer_similarity", model=None, config={"tokens": "all"}) as g:
        ...     g.count("batches", 3)
    """

    def __init__(self, what: str, *, model: nn.Module | None = None, config: Mapping[str, Any] | None = None) -> None:
        self.what = what
        self.model = model
        self.config = dict(config or {})
        self.counts: dict[str, tuple[int, bool]] = {}

    def count(self, name: str, value: int, *, equal: bool = False) -> None:
        """Record this rank's ``value`` of ``name`` (e.g. its number of batches). Zero on any rank is
        an error ("rank r has no data"); with ``equal=True`` the values must be equal on every rank
        (calls whose collectives run once per batch)."""
        self.counts[name] = (int(value), bool(equal))

    def __enter__(self) -> guard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: Any) -> bool:
        if not is_active() or (exc_type is not None and not issubclass(exc_type, Exception)):
            return False
        fingerprint = model_fingerprint(self.model)
        report = {
            "model": _digest(fingerprint),
            "config": {k: _stable(v) for k, v in self.config.items()},
            "error": None if exc is None else (type(exc).__name__, str(exc)),
            "counts": {k: v for k, (v, _) in self.counts.items()},
            "equal": sorted(k for k, (_, eq) in self.counts.items() if eq),
        }
        reports: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(reports, report)
        if len({r["model"] for r in reports}) > 1:  # every rank sees this: one more gather to name it
            prints: list[Any] = [None] * len(reports)
            dist.all_gather_object(prints, fingerprint)
            raise VLPruneError(self._model_difference(prints)) from exc
        problem = self._config_difference(reports)
        if problem is not None:
            raise VLPruneError(problem) from exc
        failed = [(r, rep["error"]) for r, rep in enumerate(reports) if rep["error"] is not None]
        if failed:
            if exc is not None:
                return False  # this rank re-raises its own error
            r, (name, message) = failed[0]
            ranks = ", ".join(str(f[0]) for f in failed)
            raise _error_class(name)(
                f"{self.what} failed on rank(s) {ranks} before any collective, so it stops on every rank; "
                f"rank {r}: {name}: {message}"
            )
        problem = self._count_difference(reports)
        if problem is not None:
            raise errors.DataError(problem)
        logger.debug("%s: the %d ranks agree (model, arguments, counts %s)", self.what, len(reports),
                     [rep["counts"] for rep in reports])
        return False

    def _model_difference(self, prints: Sequence[list[tuple[str, tuple[int, ...], str]]]) -> str:
        base = {n: (s, d) for n, s, d in prints[0]}
        for r, other in enumerate(prints[1:], start=1):
            here = {n: (s, d) for n, s, d in other}
            for name in sorted(set(base) | set(here)):
                if base.get(name) != here.get(name):
                    a, b = base.get(name, "absent"), here.get(name, "absent")
                    return (
                        f"{self.what}: the ranks hold different models ({name}: {a} on rank 0, {b} on rank {r}); "
                        "every rank must load the same model (prune on every rank identically, or "
                        "broadcast_module(model, src=0) after pruning on one)"
                    )
        return f"{self.what}: the ranks hold models with different parameter orders; load the same model on every rank"

    def _config_difference(self, reports: Sequence[Mapping[str, Any]]) -> str | None:
        base = reports[0]["config"]
        for r, rep in enumerate(reports[1:], start=1):
            for key in sorted(set(base) | set(rep["config"])):
                if base.get(key) != rep["config"].get(key):
                    return (
                        f"{self.what}: the ranks were called with different {key!r} ({base.get(key)!r} on rank 0, "
                        f"{rep['config'].get(key)!r} on rank {r}); pass the same arguments on every rank "
                        "(only the batches differ between ranks)"
                    )
        return None

    def _count_difference(self, reports: Sequence[Mapping[str, Any]]) -> str | None:
        for name in sorted(reports[0]["counts"]):
            values = [rep["counts"].get(name, 0) for rep in reports]
            empty = [r for r, v in enumerate(values) if v == 0]
            if empty:
                return (
                    f"{self.what}: rank(s) {empty} have no {name} (per rank: {values}); every rank needs its "
                    "shard of the data: shard so that each rank gets at least one batch, or call outside the "
                    "process group / inside vlprune.plugins.distributed.local_only() on the ranks that have data"
                )
            if name in reports[0]["equal"] and len(set(values)) > 1:
                return (
                    f"{self.what} needs the same number of {name} on every rank (it combines the ranks once "
                    f"per batch), got {values}; give every rank as many batches (their sizes may differ)"
                )
        return None


# -- collectives -----------------------------------------------------------------------------------


def all_reduce_sum(value: T) -> T:
    """Sum over ranks of a tensor, a mapping of tensors, or a number (unchanged outside a group).

    Summed in float64 in one buffer and returned with each tensor's dtype and device (a number as
    ``float``/``int`` like the input). Mappings must have the same keys and shapes on every rank
    (checked: a ``VLPruneError`` on every rank otherwise).

    Example:
        >>> all_reduce_sum({"sums": torch.ones(3)})["sums"]   # one process: unchanged
        tensor([1., 1., 1.])
    """
    if not is_active():
        return value
    if isinstance(value, Mapping):
        keys = list(value)
        tensors = [torch.as_tensor(value[k]) for k in keys]
    elif isinstance(value, torch.Tensor):
        keys, tensors = [], [value]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        keys, tensors = [], [torch.tensor(float(value), dtype=torch.float64)]
    else:
        raise VLPruneError(f"all_reduce_sum takes a tensor, a mapping of tensors or a number, got {type(value).__name__}")
    device = _device()
    layout = _digest([(str(k), tuple(t.shape)) for k, t in zip(keys or [None] * len(tensors), tensors)])
    header = torch.tensor([int(layout, 16) & ((1 << 62) - 1)], dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(dist.get_world_size())]
    dist.all_gather(headers, header)
    if len({int(h) for h in headers}) > 1:
        raise VLPruneError(
            "all_reduce_sum: the ranks hold different keys or shapes; every rank must reduce the same statistics"
        )
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors]) if tensors else None
    if flat is None or flat.numel() == 0:
        return value
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[offset : offset + n].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        offset += n
    if isinstance(value, Mapping):
        return type(value)(zip(keys, out)) if isinstance(value, dict) else dict(zip(keys, out))  # type: ignore[return-value]
    if isinstance(value, torch.Tensor):
        return out[0]  # type: ignore[return-value]
    total = float(out[0])
    return (int(round(total)) if isinstance(value, int) else total)  # type: ignore[return-value]


def gather_rows(x: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
    """Every rank's rows of ``x`` concatenated in rank order, on every rank (``x`` itself outside a group).

    Ranks may hold different row counts (``x.shape[0]``, zero included); the other dimensions and
    the dtype must match (checked before the data moves: a ``VLPruneError`` on every rank otherwise).
    Row counts are all-gathered first, each rank's rows padded to the largest count, all-gathered,
    and trimmed.

    Args:
        x: ``(n_rank, ...)`` tensor.
        grad: keep the autograd graph: the result is differentiable, and the gradient reaching this
            rank's rows is the sum of the gradients every rank computed for them (every rank must then
            run its backward, as under DDP).

    Returns:
        ``(sum of n_rank, ...)`` tensor on ``x``'s device.

    Example:
        >>> gather_rows(torch.arange(6.0).reshape(3, 2)).shape   # one process: unchanged
        torch.Size([3, 2])
    """
    if not is_active():
        return x
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.dim() > _MAX_DIMS:
        raise VLPruneError(f"gather_rows takes a tensor of 1 to {_MAX_DIMS} dimensions, got {getattr(x, 'shape', type(x))}")
    device = _device()
    world = dist.get_world_size()
    code = _digest(str(x.dtype))
    header = torch.full((_MAX_DIMS + 2,), -1, dtype=torch.int64, device=device)
    header[0] = x.dim()
    header[1] = int(code, 16) & ((1 << 62) - 1)
    header[2 : 2 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header)
    rows = [int(h[2]) for h in headers]
    tails = {tuple(h[:2].tolist()) + tuple(h[3:].tolist()) for h in headers}
    if len(tails) > 1:
        shapes = [tuple(int(v) for v in h[2 : 2 + int(h[0])].tolist()) for h in headers]
        raise VLPruneError(
            f"gather_rows: the ranks' tensors differ beyond their row count (shapes per rank {shapes}, "
            f"dtype here {x.dtype}); every rank must give rows of the same width and dtype"
        )
    most = max(rows)
    wire = x.to(device)
    if x.dtype == torch.bfloat16 and device.type == "cpu":
        wire = wire.float()  # gloo does not reduce or gather bfloat16 everywhere
    if most == 0:
        return x[:0]
    if wire.shape[0] < most:
        pad = torch.zeros((most - wire.shape[0],) + tuple(wire.shape[1:]), dtype=wire.dtype, device=device)
        wire = torch.cat([wire, pad])
    if grad:
        from torch.distributed.nn.functional import all_gather as all_gather_grad

        parts = list(all_gather_grad(wire.contiguous()))
    else:
        wire = wire.detach().contiguous()
        parts = [torch.empty_like(wire) for _ in range(world)]
        dist.all_gather(parts, wire)
    out = torch.cat([p[:n] for p, n in zip(parts, rows)])
    return out.to(device=x.device, dtype=x.dtype)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (picklable) on every rank (``obj`` itself outside a group)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(model: nn.Module, src: int = 0) -> nn.Module:
    """Copy rank ``src``'s parameters and buffers into ``model`` on every rank, bit for bit, in place.

    Use it after pruning on rank ``src`` only, or to make sure every rank holds identical weights.
    The ranks must hold models of the same parameter names and shapes (checked first: a
    ``VLPruneError`` on every rank naming the first difference; then nothing is changed).

    Args:
        model: the model (same structure on every rank).
        src: the rank whose weights win.

    Returns:
        ``model``.

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> broadcast_module(layer) is layer   # one process: unchanged
        True
    """
    if not is_active():
        return model
    with guard("broadcast_module", model=model, config={"src": src}):
        if not 0 <= src < dist.get_world_size():
            raise VLPruneError(f"src must be a rank in 0..{dist.get_world_size() - 1}, got {src}")
    device = _device()
    tensors = [p for _, p in model.named_parameters()] + [b for _, b in model.named_buffers()]
    for t in tensors:
        wire = t.detach().contiguous().to(device).reshape(-1).view(torch.uint8)
        dist.broadcast(wire, src=src)
        if dist.get_rank() != src:
            t.copy_(wire.view(t.dtype).reshape(t.shape).to(t.device))
    return model
