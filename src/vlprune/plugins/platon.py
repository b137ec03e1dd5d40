"""PLATON (Zhang et al., ICML 2022): upper confidence bound of weight sensitivity, and its cubic
sparsity schedule.

Per weight ``theta``, after every backward pass:

* the sensitivity ``|theta * dL/dtheta|`` is averaged over a local window of ``delta_t`` calls of
  :meth:`Platon.update`;
* when a window closes, ``Ibar <- beta1 * Ibar + (1 - beta1) * I`` and then
  ``Ubar <- beta2 * Ubar + (1 - beta2) * |I - Ibar|`` (with the already-updated ``Ibar``);
* the score is ``S = Ibar * Ubar`` (``beta2 = 1`` gives ``S = Ibar``).

Conventions (the paper leaves them open; these follow its official code's order of operations):
``Ibar`` and ``Ubar`` start at zero; the window closes on every ``delta_t``-th call of
``update()`` (the first time on the ``delta_t``-th call) and only then do the EMAs move, so scores
are zero until the first window has closed. A parameter that has no gradient at a call (frozen, or
``update()`` before ``backward()``) is skipped for that call: a warning when no parameter has one
(a mistake), an info log otherwise (parameters the loss never reaches); its window counts only the
calls where it had one.

With ``torch.nn.utils.prune`` masks on a layer the trained parameter is ``<name>_orig``; its state
is kept under the plain name (``layer.weight``), which is also the name :meth:`Platon.score` takes.

Several processes (``DistributedDataParallel``): call :meth:`Platon.update` on every rank after
each ``loss.backward()`` of the DDP-wrapped model (``platon.update(ddp.module)``). DDP has then
averaged the gradients over the ranks and the parameters are the same on every rank, so every
rank's state and scores are identical, with no collective here: they equal one process whose loss
is the mean of the ranks' mean losses, i.e. the loss over the union of the shards when the shards
are equal (for uneven shards weight each rank's loss by ``n_rank * world / n_total``, as
:func:`vlprune.recipes.distill.distill` does). With gradient accumulation under ``no_sync()``, call
it only after the synchronising backward. The same holds for Taylor scores read from ``.grad``
(``GroupTaylorImportance``, ``IDWeighted``). Tested in ``tests/plugins/test_distributed.py``.

Example:
    >>> import torch
    >>> from vlprune.plugins.platon import Platon, cubic_schedule
    >>> layer = torch.nn.Linear(4, 2)
    >>> platon = Platon(delta_t=2)
    >>> for _ in range(4):
    ...     layer(torch.randn(8, 4)).square().mean().backward()
    ...     closed = platon.update(layer.named_parameters())
    ...     layer.zero_grad()
    >>> platon.windows
    2
    >>> platon.score("weight").shape
    torch.Size([2, 4])
    >>> cubic_schedule(50, 100, 1.0, 0.2, warmup_steps=10, initial_warmup=1, final_warmup=2)
    (0.2629..., True)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from vlprune.errors import VLPruneError
from vlprune.plugins.hookspecs import CriterionSpec, hookimpl

__all__ = ["Platon", "cubic_schedule", "plain_name", "vlprune_register_criteria"]

logger = logging.getLogger(__name__)

_PRUNE_SUFFIX = "_orig"


def plain_name(name: str) -> str:
    """``"fc.weight_orig"`` -> ``"fc.weight"`` (torch.nn.utils.prune's reparametrisation)."""
    return name[: -len(_PRUNE_SUFFIX)] if name.endswith(_PRUNE_SUFFIX) else name


class Platon:
    """Running PLATON state for a set of parameters.

    Args:
        beta1: EMA factor of the sensitivity (``Ibar``), in [0, 1).
        beta2: EMA factor of the uncertainty (``Ubar``), in [0, 1]; 1 scores by ``Ibar`` alone.
        delta_t: length of the local window, in calls of :meth:`update` (>= 1).
        include: optional predicate on parameter names; parameters it rejects are ignored.

    Attributes:
        calls: number of :meth:`update` calls so far.
        windows: number of windows closed so far.
    """

    def __init__(
        self,
        beta1: float = 0.85,
        beta2: float = 0.95,
        delta_t: int = 10,
        include: Any = None,
    ) -> None:
        if not 0.0 <= beta1 < 1.0:
            raise VLPruneError(f"beta1 must be in [0, 1), got {beta1!r}")
        if not 0.0 <= beta2 <= 1.0:
            raise VLPruneError(f"beta2 must be in [0, 1], got {beta2!r}")
        if not isinstance(delta_t, int) or delta_t < 1:
            raise VLPruneError(f"delta_t must be a positive integer, got {delta_t!r}")
        self.beta1, self.beta2, self.delta_t = float(beta1), float(beta2), delta_t
        self.include = include
        self.calls = 0
        self.windows = 0
        self._window_sum: dict[str, torch.Tensor] = {}
        self._window_count: dict[str, int] = {}
        self.ibar: dict[str, torch.Tensor] = {}
        self.ubar: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()

    # -- accumulation ---------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, named_parameters: Iterable[tuple[str, torch.Tensor]] | nn.Module) -> bool:
        """Add the current ``|theta * grad|`` of every parameter to the window; close the window
        on every ``delta_t``-th call.

        Args:
            named_parameters: ``model.named_parameters()`` (or the model itself), after
                ``loss.backward()``.

        Returns:
            True when this call closed a window (the scores changed).
        """
        items = named_parameters.named_parameters() if isinstance(named_parameters, nn.Module) else named_parameters
        self.calls += 1
        skipped: list[str] = []
        scored = 0
        for raw_name, param in items:
            name = plain_name(raw_name)
            if self.include is not None and not self.include(name):
                continue
            if param.grad is None:
                if param.requires_grad:
                    skipped.append(name)
                continue
            scored += 1
            sensitivity = (param.detach() * param.grad.detach()).abs()
            if sensitivity.dtype in (torch.float16, torch.bfloat16):
                sensitivity = sensitivity.float()  # half-precision models keep float32 statistics
            previous = self._window_sum.get(name)
            if previous is not None and previous.shape != sensitivity.shape:
                self._reshaped(name, sensitivity.shape)
                previous = None
            self._window_sum[name] = sensitivity if previous is None else previous.add_(sensitivity)
            self._window_count[name] = self._window_count.get(name, 0) + 1
        new = [n for n in skipped if n not in self._warned]
        if new:
            self._warned.update(new)
            if not scored:  # nothing had a gradient: update() before backward(), or the loss reaches no weight
                warnings.warn(
                    f"PLATON skipped all {len(skipped)} trainable parameter(s), each without a gradient; call "
                    f"platon.update(model) after loss.backward(): {new[:3]}{' ...' if len(new) > 3 else ''}",
                    stacklevel=2,
                )
            else:  # parameters the loss does not reach (e.g. a vision tower's unused final norm)
                logger.info(
                    "PLATON skips %d parameter(s) the loss gives no gradient (never scored, never pruned by "
                    "PLATON): %s%s", len(new), new[:3], " ..." if len(new) > 3 else "",
                )
        if self.calls % self.delta_t != 0:
            return False
        self._close_window()
        return True

    def _close_window(self) -> None:
        self.windows += 1
        for name, total in self._window_sum.items():
            count = self._window_count.get(name, 0)
            if count == 0:
                continue
            current = total / count
            ibar = self.ibar.get(name)
            if ibar is None or ibar.shape != current.shape:
                ibar = torch.zeros_like(current)
            ibar.mul_(self.beta1).add_(current, alpha=1.0 - self.beta1)
            self.ibar[name] = ibar
            if self.beta2 < 1.0:
                ubar = self.ubar.get(name)
                if ubar is None or ubar.shape != current.shape:
                    ubar = torch.zeros_like(current)
                ubar.mul_(self.beta2).add_((current - ibar).abs(), alpha=1.0 - self.beta2)
                self.ubar[name] = ubar
        self._window_sum.clear()
        self._window_count.clear()

    def _reshaped(self, name: str, shape: torch.Size) -> None:
        logger.warning(
            "PLATON state of %s restarts: its shape changed to %s (pruned without remove(); use "
            "PlatonImportance.step(pruner) to carry the state over)", name, tuple(shape),
        )
        for store in (self.ibar, self.ubar):
            store.pop(name, None)
        self._window_count.pop(name, None)

    # -- scores ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the parameters that have a score (at least one closed window)."""
        return list(self.ibar)

    def score(self, name: str) -> torch.Tensor:
        """PLATON score ``Ibar * Ubar`` (``Ibar`` when ``beta2 = 1``) of parameter ``name``.

        Raises:
            VLPruneError: no window has closed for that parameter yet.
        """
        name = plain_name(name)
        if name not in self.ibar:
            known = ", ".join(list(self.ibar)[:3]) or "none yet"
            raise VLPruneError(
                f"no PLATON score for {name!r} (calls so far: {self.calls}, delta_t {self.delta_t}; "
                f"scored: {known}); call update() after each backward for at least delta_t steps"
            )
        if self.beta2 >= 1.0:
            return self.ibar[name]
        return self.ibar[name] * self.ubar[name]

    def scores(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``{name: score}`` for ``names`` (default: every scored parameter)."""
        return {plain_name(n): self.score(n) for n in (self.names() if names is None else names)}

    # -- structure changes ----------------------------------------------------------------------

    @torch.no_grad()
    def remove(self, name: str, dim: int, idxs: Iterable[int]) -> None:
        """Drop entries ``idxs`` along ``dim`` of parameter ``name``'s state (after structured
        pruning removed them from the parameter), keeping the rest of the state."""
        name = plain_name(name)
        drop = sorted(set(int(i) for i in idxs))
        for store in (self.ibar, self.ubar, self._window_sum):
            tensor = store.get(name)
            if tensor is None or not drop:
                continue
            if dim >= tensor.dim():
                raise VLPruneError(f"PLATON state of {name!r} has {tensor.dim()} dims; cannot prune dim {dim}")
            keep = torch.ones(tensor.shape[dim], dtype=torch.bool)
            keep[drop] = False
            store[name] = tensor[(slice(None),) * dim + (keep,)].contiguous()

    # -- persistence ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (tensors on their devices)."""
        return {
            "beta1": self.beta1, "beta2": self.beta2, "delta_t": self.delta_t, "calls": self.calls,
            "windows": self.windows, "ibar": dict(self.ibar), "ubar": dict(self.ubar),
            "window_sum": dict(self._window_sum), "window_count": dict(self._window_count),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        try:
            self.beta1, self.beta2, self.delta_t = float(state["beta1"]), float(state["beta2"]), int(state["delta_t"])
            self.calls, self.windows = int(state["calls"]), int(state["windows"])
            self.ibar, self.ubar = dict(state["ibar"]), dict(state["ubar"])
            self._window_sum, self._window_count = dict(state["window_sum"]), dict(state["window_count"])
        except KeyError as exc:
            raise VLPruneError(f"not a PLATON state dict: missing {exc}") from exc


def cubic_schedule(
    step: int,
    total_steps: int,
    initial_ratio: float = 1.0,
    final_ratio: float = 0.2,
    warmup_steps: int = 0,
    initial_warmup: float = 1.0,
    final_warmup: float = 5.0,
    delta_t: int = 10,
) -> tuple[float, bool]:
    """PLATON's cubic schedule of the *remaining* ratio.

    With ``t_i = initial_warmup * warmup_steps`` and ``t_f = final_warmup * warmup_steps``:

    * ``step <= t_i``: ``initial_ratio``, masks not updated;
    * ``step > total_steps - t_f``: ``final_ratio``, masks updated every step;
    * otherwise ``final + (initial - final) * (1 - (step - t_i) / (total - t_i - t_f))**3``,
      masks updated when ``step % delta_t == 0``.

    Args:
        step: the current training step (0-based).
        total_steps: the number of training steps.
        initial_ratio: remaining ratio at the start (1.0 = dense).
        final_ratio: remaining ratio at the end (e.g. 0.2 = 80% pruned).
        warmup_steps: unit of the two warm-up lengths.
        initial_warmup: dense steps at the start, in units of ``warmup_steps``.
        final_warmup: steps at the final ratio at the end, in units of ``warmup_steps``.
        delta_t: mask-update period during the cubic phase.

    Returns:
        ``(remaining_ratio, update_masks)``.

    Raises:
        VLPruneError: ratios outside (0, 1] or in the wrong order, warm-ups longer than training.
    """
    if not (0.0 < final_ratio <= 1.0 and 0.0 < initial_ratio <= 1.0):
        raise VLPruneError(f"remaining ratios must be in (0, 1]; got initial {initial_ratio!r}, final {final_ratio!r}")
    if final_ratio > initial_ratio:
        raise VLPruneError(
            f"final remaining ratio {final_ratio} is above the initial {initial_ratio}: the schedule only prunes "
            "(remaining ratios, not sparsities: 0.2 keeps 20%)"
        )
    if total_steps < 1 or step < 0:
        raise VLPruneError(f"need total_steps >= 1 and step >= 0; got step {step}, total_steps {total_steps}")
    if warmup_steps < 0 or initial_warmup < 0 or final_warmup < 0 or delta_t < 1:
        raise VLPruneError("warmup_steps, initial_warmup and final_warmup must be >= 0 and delta_t >= 1")
    t_i = initial_warmup * warmup_steps
    t_f = final_warmup * warmup_steps
    if t_i + t_f >= total_steps:
        raise VLPruneError(
            f"warm-ups ({t_i:g} + {t_f:g} steps) leave no room for the cubic phase in {total_steps} steps; "
            "shorten warmup_steps or the warm-up factors"
        )
    if step <= t_i:
        return float(initial_ratio), False
    if step > total_steps - t_f:
        return float(final_ratio), True
    coeff = 1.0 - (step - t_i) / (total_steps - t_i - t_f)
    ratio = final_ratio + (initial_ratio - final_ratio) * coeff**3
    return float(min(initial_ratio, max(final_ratio, ratio))), step % delta_t == 0


@hookimpl
def vlprune_register_criteria() -> list[CriterionSpec]:
    """Register PLATON and ID-PLATON."""
    return [
        CriterionSpec(
            name="platon",
            level="weight",
            needs="training",
            adapters={
                "torch_pruning": "vlprune.adapters.torch_pruning:PlatonImportance",
                "nni": "vlprune.adapters.nni.pruners:PlatonPruner",
            },
            description="UCB of weight sensitivity |w * grad| (EMA x uncertainty), call update() after backward",
            source="Zhang et al., ICML 2022",
        ),
    ]
