"""Activation capture: forward hooks on chosen modules feeding streaming reducers.

Every data-driven criterion reads activations through this module. Hooks are registered on the
modules chosen by exact name, glob pattern (``"vision_model.*.fc1"``) or type; every module output
(a tensor, a tuple whose first element is a tensor, or a ``ModelOutput``) is turned into a tensor
and handed to that module's reducer together with the batch's padding mask. Reducers keep only what
they need (a running mean, the first ``n`` representation rows), never all activations.

The padding mask of a batch (``attention_mask`` of shape (B, T)) applies to an output of shape
(B, T, ...) only; outputs whose sequence length differs (e.g. vision tokens) are unmasked.

Reducers see every output channels-last, (B, *positions, channels), as a transformer's (B, T, D):
the outputs of convolutions (``nn.Conv1d/2d/3d`` and their transposed forms, (B, C, *spatial)) are
handed over as (B, *spatial, C), unmasked, so that a position (a pixel) is a token and a channel a
feature, e.g. ``"mean"`` rows are the per-channel means over H*W positions.

Hooks are always removed and the model's train/eval mode restored, even when a forward fails.

Example:
    >>> from vlprune.plugins.capture import capture, StoreRows
    >>> rows = capture(model, batches, ["*.fc1"], lambda name: StoreRows("mean", n_samples=256))
    >>> rows["text_model.encoder.layers.0.mlp.fc1"].shape   # doctest: +SKIP
    torch.Size([256, 64])
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from vlprune.errors import DataError, ModelStructureError, VLPruneError

__all__ = [
    "Representation",
    "Reducer",
    "StoreRows",
    "model_device",
    "ForwardCut",
    "ChannelMean",
    "resolve_modules",
    "first_tensor",
    "represent",
    "call_model",
    "batch_mask",
    "iterate_batches",
    "ActivationCapture",
    "capture",
    "preserved_mode",
]

logger = logging.getLogger(__name__)

Representation = Literal["flatten", "cls", "mean", "tokens"]
ModuleSelector = str | type | Sequence[str | type] | None


class Reducer(Protocol):
    """What a capture hook feeds: ``update`` per forward call, ``result`` at the end."""

    def update(self, output: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Consume one module output (B, ..., channels), channels-last, and the padding mask (B, T) or None."""

    def result(self) -> Any:
        """The reduced value."""


