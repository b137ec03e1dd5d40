"""Bounded-memory storage of captured activation rows: RAM up to a budget, then disk.

:func:`vlprune.plugins.intrinsic_dim.estimate_ids` needs ``n_samples`` rows of every profiled
module before any TwoNN estimate can start (the nearest neighbours of a point are among all the
others). For a real model these rows outgrow the memory: SmolLM2-135M's 210 linears hold
``n_samples x 64 tokens x width`` floats, 40 MB per sample in the ``"flatten"`` representation,
10 GB for 256 samples. Instead of one forward pass per group of modules that fits the budget
(what vlprune did first: 16 minutes for that profile), every module's rows are captured in ONE
pass: batches are kept in RAM while the shared :class:`MemoryBudget` allows, and the rest are
appended, in the storage dtype, to one file per module in a temporary directory that is deleted
afterwards. Each module's rows are read back when its estimate is computed, bit for bit what an
in-memory capture stores, so the estimate is unchanged.

Example:
    >>> from vlprune.plugins.id_storage import RowStore
    >>> import torch
    >>> with RowStore(budget_bytes=2**16) as store:        # 64 KB of RAM, the rest on disk
    ...     rows = store.reducer("fc", "flatten", n_samples=100)
    ...     for _ in range(4):
    ...         rows.update(torch.randn(25, 8, 64), None)     # 50 KB per batch
    ...     (store.rows("fc").shape, store.ram_bytes, store.disk_bytes)
    (torch.Size([100, 512]), 51200, 153600)
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlprune.errors import ModelStructureError, VLPruneError
from vlprune.plugins.capture import Representation, StoreRows

__all__ = [
    "AUTO_BUDGET_FRACTION",
    "FALLBACK_BUDGET_MB",
    "AUTO_FLOOR_FRACTION",
    "STREAM_ABOVE_BYTES",
    "available_memory_bytes",
    "default_budget_mb",
    "MemoryBudget",
    "SLAB_MIN_BYTES",
    "anonymous_rows",
    "SpillingRows",
    "RowStore",
    "check_first_batch",
    "step_bytes",
]

logger = logging.getLogger(__name__)

#: share of the currently available memory (``MemAvailable``) an automatic budget takes
AUTO_BUDGET_FRACTION = 0.5

#: budget when the available memory cannot be read (no /proc/meminfo and no psutil)
FALLBACK_BUDGET_MB = 2048.0

#: a module's distance step is streamed from its stored rows (:mod:`vlprune.plugins.id_streamed`)
#: only when it needs more than the budget AND more than this: below it, the in-RAM step (faster,
#: bit for bit the in-memory estimate) passes a small budget by at most these bytes
STREAM_ABOVE_BYTES = 64 * 2**20


#: a module whose ``n_samples`` rows take at least this many bytes keeps its in-RAM rows in a slab
#: of its own (:func:`anonymous_rows`); smaller ones use ordinary allocations
SLAB_MIN_BYTES = 2**20

# Linux: the mapping's untouched pages are not charged to the commit limit (a slab sized for
# n_samples rows costs only the rows that arrive)
_MAP_NORESERVE = 0x4000 if sys.platform.startswith("linux") else 0


def anonymous_rows(n_rows: int, width: int, dtype: torch.dtype) -> torch.Tensor | None:
    """An uninitialised (n_rows, width) tensor in an anonymous memory mapping of its own.

    Why not ``torch.empty``: the captured rows of a real model are many buffers of a few MB to
    100 MB that live for the whole capture. Allocated with malloc, the ones under its mmap
    threshold (which rises to 32 MB) come from the heap, between the forward pass's own
    temporaries, and the forward then faults in fresh pages again and again as the heap top
    moves: on real SmolLM2 (9.7 GB of rows) the capture pass took 26-32 s for a 15 s forward,
    and the process kept 11 GB after the rows were freed. A mapping of its own per module
    leaves the heap alone, its untouched tail costs nothing, and it is returned to the system
    when the last view of it goes.

    Args:
        n_rows: rows (the most that will be stored).
        width: row width.
        dtype: element type.

    Returns:
        The tensor, or None where the system has no anonymous mappings or refuses this one
        (the caller falls back to ordinary allocations).
    """
    nbytes = n_rows * width * dtype.itemsize
    if nbytes == 0:
        return None
    try:
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    except (AttributeError, OSError, ValueError, OverflowError):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns about non-writable buffers; the mapping is writable
        flat = torch.frombuffer(mapping, dtype=dtype)
    return flat.view(n_rows, width)


def available_memory_bytes() -> int | None:
    """Memory the system can give without swapping: ``MemAvailable`` of ``/proc/meminfo``
    (Linux), else ``psutil.virtual_memory().available`` when psutil is installed, else None.

    Returns:
        Bytes, or None when unknown.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    try:
        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - platform specific
        return None


