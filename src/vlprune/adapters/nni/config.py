"""Checks of an NNI 3.0 pruning ``config_list`` before NNI wraps anything.

NNI answers a bad ``config_list`` with a bare ``AssertionError`` or a ``schema`` error from deep
inside its wrapper code, sometimes after it has already wrapped part of the model. The vlprune NNI
pruners call :func:`check_config_list` first, so a mistake raises a :class:`~vlprune.errors.VLPruneError`
that names the offending entry and says what to do, and the model is never touched.

Example:
    >>> import torch
    >>> from vlprune.adapters.nni.config import check_config_list, select_modules
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> check_config_list(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}])
    >>> sorted(select_modules(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}]))
    ['0', '2']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from vlprune.errors import ModelStructureError, VLPruneError

__all__ = ["check_config_list", "select_modules", "nni_prunable_types"]

_RATIO_KEYS = ("sparse_ratio", "max_sparse_ratio", "min_sparse_ratio")
_SELECTORS = ("op_types", "op_names", "op_names_re")


def nni_prunable_types() -> list[str]:
    """Module class names NNI 3.0 knows how to prune (``PruningSetting.registry``).

    Returns:
        Sorted class names, e.g. ``["BatchNorm1d", ..., "Embedding", "Linear"]``.
    """
    from nni.compression.base.setting import PruningSetting

    return sorted(PruningSetting.registry)


def _nni_config_helpers() -> tuple[Any, Any, Any]:
    from nni.compression.base.config import default_config_schema, select_modules_by_config, trans_legacy_config_list

    return trans_legacy_config_list, select_modules_by_config, default_config_schema


def _describe(config: Mapping[str, Any]) -> str:
    keys = [k for k in (*_SELECTORS, "exclude_op_names", "exclude_op_types", "exclude_op_names_re") if config.get(k)]
    return "{" + ", ".join(f"{k!r}: {config[k]!r}" for k in keys) + "}"


def _example_names(model: nn.Module, limit: int = 4) -> str:
    from nni.compression.base.setting import PruningSetting

    names = [n for n, m in model.named_modules() if n and type(m).__name__ in PruningSetting.registry][:limit]
    return ", ".join(repr(n) for n in names) or "(none: the model has no Linear / Conv / Embedding / BatchNorm module)"


def _check_ratio(where: str, key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VLPruneError(f"{where}: {key} must be a number, got {value!r}")
    value = float(value)
    if key == "sparse_ratio" and not 0.0 <= value < 1.0:
        raise VLPruneError(
            f"{where}: sparse_ratio {value!r} is outside [0, 1); it is the fraction of weights to prune "
            "(0.3 prunes 30%, keeps 70%)"
        )
    if key == "max_sparse_ratio" and not 0.0 < value <= 1.0:
        raise VLPruneError(f"{where}: max_sparse_ratio {value!r} is outside (0, 1]")
    if key == "min_sparse_ratio" and not 0.0 <= value < 1.0:
        raise VLPruneError(f"{where}: min_sparse_ratio {value!r} is outside [0, 1)")


def _settings_of(config: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``[(label, setting_dict)]``: the shortcut (top-level) setting and each ``target_settings`` entry."""
    out: list[tuple[str, Mapping[str, Any]]] = [("", config)]
    target_settings = config.get("target_settings") or {}
    if isinstance(target_settings, Mapping):
        out.extend((f"target_settings[{name!r}]", setting) for name, setting in target_settings.items())
    return out


def _check_op_names(model: nn.Module, config: Mapping[str, Any], where: str) -> None:
    names = dict(model.named_modules(remove_duplicate=False))
    unknown = [n for n in (config.get("op_names") or []) if n not in names]
    if unknown:
        raise ModelStructureError(
            f"{where} op_names {unknown[:3]}{' ...' if len(unknown) > 3 else ''} name no module of "
            f"{type(model).__name__}; module names look like: {_example_names(model)}"
        )