def first_tensor(output: Any) -> torch.Tensor | None:
    """The main tensor of a module output: the tensor itself, the first tensor of a tuple/list,
    or ``last_hidden_state`` / the first tensor of a ``ModelOutput`` / dict. None if there is none."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("last_hidden_state"), torch.Tensor):
            return output["last_hidden_state"]
        for value in output.values():
            found = first_tensor(value)
            if found is not None:
                return found
        return None
    if isinstance(output, (tuple, list)):
        for value in output:
            found = first_tensor(value)
            if found is not None:
                return found
    return None


def _matching_mask(output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or output.dim() < 3:
        return None
    if tuple(mask.shape) != tuple(output.shape[:2]):
        return None
    return mask.to(device=output.device, dtype=torch.bool)


def represent(
    output: torch.Tensor, representation: Representation, mask: torch.Tensor | None = None, *, native: bool = False
) -> torch.Tensor:
    """Turn a module output into rows of points, in float32.

    Args:
        output: (B, D) or (B, T, D) activations, channels last; (B, P1, P2, ..., D) (a channels-last
            image: (B, H, W, C)) has P1 * P2 * ... token positions. A convolution's (B, C, H, W)
            output must be moved channels-last first, as :class:`ActivationCapture` does.
        representation: ``"flatten"`` one row per sample, the whole (T x D) output with padded
            positions zeroed (the ID paper's choice); ``"cls"`` the first token; ``"mean"`` the mean
            over unpadded tokens; ``"tokens"`` one row per unpadded token.
        mask: (B, T) padding mask (1 = real token), applied only if its shape matches.
        native: ``"flatten"`` and ``"cls"`` rows of a floating-point output keep its dtype (a
            view where possible) for a caller that converts them while storing them: a bf16
            model's float32 rows are then written once, not twice.

    Returns:
        (rows, features) float32 tensor (with ``native``, possibly in the output's dtype).
    """
    x = output.detach()
    keep = native and x.is_floating_point()
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() == 2:
        return x if keep else x.float()
    if x.dim() > 3:
        x = x.flatten(1, -2)  # every position between the batch and the channels is a token
    m = _matching_mask(x, mask)
    if representation == "flatten":
        if m is not None:
            x = x * m[..., None].to(x.dtype)  # exact: zeros and ones
        return (x if keep else x.float()).flatten(1)
    if representation == "cls":
        return x[:, 0] if keep else x[:, 0].float()
    if representation == "mean":
        x = x.float()
        if m is None:
            return x.mean(dim=1)
        w = m[..., None].float()
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    if representation == "tokens":
        x = x.float()
        return x[m] if m is not None else x.reshape(-1, x.shape[-1])
    raise DataError(f"unknown representation {representation!r}; choose flatten, cls, mean or tokens")


def _all_finite(rows: torch.Tensor) -> bool:
    """No NaN / Inf in ``rows``, in one fast pass: a half-precision tensor's min and max (NaN
    propagates to both; an Inf is one of them; a sum could overflow and its float32-accumulating
    form is 20x slower), else the sum (a float32 sum is ~50x faster than a float64 one), with a
    value-by-value check only when the sum is not finite."""
    if rows.numel() == 0:
        return True
    if rows.dtype in (torch.float16, torch.bfloat16):
        lo, hi = torch.aminmax(rows)
        return math.isfinite(float(lo)) and math.isfinite(float(hi))
    return math.isfinite(float(rows.sum())) or bool(torch.isfinite(rows).all())


class StoreRows:
    """Keep the first ``n_samples`` representation rows of a module's outputs.

    ``"flatten"`` rows of batches with different sequence lengths are zero-padded to the longest
    length seen when :meth:`result` is called.

    Subclasses choose where rows live by overriding :meth:`_keep` and :meth:`_stored_chunks`
    (:class:`vlprune.plugins.id_storage.SpillingRows` moves them to disk past a memory budget).

    Args:
        representation: see :func:`represent`.
        n_samples: number of rows kept (None: all).
        dtype: storage dtype (float32 by default; float16 halves memory for wide layers).
            None: lossless, a float16 / bfloat16 output's rows in its own dtype (half the
            memory of float32, the same values), any other output's in float32; decided on the
            first batch.
        name: module name, used in error messages.
        transform: applied to each batch's float32 rows (after the NaN/Inf check, before
            storage), e.g. a random-projection sketch (:class:`vlprune.plugins.id_sketch.SparseSignSketch`).
    """

    def __init__(
        self,
        representation: Representation = "flatten",
        n_samples: int | None = None,
        dtype: torch.dtype | None = torch.float32,
        name: str = "",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.representation = representation
        self.n_samples = n_samples
        self.dtype: torch.dtype | None = dtype
        self.name = name
        self.transform = transform
        self._chunks: list[torch.Tensor] = []
        self._rows = 0
        self._width = 0

    @property
    def full(self) -> bool:
        """True once ``n_samples`` rows are stored."""
        return self.n_samples is not None and self._rows >= self.n_samples

    @property
    def rows(self) -> int:
        """Number of rows stored so far."""
        return self._rows

    def update(self, output: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.full:
            return
        # rows in the output's dtype when the store converts them anyway (no float32 temporary)
        rows = represent(output, self.representation, mask, native=self.transform is None)
        if not _all_finite(rows):
            raise DataError(
                f"module {self.name or '?'} produced NaN or Inf activations; check the model "
                "weights and inputs (for fp16 models, overflow is a common cause)"
            )
        if self.n_samples is not None:
            rows = rows[: self.n_samples - self._rows]
        if self.transform is not None:
            rows = self.transform(rows.float())
        if self.dtype is None:  # lossless: a half-precision output's own dtype, else float32
            self.dtype = rows.dtype if rows.dtype in (torch.float16, torch.bfloat16) else torch.float32
        shares_output = rows.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
        self._keep(rows, shares_output)
        self._rows += rows.shape[0]
        self._width = max(self._width, rows.shape[1])

    @property
    def width(self) -> int:
        """Widest row stored so far (0 before the first batch)."""
        return self._width

    def _owned(self, rows: torch.Tensor, shares_output: bool) -> torch.Tensor:
        """``rows`` in ``dtype`` on the CPU, in memory of their own (one conversion from the
        output's dtype: the same value as through float32, which holds every fp16 / bf16 value)."""
        assert self.dtype is not None  # resolved by update() before any row is kept
        stored = rows.to(self.dtype).cpu()
        if shares_output and stored.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr():
            # a view of the module's output: copy it, or an in-place op after the module (ReLU(inplace=True))
            # would change the stored rows, and the view would keep the whole output alive
            stored = stored.clone()
        return stored

    def _keep(self, rows: torch.Tensor, shares_output: bool) -> None:
        """Store one batch's rows (float32 or the output's floating dtype, or the transform's
        output; on the model's device).

        Args:
            rows: the rows to keep.
            shares_output: ``rows`` is a view of the module's output (it must be copied).
        """
        self._chunks.append(self._owned(rows, shares_output))

    def _stored_chunks(self) -> list[torch.Tensor]:
        """The stored batches' rows, in arrival order."""
        return self._chunks

    def stored_batches(self) -> list[torch.Tensor]:
        """Each stored batch's rows as stored (``dtype``, unpadded: widths may differ), in arrival
        order, without joining them as :meth:`result` does."""
        return list(self._stored_chunks())

    def result(self) -> torch.Tensor:
        """(rows, features) tensor of the stored rows (float32)."""
        return self.joined(self._stored_chunks())

    def joined(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """``batches`` (:meth:`stored_batches`, already read) as :meth:`result` returns them: one
        (rows, features) float32 tensor, each batch zero-padded to the widest row stored."""
        if not batches:
            return torch.empty(0, 0)
        chunks = [
            torch.nn.functional.pad(c, (0, self._width - c.shape[1])) if c.shape[1] < self._width else c
            for c in batches
        ]
        return torch.cat(chunks).float()


class ChannelMean:
    """Running mean over samples and unpadded tokens of each output channel (last dim)."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._count = 0

    def update(self, output: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = output.detach().float()
        m = _matching_mask(x, mask)
        rows = x[m] if m is not None else x.reshape(-1, x.shape[-1])
        s = rows.sum(dim=0, dtype=torch.float64).cpu()
        self._sum = s if self._sum is None else self._sum + s
        self._count += rows.shape[0]

    def result(self) -> torch.Tensor:
        """(channels,) float64 mean, or an empty tensor if nothing was seen."""
        if self._sum is None or self._count == 0:
            return torch.empty(0)
        return self._sum / self._count


def resolve_modules(
    model: nn.Module,
    modules: ModuleSelector = None,
    default_types: tuple[type, ...] = (nn.Linear,),
) -> list[str]:
    """Names of the modules of ``model`` chosen by ``modules``, in registration order.

    Args:
        model: the model.
        modules: None (every module of ``default_types``), an exact module name, a glob pattern
            (``*``, ``?``, ``[``), a module type, or a sequence mixing these.
        default_types: types chosen when ``modules`` is None.

    Returns:
        The matching module names (never the root ``""``).

    Raises:
        ModelStructureError: a name or pattern (or the whole selection) matches nothing.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if modules is None:
        chosen = [n for n, m in named if isinstance(m, default_types)]
        if not chosen:
            raise ModelStructureError(
                f"the model has no module of type {', '.join(t.__name__ for t in default_types)}"
            )
        return chosen
    selectors = [modules] if isinstance(modules, (str, type)) else list(modules)
    picked: set[str] = set()
    for sel in selectors:
        if isinstance(sel, type):
            hits = {n for n, m in named if isinstance(m, sel)}
        elif isinstance(sel, str) and any(ch in sel for ch in "*?["):
            hits = {n for n, _ in named if fnmatch.fnmatchcase(n, sel)}
        elif isinstance(sel, str):
            hits = {sel} if any(n == sel for n, _ in named) else set()
        else:
            raise ModelStructureError(f"module selector must be a name, pattern or type, got {sel!r}")
        if not hits:
            examples = ", ".join(n for n, _ in named[:8])
            raise ModelStructureError(
                f"module selector {sel!r} matches no module of {type(model).__name__}; "
                f"module names look like: {examples}, ..."
            )
        picked |= hits
    return [n for n, _ in named if n in picked]


@contextmanager
def preserved_mode(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` (and every submodule) in train/eval mode, restoring each module's mode on exit."""
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def model_device(model: nn.Module) -> torch.device:
    """Where the batches go: accelerate's execution device for a dispatched / offloaded model
    (whose offloaded parameters sit on ``meta``), else the first parameter's device that holds
    data (CPU when there is none)."""
    device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{tuple(value.shape)}"
    return type(value).__name__


def _describe_batch(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {_describe_value(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} of " + ", ".join(_describe_value(v) for v in batch)
    return _describe_value(batch)


def _forward_parameters(model: nn.Module) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _hint(model: nn.Module, batch: Any, message: str) -> str:
    """What the model expected, where vlprune can tell."""
    config = getattr(model, "config", None)
    image_token = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    if "image token" in message.lower() or (image_token is not None and "image" in message.lower()):
        return (
            f"{type(model).__name__} needs, in input_ids, one image token (id {image_token}) per visual feature "
            "of each image in pixel_values (the processor inserts them; a tokenizer alone does not): build "
            "batches with the model's processor(images=..., text=...), or for the testbed with "
            "vlprune.testbed.batches('llava')"
        )
    if isinstance(batch, Mapping):
        params = _forward_parameters(model)
        unknown = [k for k in batch if params and k not in params]
        if unknown:
            return f"{type(model).__name__}.forward takes no {', '.join(map(repr, unknown))}; it takes {', '.join(params)}"
        if params:
            return (
                f"{type(model).__name__}.forward takes {', '.join(params)}; check the batch's keys and shapes "
                "(the testbed models' batches: vlprune.testbed.batches(name))"
            )
    return "check that the batch is what the model takes (dict -> model(**batch), tuple -> model(*batch), tensor -> model(batch))"


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one batch: ``model(**batch)`` for a mapping, ``model(*batch)`` for a
    tuple/list, else ``model(batch)``; tensors are moved to the model's device first.

    Raises:
        DataError: the forward failed; the message names the batch's keys and shapes, what the
            model takes and, where known, how to build batches it accepts (the original error is
            chained as ``__cause__``).
    """
    batch = _to(batch, model_device(model))
    try:
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except VLPruneError:
        raise
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{type(model).__name__} failed on a calibration batch {_describe_batch(batch)}: "
            f"{type(exc).__name__}: {message}. {_hint(model, batch, str(exc))}"
        ) from exc


def batch_mask(batch: Any) -> torch.Tensor | None:
    """The batch's 2-D ``attention_mask`` (1 = real token), or None."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None


def _batch_size(batch: Any) -> int:
    t = first_tensor(batch if not isinstance(batch, Mapping) else list(batch.values()))
    return int(t.shape[0]) if t is not None and t.dim() > 0 else 1


def iterate_batches(batches: Iterable[Any]) -> list[Any]:
    """Materialise ``batches`` (so several passes are possible) and reject an empty iterable."""
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    out = list(batches)
    if not out:
        raise DataError("the calibration batches are empty; give at least one batch")
    return out


class _ForwardCut(BaseException):
    """Raised by a hook to stop a forward whose remaining part is not needed (:class:`ForwardCut`).
    A ``BaseException``, so that model code catching ``Exception`` lets it through."""


class ForwardCut:
    """Stops each forward right after the last hooked call it needs.

    The first whole forward records the sequence of hooked calls (:meth:`called` with a label
    each); in a later forward the hook of the last call of that sequence raises, ending the
    forward, as long as the calls so far follow the sequence exactly (a forward that strays from
    it, e.g. through input-dependent routing, runs whole). Nothing happens for a model dispatched
    by accelerate (``device_map``, offloading: its modules carry ``_hf_hook``), whose hooks put
    offloaded weights back after each module's forward, a step an exception would skip.

    Args:
        model: the model whose forwards are cut.
        enabled: False: every forward runs whole (:meth:`forward` only calls the model).

    Example:
        >>> cut = ForwardCut(model, enabled=True)                        # doctest: +SKIP
        >>> # in each hook, after its work: cut.called(name)
        >>> for batch in batches:
        ...     cut.forward(lambda: call_model(model, batch))            # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        if enabled and any(hasattr(m, "_hf_hook") for m in model.modules()):
            logger.debug("ForwardCut: the model has accelerate hooks; every forward runs whole")
            enabled = False
        self.enabled = enabled
        self._plan: list[Any] | None = None  # the first whole forward's hooked calls, in order
        self._calls: list[Any] | None = None  # this forward's so far (None: not cutting it)

    def called(self, label: Any) -> None:
        """Record a hooked call of the current forward; raises (ending the forward) after the
        last call of the plan. Call it at the end of the hook, after its work."""
        calls = self._calls
        if calls is None:
            return
        plan = self._plan
        if plan is not None and (len(calls) >= len(plan) or plan[len(calls)] != label):
            self._calls = None  # not the first forward's sequence: this one runs whole
            return
        calls.append(label)
        if plan is not None and len(calls) == len(plan):
            raise _ForwardCut

    def forward(self, call: Callable[[], Any]) -> bool:
        """Run ``call`` (one forward of the model); True if it was cut."""
        self._calls = [] if self.enabled else None
        try:
            call()
            if self._plan is None and self._calls is not None:
                self._plan = self._calls
            return False
        except _ForwardCut:
            return True
        finally:
            self._calls = None


class ActivationCapture:
    """Context manager hooking ``modules`` of ``model`` and feeding one reducer per module.

    Args:
        model: the model.
        modules: module names, glob patterns or types (see :func:`resolve_modules`), or None for
            every ``nn.Linear``.
        reducer_factory: called with each module name, returns its :class:`Reducer`.

    Example:
        >>> with ActivationCapture(model, "*.fc2", lambda n: ChannelMean()) as cap:
        ...     cap.run(batches)
        >>> means = cap.results()
    """

    def __init__(
        self,
        model: nn.Module,
        modules: ModuleSelector,
        reducer_factory: Callable[[str], Reducer],
    ) -> None:
        self.model = model
        self.names = resolve_modules(model, modules)
        self.reducers: dict[str, Reducer] = {n: reducer_factory(n) for n in self.names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mask: torch.Tensor | None = None
        self._cut: ForwardCut | None = None  # run(cut=True): kept across runs (its plan)

    def _hook(self, name: str) -> Callable[..., None]:
        reducer = self.reducers[name]

        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is not None:
                if isinstance(module, nn.modules.conv._ConvNd) and tensor.dim() >= 3:
                    # (B, C, *spatial) -> (B, *spatial, C): positions are tokens, channels features;
                    # a text padding mask never applies to them
                    reducer.update(tensor.movedim(1, -1), None)
                else:
                    reducer.update(tensor, self._mask)
            if self._cut is not None:
                self._cut.called(name)

        return hook

    def __enter__(self) -> ActivationCapture:
        modules = dict(self.model.named_modules())
        try:
            for name in self.names:
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def run(
        self,
        batches: Iterable[Any],
        *,
        grad: bool = False,
        progress: bool = True,
        stop_when: Callable[[], bool] | None = None,
        desc: str = "capture",
        cut: bool = False,
    ) -> int:
        """Run the model over ``batches`` in eval mode (mode restored after).

        Args:
            batches: dicts (``model(**b)``), tuples (``model(*b)``) or tensors (``model(b)``).
            grad: keep autograd on (for gradient-based criteria).
            progress: show a tqdm bar.
            stop_when: checked after each batch; True stops early (e.g. every reducer full).
            desc: progress-bar label.
            cut: stop each forward right after the last hooked module has run (its output is
                not needed, only the hooked outputs are). The first whole forward (of this or an
                earlier ``run(cut=True)``) records the order of the hooked modules' calls; a later
                batch is cut after the last of them only while its calls follow that order
                exactly, and runs whole otherwise (e.g. input-dependent routing). The rest of the
                model (a language model's head, a VLM's language model after a profiled vision
                tower) is skipped. Only without ``grad``; a model dispatched by accelerate
                (``device_map``, offloading: its modules carry ``_hf_hook``) always runs whole,
                since its hooks put offloaded weights back after each module's forward.

        Returns:
            Number of samples seen.

        Raises:
            VLPruneError: ``cut`` with ``grad``.
        """
        if cut and grad:
            raise VLPruneError("run(cut=True) stops forwards early, which leaves nothing to backpropagate; use grad=False")
        if cut and self._cut is None:
            self._cut = ForwardCut(self.model)
        cutter = self._cut if cut else None
        seen = 0
        items = iterate_batches(batches)
        with preserved_mode(self.model, training=False), torch.set_grad_enabled(grad):
            for batch in tqdm(items, desc=desc, disable=not progress, leave=False):
                self._mask = batch_mask(batch)
                try:
                    if cutter is not None:
                        cutter.forward(lambda: call_model(self.model, batch))
                    else:
                        call_model(self.model, batch)
                finally:
                    self._mask = None
                seen += _batch_size(batch)
                if stop_when is not None and stop_when():
                    break
        return seen

    def results(self) -> dict[str, Any]:
        """Each module's reducer result."""
        return {n: r.result() for n, r in self.reducers.items()}


def capture(
    model: nn.Module,
    batches: Iterable[Any],
    modules: ModuleSelector,
    reducer_factory: Callable[[str], Reducer],
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """One pass of ``model`` over ``batches`` with hooks on ``modules``; returns each reducer's result.

    Args:
        model: the model (left in the mode it was in).
        batches: calibration batches (see :meth:`ActivationCapture.run`).
        modules: module names, patterns or types.
        reducer_factory: module name -> reducer.
        progress: show a progress bar.

    Returns:
        module name -> reducer result.
    """
    with ActivationCapture(model, modules, reducer_factory) as cap:
        cap.run(batches, progress=progress)
        return cap.results()
