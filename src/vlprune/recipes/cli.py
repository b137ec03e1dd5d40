"""The ``vlprune`` command.

    vlprune list                                    # registered criteria: level, data, adapters
    vlprune profile-id MODEL_DIR --data batches.pt  # per-layer ID profile: JSON + PNG
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vlprune
from vlprune.errors import DataError, VLPruneError

__all__ = ["main", "load_model_dir", "load_batches"]

logger = logging.getLogger("vlprune.cli")


def load_model_dir(path: str | Path) -> nn.Module:
    """Load a transformers model directory (``save_pretrained`` output or ``vlprune.save_pruned``
    output) without any download."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise VLPruneError(f"{path} is not a model directory (no config.json)")
    if (path / "vlprune_shapes.json").is_file():
        return vlprune.load_pruned(path)
    import transformers

    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(path, local_files_only=True).eval()


def load_batches(spec: str, model: nn.Module, batch_size: int, n_batches: int, seed: int) -> list[Any]:
    """Calibration batches from ``spec``: a ``.pt`` file holding a list of batches (dicts of
    tensors, or tensors) or one dict of tensors split into ``batch_size`` chunks; or ``random``:
    random inputs shaped from the model config (a smoke test, not a meaningful profile); or
    ``testbed``: test-split scenes (and their captions for models with a text tower)."""
    if spec == "random":
        return _random_batches(model, batch_size, n_batches, seed)
    if spec == "testbed":
        return _testbed_batches(model, batch_size, n_batches, seed)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--data {spec!r}: no such file (give a .pt file of batches, or 'random')")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict):
        n = next(iter(data.values())).shape[0]
        return [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]
    if isinstance(data, torch.Tensor):
        return list(data.split(batch_size))
    if isinstance(data, (list, tuple)):
        return list(data)
    raise DataError(f"{path} holds a {type(data).__name__}; expected a list of batches or a dict of tensors")


def _testbed_batches(model: nn.Module, batch_size: int, n_batches: int, seed: int) -> list[dict[str, torch.Tensor]]:
    from vlprune.testbed.data import build_tokenizer, make_scenes, pixel_values

    scenes = make_scenes("test", batch_size * n_batches, seed=seed)
    tok = build_tokenizer()
    wants_text = getattr(getattr(model, "config", None), "text_config", None) is not None
    out = []
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i : i + batch_size]
        batch = {"pixel_values": pixel_values(chunk)}
        if wants_text:
            enc = tok([s.caption() for s in chunk], padding=True, return_tensors="pt")  # type: ignore[operator]
            batch.update(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        out.append(batch)
    return out


def _random_batches(model: nn.Module, batch_size: int, n_batches: int, seed: int) -> list[dict[str, torch.Tensor]]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise DataError("--data random needs a transformers model with a config")
    g = torch.Generator().manual_seed(seed)
    vision = getattr(cfg, "vision_config", None) or (cfg if hasattr(cfg, "image_size") else None)
    text = getattr(cfg, "text_config", None) or (cfg if hasattr(cfg, "vocab_size") else None)
    out = []
    for _ in range(n_batches):
        batch: dict[str, torch.Tensor] = {}
        if vision is not None:
            size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
            batch["pixel_values"] = torch.randn(batch_size, getattr(vision, "num_channels", 3), size, size, generator=g)
        if text is not None and getattr(cfg, "model_type", "") not in ("vit", "dinov2", "deit"):
            ids = torch.randint(3, text.vocab_size - 1, (batch_size, 16), generator=g)
            image_token = getattr(cfg, "image_token_index", None) or getattr(cfg, "image_token_id", None)
            if image_token is not None and vision is not None:
                n_img = (size // vision.patch_size) ** 2
                ids = torch.cat([torch.full((batch_size, n_img), image_token), ids], dim=1)
            batch["input_ids"] = ids
            batch["attention_mask"] = torch.ones_like(ids)
        out.append(batch)
    return out


def _cmd_list(args: argparse.Namespace) -> int:
    specs = vlprune.criteria()
    adapters = sorted({a for s in specs for a in s.adapters})
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


def _cmd_profile_id(args: argparse.Namespace) -> int:
    model = load_model_dir(args.model_dir)
    batches = load_batches(args.data, model, args.batch_size, args.n_batches, args.seed)
    profile = vlprune.estimate_ids(
        model,
        batches,
        modules=args.modules or None,
        n_samples=args.n_samples,
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vlprune`` command."""
    parser = argparse.ArgumentParser(prog="vlprune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered criteria and the adapters that support them")
    p.add_argument("-v", "--verbose", action="store_true", help="also print descriptions")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("profile-id", help="per-layer intrinsic dimension of a model directory")
    p.add_argument("model_dir", help="save_pretrained / vlprune.save_pruned directory")
    p.add_argument("--data", required=True, help="a .pt file of calibration batches, 'testbed' (test-split scenes) or 'random'")
    p.add_argument("--out", default="id_profile", help="output directory (id.json, id.png)")
    p.add_argument("--modules", nargs="*", help="module names or glob patterns (default: all Linear but heads)")
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--representation", default="flatten", choices=["flatten", "cls", "mean", "tokens"])
    p.add_argument("--estimator", default="linear", choices=["linear", "mle"])
    p.add_argument("--n-blocks", type=int, default=None, help="average over 1..N random blocks (paper: 20)")
    p.add_argument("--max-memory-mb", type=float, default=2048.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-batches", type=int, default=8, help="with --data random / testbed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_profile_id)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlprune`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except VLPruneError as exc:
        sys.stderr.write(f"vlprune: error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
