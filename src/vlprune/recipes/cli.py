"""The ``vlprune`` command.

    vlprune list                                    # criteria x adapters matrix: level, data, support
    vlprune profile-id MODEL_DIR --data batches.pt  # per-layer ID profile: out/id_profile/id.{json,png}
    vlprune profile-id src/vlprune/testbed/checkpoints/llava --data testbed   # the testbed's own scenes
    vlprune recipes                                 # built-in recipes and what they do
    vlprune run id-taylor --model testbed:llava --out out/id-taylor --set distill.steps=50   # [--resume]

Any failure ends with one ``vlprune: error: ...`` paragraph on stderr (exit status 2 for an input
vlprune understood as wrong, 1 for an unexpected error); ``--log-level DEBUG`` also logs the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vlprune
from vlprune.errors import DataError, VLPruneError
from vlprune.plugins.registry import ADAPTERS

__all__ = [
    "main",
    "build_parser",
    "load_model_dir",
    "load_batches",
    "identify_testbed",
    "image_tokens_per_image",
    "DEFAULT_OUT",
    "recipes_help",
]

logger = logging.getLogger("vlprune.cli")

#: default ``profile-id --out``: under ``out/``, which the repository's ``.gitignore`` ignores
DEFAULT_OUT = "out/id_profile"
#: default ``profile-id --n-samples`` (fewer when the batches hold fewer samples)
DEFAULT_N_SAMPLES = 2000
#: text tokens per sample in ``--data random`` batches (after the image tokens of LLaVA-style models)
RANDOM_TEXT_LEN = 16
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: vision towers without a CLS token in front of the patch tokens (``model_type`` substrings)
_NO_CLS_TOWERS = ("siglip",)


def load_model_dir(path: str | Path) -> nn.Module:
    """Load a transformers model directory (``save_pretrained`` output or ``vlprune.save_pruned``
    output) without any download.

    Args:
        path: the directory (it holds ``config.json``).

    Returns:
        The model in eval mode.

    Raises:
        VLPruneError: ``path`` is not a model directory.

    Example:
        >>> model = load_model_dir("src/vlprune/testbed/checkpoints/llava")   # doctest: +SKIP
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise VLPruneError(
            f"{path} is not a model directory (no config.json); give a save_pretrained or "
            "vlprune.save_pruned directory"
        )
    if (path / "vlprune_shapes.json").is_file():
        return vlprune.load_pruned(path)
    import transformers

    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(path, local_files_only=True).eval()


def load_batches(
    spec: str, model: nn.Module, batch_size: int, n_batches: int, seed: int, *, split: str = "test"
) -> list[Any]:
    """Calibration batches from ``spec``.

    Args:
        spec: a ``.pt`` file holding a list of batches (dicts of tensors, or tensors) or one dict
            of tensors split into ``batch_size`` chunks; ``testbed``: the testbed's ``split``
            scenes in the form the testbed model takes (:func:`vlprune.testbed.batches`), for the
            testbed models and their ``save_pruned`` outputs only; or ``random``: random
            inputs shaped from the model config (a smoke test, not a meaningful profile), with
            the image placeholder tokens LLaVA-style models need.
        model: the model the batches are for.
        batch_size: samples per batch.
        n_batches: batches to make for ``testbed`` / ``random``.
        seed: seed of the scenes / random inputs.
        split: ``testbed`` only: ``"test"`` (the default, as the profiles in docs/testbed.md),
            ``"val"`` (held out from evaluation: use it when the profile drives a pruning that
            is then evaluated) or ``"train"``.

    Returns:
        A list of batches.

    Raises:
        DataError: a missing or unreadable file, ``testbed`` for a model that is not a testbed
            model, ``random`` for a model without a config.

    Example:
        >>> calib = load_batches("testbed", model, batch_size=16, n_batches=2, seed=0)  # doctest: +SKIP
    """
    if spec == "random":
        return _random_batches(model, batch_size, n_batches, seed)
    if spec == "testbed":
        return _testbed_batches(model, batch_size, n_batches, seed, split)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--data {spec!r}: no such file (give a .pt file of batches, 'testbed' or 'random')")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = _one_paragraph(str(exc))[:200] or type(exc).__name__
        raise DataError(
            f"--data {spec!r}: torch.load cannot read it ({reason}); save the batches with "
            "torch.save(list_of_batch_dicts, path), tensors only"
        ) from exc
    if isinstance(data, dict):
        n = next(iter(data.values())).shape[0]
        return [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]
    if isinstance(data, torch.Tensor):
        return list(data.split(batch_size))
    if isinstance(data, (list, tuple)):
        return list(data)
    raise DataError(f"{path} holds a {type(data).__name__}; expected a list of batches or a dict of tensors")