def default_budget_mb(fraction: float = AUTO_BUDGET_FRACTION) -> float:
    """The automatic activation budget: ``fraction`` of the memory available now.

    Args:
        fraction: share of :func:`available_memory_bytes` taken (default half, leaving the rest
            to the model, the distance step and other processes).

    Returns:
        Megabytes (:data:`FALLBACK_BUDGET_MB` when the available memory is unknown).

    Example:
        >>> default_budget_mb() > 0
        True
    """
    available = available_memory_bytes()
    if available is None:
        return FALLBACK_BUDGET_MB
    return fraction * available / 2**20


#: with an automatic budget, RAM stops being taken once the available memory would fall below
#: this share of what was available at the start (other processes may grow meanwhile)
AUTO_FLOOR_FRACTION = 0.25

#: bytes taken between two reads of the available memory
_CHECK_EVERY = 64 * 2**20


class MemoryBudget:
    """Bytes of RAM shared by the row stores of one capture; chunks that do not fit go to disk.

    Args:
        limit_bytes: the budget.
        watch_available: also refuse RAM once :func:`available_memory_bytes` would fall below
            :data:`AUTO_FLOOR_FRACTION` of its value now (read every 64 MB taken), so that
            processes growing meanwhile on a shared machine do not run it out of memory.
    """

    def __init__(self, limit_bytes: int, watch_available: bool = False) -> None:
        self.limit = int(limit_bytes)
        self.used = 0
        start = available_memory_bytes() if watch_available else None
        self._floor = None if start is None else int(AUTO_FLOOR_FRACTION * start)
        self._since_check = 0

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit; returns whether they did."""
        if self.used + nbytes > self.limit:
            return False
        if self._floor is not None and self._since_check + nbytes >= _CHECK_EVERY:
            self._since_check = 0
            available = available_memory_bytes()
            if available is not None and available - nbytes < self._floor:
                logger.info(
                    "only %.0f MB of memory left available: the rest of the activation rows go to disk",
                    available / 2**20,
                )
                self.limit = self.used
                return False
        self._since_check += nbytes
        self.used += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        """Release a reservation."""
        self.used = max(0, self.used - int(nbytes))


class SpillingRows(StoreRows):
    """:class:`~vlprune.plugins.capture.StoreRows` whose batches stay in RAM while ``budget``
    allows and are appended to ``path`` (raw bytes in the storage dtype) after that.

    :meth:`result` returns exactly what a plain ``StoreRows`` would.

    Args:
        path: the module's spill file (created on the first spill).
        budget: the shared :class:`MemoryBudget`.
        expected_batches: batches the capture will run, if known: the slab is sized for that
            many batches like the first (at most ``n_samples`` rows) instead of ``n_samples``
            rows (a later, larger batch that does not fit gets memory of its own).
        **kwargs: as :class:`~vlprune.plugins.capture.StoreRows`.
    """

    def __init__(
        self, path: Callable[[], Path], budget: MemoryBudget, expected_batches: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._batches = expected_batches
        self._path_of = path
        self._path: Path | None = None
        self._budget = budget
        # each stored batch: a tensor in RAM, or (byte offset, rows, width) in the spill file
        self._entries: list[torch.Tensor | tuple[int, int, int]] = []
        self._slab: torch.Tensor | None = None  # n_samples rows of the first batch's width (anonymous_rows)
        self._file_bytes = 0
        self._ram_bytes = 0
        self.written_bytes = 0  #: bytes ever written to disk (kept by :meth:`release`)

    @property
    def _itemsize(self) -> int:
        """Bytes per stored value (the dtype is known from the first batch on)."""
        return (self.dtype or torch.float32).itemsize

    @property
    def ram_bytes(self) -> int:
        """Bytes of rows held in RAM."""
        return self._ram_bytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of rows written to the spill file."""
        return self._file_bytes

    def _keep(self, rows: torch.Tensor, shares_output: bool) -> None:
        nbytes = rows.shape[0] * rows.shape[1] * self._itemsize
        if self._file_bytes == 0 and self._budget.take(nbytes):
            self._in_ram(rows, shares_output)
            self._ram_bytes += nbytes
            return
        if self._path is None:
            self._path = self._path_of()
        assert self.dtype is not None  # resolved by update()
        chunk = rows.to(self.dtype).cpu().contiguous()
        raw = chunk.view(torch.uint8).numpy()
        try:
            with open(self._path, "ab") as f:
                raw.tofile(f)
        except OSError as exc:
            raise VLPruneError(
                f"cannot spill the activations of module {self.name or '?'} to {self._path.parent}: {exc}; "
                "free disk space or pass spill_dir= on a larger disk, raise max_memory_mb, pass sketch_dim= "
                "or profile fewer modules"
            ) from exc
        self._entries.append((self._file_bytes, int(chunk.shape[0]), int(chunk.shape[1])))
        self._file_bytes += raw.size
        self.written_bytes += raw.size

    def _in_ram(self, rows: torch.Tensor, shares_output: bool) -> None:
        """Copy ``rows`` to their RAM home: the next rows of the module's slab while they fit
        it (:func:`anonymous_rows`), else memory of their own. While the slab is in use it is the
        only entry (its filled rows), so reading them back joins nothing."""
        n, width = int(rows.shape[0]), int(rows.shape[1])
        if self._slab is None and not self._entries and self.n_samples is not None:
            # room for n_samples rows, or for as many batches like this one as there are
            capacity = self.n_samples if self._batches is None else min(self.n_samples, n * self._batches)
            if capacity * width * self._itemsize >= SLAB_MIN_BYTES:
                self._slab = anonymous_rows(capacity, width, self.dtype or torch.float32)
        if self._slab is not None:
            filled = int(self._entries[0].shape[0]) if self._entries else 0
            if width == self._slab.shape[1] and filled + n <= self._slab.shape[0]:
                self._slab[filled : filled + n].copy_(rows)
                self._entries[:] = [self._slab[: filled + n]]
                return
            self._slab = None  # rows it cannot hold: these and the rest get memory of their own
        self._entries.append(self._owned(rows, shares_output))

    def _stored_chunks(self) -> list[torch.Tensor]:
        return [self._read(e) if isinstance(e, tuple) else e for e in self._entries]

    def _read(self, entry: tuple[int, int, int], columns: slice | None = None) -> torch.Tensor:
        offset, rows, width = entry
        assert self._path is not None
        itemsize = self._itemsize
        mm = np.memmap(self._path, dtype=np.uint8, mode="c", offset=offset, shape=(rows, width * itemsize))
        if columns is not None:
            mm = mm[:, columns.start * itemsize : columns.stop * itemsize]
        return torch.from_numpy(np.ascontiguousarray(mm)).view(self.dtype or torch.float32)

    def column_block(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of the stored rows, float32, zero beyond a batch's width (as
        :meth:`result` pads), read without loading the other columns.

        Args:
            start: first column.
            stop: one past the last column (at most :attr:`width`).

        Returns:
            (rows, stop - start) float32 tensor.
        """
        out = torch.zeros(self._rows, stop - start, dtype=torch.float32)
        r0 = 0
        for e in self._entries:
            rows, width = (e[1], e[2]) if isinstance(e, tuple) else (int(e.shape[0]), int(e.shape[1]))
            hi = min(stop, width)
            if hi > start:
                block = self._read(e, slice(start, hi)) if isinstance(e, tuple) else e[:, start:hi]
                out[r0 : r0 + rows, : hi - start] = block.float()
            r0 += rows
        return out

    def release(self) -> None:
        """Drop the stored rows (RAM and file)."""
        self._budget.give_back(self._ram_bytes)
        self._entries.clear()
        self._slab = None
        self._chunks.clear()
        self._ram_bytes = 0
        if self._path is not None and self._path.exists():
            self._path.unlink()
        self._file_bytes = 0


class RowStore:
    """The rows of several modules within one RAM budget, the rest in a temporary directory
    (created on the first spill, deleted by :meth:`close`, also on errors when used as a
    context manager).

    Args:
        budget_bytes: RAM shared by all modules' rows.
        spill_dir: parent of the temporary directory (default: the system temp directory,
            ``$TMPDIR``).
        watch_available: see :class:`MemoryBudget` (what an automatic budget does).
        expected_batches: batches the capture will run, if known (sizes the modules' slabs,
            :class:`SpillingRows`).
    """

    def __init__(
        self,
        budget_bytes: int,
        spill_dir: str | os.PathLike[str] | None = None,
        watch_available: bool = False,
        expected_batches: int | None = None,
    ) -> None:
        self.budget = MemoryBudget(budget_bytes, watch_available)
        self.expected_batches = expected_batches
        self._parent = Path(spill_dir) if spill_dir is not None else None
        self._dir: Path | None = None
        self._stores: dict[str, SpillingRows] = {}

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def directory(self) -> Path | None:
        """The temporary directory, None until something spilled."""
        return self._dir

    def _new_path(self, index: int) -> Callable[[], Path]:
        def path() -> Path:
            if self._dir is None:
                if self._parent is not None:
                    self._parent.mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix="vlprune-rows-", dir=self._parent))
                logger.info("activation rows past the %.0f MB budget go to %s", self.budget.limit / 2**20, self._dir)
            return self._dir / f"{index:05d}.rows"

        return path

    def reducer(
        self,
        name: str,
        representation: Representation = "flatten",
        n_samples: int | None = None,
        dtype: torch.dtype | None = torch.float32,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> SpillingRows:
        """The :class:`SpillingRows` of module ``name`` (created on the first call)."""
        if name not in self._stores:
            self._stores[name] = SpillingRows(
                self._new_path(len(self._stores)),
                self.budget,
                self.expected_batches,
                representation=representation,
                n_samples=n_samples,
                dtype=dtype,
                name=name,
                transform=transform,
            )
        return self._stores[name]

    def __getitem__(self, name: str) -> SpillingRows:
        return self._stores[name]

    def rows(self, name: str) -> torch.Tensor:
        """All stored rows of ``name`` as one (rows, width) float32 tensor in RAM."""
        return self._stores[name].result()

    def release(self, name: str) -> None:
        """Free ``name``'s rows (RAM and disk)."""
        self._stores[name].release()

    @property
    def ram_bytes(self) -> int:
        """Bytes held in RAM by all modules."""
        return sum(s.ram_bytes for s in self._stores.values())

    @property
    def disk_bytes(self) -> int:
        """Bytes on disk now, all modules together."""
        return sum(s.disk_bytes for s in self._stores.values())

    @property
    def written_bytes(self) -> int:
        """Bytes ever spilled to disk, all modules together (released ones included)."""
        return sum(s.written_bytes for s in self._stores.values())

    def check_disk(self, total_bytes: int) -> None:
        """Raise before a long pass when the disk cannot take what will not fit the budget.

        Args:
            total_bytes: expected bytes of every module's rows.

        Raises:
            VLPruneError: the spill directory's disk has less free space than the spill needs.
        """
        spill = total_bytes - self.budget.limit
        if spill <= 0:
            return
        where = self._dir or self._parent or Path(tempfile.gettempdir())
        free = shutil.disk_usage(where).free
        if spill > free:
            raise VLPruneError(
                f"the activation rows need {total_bytes / 2**30:.1f} GB, {spill / 2**30:.1f} GB more than the "
                f"{self.budget.limit / 2**20:.0f} MB memory budget, but {where} has only {free / 2**30:.1f} GB free; "
                "pass spill_dir= on a larger disk, raise max_memory_mb, pass sketch_dim= or profile fewer modules"
            )

    def close(self) -> None:
        """Free everything and delete the temporary directory (idempotent)."""
        for store in self._stores.values():
            store.release()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def check_first_batch(
    reducers: Mapping[str, SpillingRows],
    n_items: int,
    n_samples: int,
    budget_mb: float,
    store: RowStore,
) -> int:
    """Checks after the first batch of :func:`~vlprune.plugins.intrinsic_dim.estimate_ids`' pass.

    Every module produced rows; one float32 row of the widest module fits ``max_memory_mb``; the
    RAM for the captured rows becomes the budget less what one module's distance step needs
    (:func:`step_bytes` of the widest, capped at the budget); the disk can take the rest.

    Args:
        reducers: module name -> its rows after the first batch.
        n_items: number of batches.
        n_samples: rows asked per module.
        budget_mb: ``max_memory_mb`` (resolved).
        store: the row store (its budget limit is lowered here).

    Returns:
        Bytes reserved for one module's distance step.

    Raises:
        ModelStructureError: a module produced no tensor.
        VLPruneError: the budget is below one row, or the disk is too small.
    """
    missing = [n for n, r in reducers.items() if r.rows == 0]
    if missing:
        raise ModelStructureError(
            f"{len(missing)} chosen module(s) produced no tensor output in a forward pass "
            f"(e.g. {missing[:3]}); choose modules that run in model(**batch)"
        )
    widest = max(reducers, key=lambda n: reducers[n].width)
    row_mb = reducers[widest].width * 4 / 2**20
    if budget_mb < row_mb:
        raise VLPruneError(
            f"max_memory_mb={budget_mb:g} is too small for a single sample: module {widest} has "
            f"{reducers[widest].width} values per row ({row_mb:.3g} MB in float32); the minimum is {row_mb:.3g} MB "
            "(raise max_memory_mb, leave it None to use half the available memory, or pass sketch_dim=)"
        )
    expected = 0
    for r in reducers.values():
        rows = min(n_samples, r.rows * n_items)
        expected += rows * r.width * (r.dtype or torch.float32).itemsize
    reserve = min(int(budget_mb * 2**20), max(step_bytes(min(n_samples, r.rows * n_items), r.width) for r in reducers.values()))
    store.budget.limit = max(0, int(budget_mb * 2**20) - reserve)
    store.check_disk(expected)
    return reserve


def step_bytes(n_rows: int, width: int) -> int:
    """Bytes of RAM the exact in-memory distance step of one module needs (an estimate): its rows
    in float32, the centred float32 copy :func:`~vlprune.plugins.intrinsic_dim.nearest_neighbour_distances`
    makes, its float32 distance blocks (up to ~32 MB) and float64 candidate rows (up to ~8 MB).

    Args:
        n_rows: rows of the module.
        width: values per row.

    Returns:
        Bytes.
    """
    return 2 * n_rows * width * 4 + 2 * 4 * min(n_rows * n_rows, 8 * 2**20) + min(8 * 2**20, 32 * n_rows * width)