def select_modules(model: nn.Module, config_list: Sequence[Mapping[str, Any]]) -> dict[str, nn.Module]:
    """The modules a ``config_list`` selects, exactly as NNI selects them (union over entries).

    Args:
        model: the model the config list is for.
        config_list: an NNI 3.0 (or legacy 2.x) pruning config list.

    Returns:
        ``{module_name: module}``; empty when nothing is selected.

    Raises:
        ModelStructureError: an ``op_names`` entry names no module of ``model``.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> list(select_modules(m, [{"op_names": ["0"], "sparse_ratio": 0.5}]))
        ['0']
    """
    trans_legacy, select_by_config, _ = _nni_config_helpers()
    selected: dict[str, nn.Module] = {}
    for i, config in enumerate(trans_legacy([dict(c) for c in config_list])):
        _check_op_names(model, config, f"config_list[{i}]")
        modules, _, _ = select_by_config(model, config)
        selected.update(modules)
    return dict(sorted(selected.items()))


def check_config_list(model: nn.Module, config_list: Sequence[Mapping[str, Any]]) -> None:
    """Validate an NNI pruning ``config_list`` against ``model`` without touching the model.

    Checks, in order: a non-empty list of dicts; NNI's own config schema; every ``sparse_ratio`` in
    [0, 1) (``max_sparse_ratio`` in (0, 1], ``min_sparse_ratio`` in [0, 1), min <= max); every entry
    selects at least one module; every selected module is a type NNI can prune; the targets of a
    ``global_group_id`` / ``dependency_group_id`` share one ``sparse_ratio`` (NNI asserts it).

    Args:
        model: the (unwrapped) model to prune.
        config_list: NNI 3.0 config list, e.g. ``[{"op_types": ["Linear"], "sparse_ratio": 0.5}]``;
            legacy 2.x keys (``sparsity``, ``exclude``) are translated as NNI does.

    Raises:
        VLPruneError: a malformed list, a ratio out of range, or inconsistent group ratios.
        ModelStructureError: an entry names a module the model lacks, selects no module, selects a module
            already wrapped by another NNI compressor, or selects a module type NNI cannot prune.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> check_config_list(model, [{"op_types": ["LayerNorm"], "sparse_ratio": 0.5}])
        Traceback (most recent call last):
        ...
        vlprune.errors.ModelStructureError: config_list[0] selects '1' (LayerNorm), which NNI cannot prune...
    """
    from nni.compression.base.setting import PruningSetting

    if isinstance(config_list, Mapping) or not isinstance(config_list, Sequence) or isinstance(config_list, str):
        raise VLPruneError(
            f"config_list must be a list of dicts, got {type(config_list).__name__}; e.g. "
            "[{'op_types': ['Linear'], 'sparse_ratio': 0.5}]"
        )
    if not config_list:
        raise VLPruneError("config_list is empty: nothing to prune; e.g. [{'op_types': ['Linear'], 'sparse_ratio': 0.5}]")
    for i, config in enumerate(config_list):
        if not isinstance(config, Mapping):
            raise VLPruneError(f"config_list[{i}] must be a dict, got {type(config).__name__}: {config!r}")

    trans_legacy, select_by_config, default_schema = _nni_config_helpers()
    try:
        configs = trans_legacy([dict(c) for c in config_list])
    except Exception as exc:  # NNI's legacy translation asserts / KeyErrors on malformed input
        raise VLPruneError(f"config_list could not be read as an NNI config list: {exc!r}") from exc

    # ranges first: NNI's schema only says "should be instance of float"
    for i, config in enumerate(configs):
        for label, setting in _settings_of(config):
            if not isinstance(setting, Mapping):
                continue
            where = f"config_list[{i}]" + (f" {label}" if label else "")
            for key in _RATIO_KEYS:
                _check_ratio(where, key, setting.get(key))
            lo, hi = setting.get("min_sparse_ratio"), setting.get("max_sparse_ratio")
            if lo is not None and hi is not None and float(lo) > float(hi):
                raise VLPruneError(f"{where}: min_sparse_ratio {lo} is above max_sparse_ratio {hi}")

    schema = default_schema("pruning")
    for i, config in enumerate(configs):
        if not any(config.get(k) for k in _SELECTORS):
            raise VLPruneError(
                f"config_list[{i}] selects nothing: give 'op_types', 'op_names' or 'op_names_re' "
                f"(e.g. 'op_types': ['Linear']); got keys {sorted(config)}"
            )
        for label, setting in _settings_of(config):
            if isinstance(setting, Mapping) and isinstance(setting.get("sparse_ratio"), int) and not isinstance(
                setting.get("sparse_ratio"), bool
            ):
                raise VLPruneError(
                    f"config_list[{i}]{(' ' + label) if label else ''}: write sparse_ratio as a float "
                    f"({float(setting['sparse_ratio'])!r}, not {setting['sparse_ratio']!r}); NNI's schema rejects ints"
                )
        try:
            schema.validate(config)
        except Exception as exc:  # schema.SchemaError
            raise VLPruneError(f"config_list[{i}] is not a valid NNI pruning config: {exc}") from exc

    registry = PruningSetting.registry
    group_ratios: dict[tuple[str, Any], set[float | None]] = {}
    for i, config in enumerate(configs):
        _check_op_names(model, config, f"config_list[{i}]")
        modules, _, _ = select_by_config(model, config)
        if not modules:
            raise ModelStructureError(
                f"config_list[{i}] {_describe(config)} selects no module of {type(model).__name__}; module names "
                f"look like: {_example_names(model)} (op_types are class names such as 'Linear')"
            )
        wrapped = sorted(n for n, m in modules.items() if hasattr(m, "_nni_wrapper") or type(m).__name__ == "ModuleWrapper")
        if wrapped:
            raise ModelStructureError(
                f"config_list[{i}] selects {wrapped[:3]}{' ...' if len(wrapped) > 3 else ''}, already wrapped by another NNI "
                "compressor; call unwrap_model() on that compressor first, or chain with <Pruner>.from_compressor(it, ...)"
            )
        bad = sorted((n, type(m).__name__) for n, m in modules.items() if type(m).__name__ not in registry)
        if bad:
            shown = ", ".join(f"{n!r} ({t})" for n, t in bad[:3]) + (" ..." if len(bad) > 3 else "")
            raise ModelStructureError(
                f"config_list[{i}] selects {shown}, which NNI cannot prune (it prunes {', '.join(sorted(registry))}); "
                "narrow the entry with op_types=['Linear'] or exclude_op_types, or register a setting with "
                "nni.compression.base.setting.PruningSetting.register()"
            )
        target_settings = config.get("target_settings") or {}
        for group_key in ("global_group_id", "dependency_group_id"):
            for label, setting in _settings_of(config):
                if not isinstance(setting, Mapping) or setting.get(group_key) is None:
                    continue
                ratio = setting.get("sparse_ratio", config.get("sparse_ratio") if label else None)
                if label == "" and "weight" in target_settings:
                    ratio = target_settings["weight"].get("sparse_ratio", ratio)
                group_ratios.setdefault((group_key, setting[group_key]), set()).add(
                    None if ratio is None else float(ratio)
                )
    for (group_key, group), ratios in group_ratios.items():
        if len(ratios) > 1 or None in ratios:
            shown = sorted(r for r in ratios if r is not None)
            raise VLPruneError(
                f"the entries with {group_key} {group!r} have sparse_ratio {shown}"
                f"{' (and some none)' if None in ratios else ''}; a group is pruned to one ratio, so give every "
                "entry of the group the same sparse_ratio (per-layer limits go in max_sparse_ratio)"
            )


class OneShotInFusion:
    """Mixin for one-shot NNI pruners (NNI's ``_NormPruner`` family) that fences an NNI 3.0 bug.

    Inside a fusion (``DynamicLayerwiseDistiller.from_compressor(pruner, ...)`` + an evaluator) a bare
    one-shot pruner has ``interval_steps == -1`` and NNI generates its masks only when
    ``first_step_gen`` is set, which defaults to False: the fused pruner never prunes. Under NNI's
    ``AGPPruner`` / ``LinearPruner`` the scheduler sets ``interval_steps`` and drives the masks itself, and
    an extra first-step generation would shift its cycle (the last sparsity goal would never be
    applied). So masks come at the first optimizer step exactly when no scheduler drives the pruner.
    """

    interval_steps: int
    first_step_gen: bool

    def _fuse_preprocess(self, evaluator: Any) -> None:
        self.first_step_gen = self.interval_steps == -1
        super()._fuse_preprocess(evaluator)  # type: ignore[misc]