def _fingerprint(config: Any) -> dict[str, Any]:
    """What pruning never changes in a config: family, vocabulary, image geometry, special tokens."""
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None) or config
    return {
        "model_type": getattr(config, "model_type", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "image_size": getattr(vision, "image_size", None),
        "patch_size": getattr(vision, "patch_size", None),
        "special_tokens": sorted(_special_token_ids(config)),
    }


def identify_testbed(model: nn.Module) -> str | None:
    """Which testbed model ``model`` is (``"clip"``, ``"llava"``, ``"blip"``), or None.

    A model is a testbed model when its class is the testbed checkpoint's and its config agrees
    with the checkpoint's on what pruning never changes (model type, vocabulary size, image and
    patch size, special token ids); so ``vlprune.save_pruned`` outputs of a testbed model count,
    models that merely share the architecture (e.g. ``tiny_model("llava")``) do not.

    Args:
        model: a loaded transformers model.

    Returns:
        The name :func:`vlprune.testbed.batches` takes, or None.

    Example:
        >>> identify_testbed(vlprune.testbed.load("llava"))                  # doctest: +SKIP
        'llava'
    """
    from transformers import AutoConfig

    from vlprune.testbed import MODELS, checkpoint_dir

    config = getattr(model, "config", None)
    if config is None:
        return None
    for name, class_name in MODELS.items():
        if type(model).__name__ != class_name:
            continue
        try:
            reference = AutoConfig.from_pretrained(checkpoint_dir(name), local_files_only=True)
        except VLPruneError:  # a checkpoint missing from this install
            logger.debug("testbed checkpoint %r is not available", name, exc_info=True)
            continue
        if _fingerprint(config) == _fingerprint(reference):
            return name
    return None


def _testbed_batches(
    model: nn.Module, batch_size: int, n_batches: int, seed: int, split: str
) -> list[dict[str, torch.Tensor]]:
    from vlprune.testbed import MODELS, batches

    name = identify_testbed(model)
    if name is None:
        raise DataError(
            f"--data testbed: the testbed scenes fit only the testbed models ({', '.join(MODELS)}: "
            "src/vlprune/testbed/checkpoints/<name> or their vlprune.save_pruned output), and this "
            f"{type(model).__name__} is not one of them (its vocabulary, image size or special tokens "
            "differ). Pass a .pt file of batches the model accepts (torch.save(list_of_batch_dicts, "
            "'batches.pt'), e.g. built with its processor), or --data random for a smoke test"
        )
    logger.info("--data testbed: %d %s-split batches of the testbed %s", n_batches, split, name)
    return batches(name, n_samples=batch_size * n_batches, batch_size=batch_size, split=split, seed=seed)


def _special_token_ids(config: Any) -> set[int]:
    """Every ``*_token_id`` / ``*_token_index`` (pad, bos, eos, sep, image, ...) of ``config`` and
    of its text config."""
    out: set[int] = set()
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for key in dir(cfg):
            if key.startswith("_") or not key.endswith(("_token_id", "_token_ids", "_token_index")):
                continue
            try:
                value = getattr(cfg, key)
            except Exception:  # some config properties raise when unset
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            out.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return out


def _image_token_id(config: Any) -> int | None:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def image_tokens_per_image(config: Any) -> int:
    """Image placeholder tokens a LLaVA-style model expects per image in ``input_ids``.

    transformers' LLaVA fills one placeholder per visual feature: the vision tower's tokens (the
    patches, plus a CLS token for CLIP-like towers; SigLIP has none) of which
    ``vision_feature_select_strategy="default"`` drops the first (``[:, 1:]``) and ``"full"``
    keeps all.

    Args:
        config: the model config (with ``vision_config``).

    Returns:
        ``(image_size // patch_size) ** 2 + cls - (strategy == "default")``; 16 for the testbed
        LLaVA (56 // 14 = 4 patches a side, CLS dropped).

    Example:
        >>> image_tokens_per_image(vlprune.testbed.load("llava").config)   # doctest: +SKIP
        16
    """
    vision = config.vision_config
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    tokens = (size // patch) ** 2
    if not any(t in str(getattr(vision, "model_type", "")) for t in _NO_CLS_TOWERS):
        tokens += 1
    if getattr(config, "vision_feature_select_strategy", "default") == "default":
        tokens -= 1
    return tokens


def _random_batches(model: nn.Module, batch_size: int, n_batches: int, seed: int) -> list[dict[str, torch.Tensor]]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise DataError("--data random needs a transformers model with a config; pass a .pt file of batches")
    g = torch.Generator().manual_seed(seed)
    vision = getattr(cfg, "vision_config", None) or (cfg if hasattr(cfg, "image_size") else None)
    text = getattr(cfg, "text_config", None) or (cfg if hasattr(cfg, "vocab_size") else None)
    image_token = _image_token_id(cfg)
    n_img = image_tokens_per_image(cfg) if image_token is not None and vision is not None else 0
    allowed = None
    if text is not None:
        excluded = _special_token_ids(cfg)
        allowed = torch.tensor([i for i in range(text.vocab_size) if i not in excluded], dtype=torch.long)
        if allowed.numel() == 0:
            raise DataError(f"--data random: every id of the {text.vocab_size}-token vocabulary is a special token")
    out = []
    for _ in range(n_batches):
        batch: dict[str, torch.Tensor] = {}
        if vision is not None:
            size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
            batch["pixel_values"] = torch.randn(batch_size, getattr(vision, "num_channels", 3), size, size, generator=g)
        if allowed is not None and getattr(cfg, "model_type", "") not in ("vit", "dinov2", "deit"):
            ids = allowed[torch.randint(0, allowed.numel(), (batch_size, RANDOM_TEXT_LEN), generator=g)]
            if n_img:
                image = torch.full((batch_size, n_img), image_token, dtype=torch.long)  # type: ignore[arg-type]
                ids = torch.cat([image, ids], dim=1)  # the placeholders the vision features replace
            batch["input_ids"] = ids
            batch["attention_mask"] = torch.ones_like(ids)
        out.append(batch)
    return out


def _cmd_list(args: argparse.Namespace) -> int:
    specs = vlprune.criteria()
    extra = sorted({a for s in specs for a in s.adapters} - set(ADAPTERS))  # third-party adapters
    adapters = [*ADAPTERS, *extra]
    head = ["criterion", "level", "needs", *adapters, "source"]
    rows = [
        [s.name, s.level, s.needs, *("yes" if a in s.adapters else "-" for a in adapters), s.source]
        for s in specs
    ]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        sys.stdout.write("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    if args.verbose:
        for s in specs:
            sys.stdout.write(f"\n{s.name}: {s.description}\n")
    return 0


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Without transformers' progress bars ("Loading weights") while ``quiet``; restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def _n_samples(args: argparse.Namespace, batches: list[Any]) -> int:
    """``--n-samples``, or by default :data:`DEFAULT_N_SAMPLES` capped at the samples the batches
    hold (rows are samples except with ``--representation tokens``), so that a default run does
    not ask ``estimate_ids`` for more samples than it is given."""
    if args.n_samples is not None:
        return int(args.n_samples)
    if args.representation == "tokens":
        return DEFAULT_N_SAMPLES
    from vlprune.plugins.capture import first_tensor

    held = 0
    for batch in batches:
        t = first_tensor(batch)
        held += int(t.shape[0]) if t is not None and t.dim() > 0 else 1
    return min(DEFAULT_N_SAMPLES, held) if held else DEFAULT_N_SAMPLES


def _cmd_profile_id(args: argparse.Namespace) -> int:
    with _quiet_transformers(args.quiet):
        model = load_model_dir(args.model_dir)
    batches = load_batches(args.data, model, args.batch_size, args.n_batches, args.seed, split=args.split)
    profile = vlprune.estimate_ids(
        model,
        batches,
        modules=args.modules or None,
        n_samples=_n_samples(args, batches),
        representation=args.representation,
        estimator=args.estimator,
        n_blocks=args.n_blocks,
        max_memory_mb=args.max_memory_mb,
        progress=not args.quiet,
    )
    out = Path(args.out)
    json_path = profile.to_json(out / "id.json")
    png_path = profile.plot(out / "id.png")
    sys.stdout.write(f"{'modality':10s} {'layers':>6s} {'mean':>8s} {'min':>8s} {'max':>8s} {'peak at':>8s}\n")
    for modality, s in profile.summary().items():
        sys.stdout.write(
            f"{modality:10s} {int(s['layers']):6d} {s['mean']:8.2f} {s['min']:8.2f} {s['max']:8.2f} "
            f"{s['peak_position']:8.2f}\n"
        )
    sys.stdout.write(f"wrote {json_path} and {png_path}\n")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from vlprune.recipes.schema import builtin_recipes, load_recipe_source

    for name in builtin_recipes():
        try:
            raw, _ = load_recipe_source(name)
            desc, fw = raw.get("description", ""), raw.get("framework", "torch_pruning")
            stages = " -> ".join(str(s.get("step")) for s in raw.get("stages", []) if isinstance(s, dict))
        except VLPruneError as exc:
            desc, fw, stages = f"(cannot be read: {_one_paragraph(str(exc))})", "?", ""
        sys.stdout.write(f"{name:12s} [{fw}] {desc}\n")
        if args.verbose and stages:
            sys.stdout.write(f"{'':12s} stages: {stages}\n")
    return 0


def recipes_help() -> str:
    """Every built-in recipe's keys and defaults (the epilog of ``vlprune run --help``)."""
    from vlprune.recipes.schema import builtin_recipes, resolve_recipe

    lines = ["built-in recipes (override any key with --set KEY=VALUE):", ""]
    for name in builtin_recipes():
        try:
            recipe = resolve_recipe(name).to_dict()
        except VLPruneError as exc:
            lines += [f"  {name}: (not available: {_one_paragraph(str(exc))[:200]})", ""]
            continue
        lines.append(f"  {name}: {recipe.get('description', '')}")
        top = ", ".join(f"{k}={recipe[k]}" for k in ("framework", "seed", "model", "data", "batch_size"))
        top += ", " + ", ".join(f"report.{k}={v}" for k, v in recipe["report"].items())
        lines.append(f"    {top}")
        for i, stage in enumerate(recipe["stages"], start=1):
            params = " ".join(f"{k}={v}" for k, v in stage["params"].items())
            lines.append(f"    {i}. {stage['step']}: {params}")
        lines.append("")
    lines.append("keys: framework=nni, seed=1, <step>.<param>=VALUE (e.g. distill.steps=20), or <stage number>.<param>")
    return "\n".join(lines)


def _cmd_run(args: argparse.Namespace) -> int:
    from vlprune.recipes.runner import run_recipe
    from vlprune.recipes.schema import parse_set

    overrides = parse_set(args.set or [])
    with _quiet_transformers(args.quiet):
        result = run_recipe(
            args.recipe, model=args.model, data=args.data, out=args.out, resume=args.resume,
            progress=not args.quiet, overrides=overrides,
        )
    size = result.report["size"]
    sys.stdout.write(
        f"parameters {size['params_before']:,} -> {size['params_after']:,}; "
        f"latency {size['latency_ms_before']:.1f} -> {size['latency_ms_after']:.1f} ms\n"
    )
    for metric in sorted(result.metrics.get("after", {})):
        before = result.metrics.get("before", {}).get(metric)
        after = result.metrics["after"][metric]
        sys.stdout.write(f"{metric}: {'-' if before is None else f'{before:.4f}'} -> {after:.4f}\n")
    sys.stdout.write(f"wrote {result.paths['report_md']}")
    if "model_dir" in result.paths:
        sys.stdout.write(f" and {result.paths['model_dir']}")
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vlprune`` command."""
    parser = argparse.ArgumentParser(prog="vlprune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--log-level", default="WARNING", type=str.upper, choices=_LOG_LEVELS,
        help="logging level (default WARNING; DEBUG also logs the traceback of an error)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_HelpParser)

    p = sub.add_parser(
        "list", help="registered criteria x adapters matrix",
        description="Registered criteria and, for every adapter vlprune knows "
        f"({', '.join(ADAPTERS)}), whether it supports them ('yes') or not yet ('-').",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="also print descriptions")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("profile-id", help="per-layer intrinsic dimension of a model directory")
    p.add_argument("model_dir", help="save_pretrained / vlprune.save_pruned directory")
    p.add_argument(
        "--data", required=True,
        help="a .pt file of calibration batches; 'testbed' (the testbed's scenes, see --split, for the "
        "testbed models src/vlprune/testbed/checkpoints/{clip,llava,blip} and their save_pruned outputs); "
        "or 'random' (random inputs shaped from the config, a smoke test)",
    )
    p.add_argument(
        "--split", default="test", choices=["train", "val", "test"],
        help="with --data testbed: the scenes' split (default: %(default)s; val when the profile drives "
        "a pruning you then evaluate on test)",
    )
    p.add_argument(
        "--out", default=DEFAULT_OUT,
        help="output directory for id.json and id.png (default: %(default)s; out/ is git-ignored)",
    )
    p.add_argument("--modules", nargs="*", help="module names or glob patterns (default: all Linear but heads)")
    p.add_argument(
        "--n-samples", type=int, default=None,
        help=f"samples (rows) per layer (default: {DEFAULT_N_SAMPLES}, or all the batches hold if fewer)",
    )
    p.add_argument("--representation", default="flatten", choices=["flatten", "cls", "mean", "tokens"])
    p.add_argument("--estimator", default="linear", choices=["linear", "mle"])
    p.add_argument("--n-blocks", type=int, default=None, help="average over 1..N random blocks (paper: 20)")
    p.add_argument("--max-memory-mb", type=float, default=None,
                   help="RAM for stored rows (default: half the available memory; the rest is spilled to disk)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-batches", type=int, default=8, help="with --data random / testbed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (vlprune's and transformers')")
    p.set_defaults(func=_cmd_profile_id)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each recipe's stages")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser(
        "run", help="run a recipe: prune, distil, evaluate, save, report (resumable)",
        description="Run a recipe (a built-in name or a YAML file) from a model to a pruned, distilled, "
        "evaluated, saved model, with DIR/report.md. Kill it and continue with --resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.epilog_fn = recipes_help
    p.add_argument("recipe", help="built-in recipe name (vlprune recipes) or a YAML file")
    p.add_argument("--model", default=None, help="model directory (save_pretrained / save_pruned) or testbed:<name> (default: the recipe's)")
    p.add_argument(
        "--data", default=None,
        help="testbed:<name>, a .pt file of batches, or a folder of images with captions.jsonl "
        "(default: the recipe's, else the testbed of a testbed model)",
    )
    p.add_argument("--out", default="pruned/", help="run directory (default: %(default)s)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. distill.steps=20 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (finished stages are skipped)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)
    return parser



class _HelpParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose epilog may be computed when help is printed (``epilog_fn``): the
    ``run`` epilog resolves every built-in recipe, which only ``--help`` needs."""

    epilog_fn: Any = None

    def format_help(self) -> str:
        if self.epilog_fn is not None:
            self.epilog = self.epilog_fn()
        return super().format_help()


def _one_paragraph(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlprune`` command; returns the exit status.

    Returns:
        0 on success; 2 for a :class:`VLPruneError` (an input vlprune understood as wrong; its
        message says what to do); 1 for any other error, reported as ``vlprune: error: <type>:
        <message>`` with the hint to rerun with ``--log-level DEBUG``, which logs the traceback;
        130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    level = getattr(logging, args.log_level)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    try:
        with warnings.catch_warnings():
            # Torch-Pruning's advice to pass unwrapped_parameters is for its API users, not for
            # the command's; vlprune handles those parameters itself.
            warnings.filterwarnings("ignore", message=r"Unwrapped parameters detected")
            return int(args.func(args))
    except VLPruneError as exc:
        logger.debug("vlprune %s failed", args.command, exc_info=True)
        sys.stderr.write(f"vlprune: error: {_one_paragraph(str(exc))}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("vlprune: interrupted\n")
        return 130
    except Exception as exc:
        logger.debug("vlprune %s failed with an unexpected error", args.command, exc_info=True)
        message = _one_paragraph(str(exc)).rstrip(".") or "(no message)"
        hint = (
            "see the traceback above" if level <= logging.DEBUG
            else "rerun with --log-level DEBUG to see the traceback"
        )
        sys.stderr.write(f"vlprune: error: {type(exc).__name__}: {message} (an unexpected error; {hint})\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
