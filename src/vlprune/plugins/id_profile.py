"""Per-layer intrinsic-dimension profiles: :class:`LayerID` and :class:`IDProfile` (what
:func:`vlprune.plugins.intrinsic_dim.estimate_ids` returns), with JSON round trips and the ID-over-depth plot.

Example:
    >>> from vlprune.plugins.id_profile import IDProfile, LayerID
    >>> p = IDProfile({"a.fc1": LayerID("a.fc1", 12.5, 500, 384, "vision")})
    >>> p["a.fc1"], IDProfile.from_dict(p.to_dict()) == p
    (12.5, True)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlprune.errors import ModelStructureError, VLPruneError

__all__ = ["IDProfile", "LayerID"]


@dataclass
class LayerID:
    """The intrinsic dimension of one module's representation.

    Attributes:
        name: module path.
        id: the estimate.
        n_samples: number of points (rows) it was estimated from, after dropping duplicates.
        features: width of one point (e.g. seq_len x out_dim for ``"flatten"``).
        modality: ``"vision"``, ``"language"``, ``"fusion"`` or ``"unknown"``.
    """

    name: str
    id: float
    n_samples: int
    features: int
    modality: str = "unknown"


@dataclass
class IDProfile:
    """Per-module intrinsic dimensions of a model, in forward (registration) order.

    Example:
        >>> profile = vlprune.estimate_ids(model, batches, n_samples=2000)   # doctest: +SKIP
        >>> profile["vision_model.encoder.layers.0.mlp.fc1"]                 # doctest: +SKIP
        41.7
        >>> profile.plot("id.png"); profile.to_json("id.json")              # doctest: +SKIP
    """

    layers: dict[str, LayerID] = field(default_factory=dict)
    representation: str = "flatten"
    estimator: str = "linear"
    discard_fraction: float = 0.1
    n_blocks: int | None = None
    model_class: str = ""

    def __getitem__(self, name: str) -> float:
        try:
            return self.layers[name].id
        except KeyError:
            raise ModelStructureError(
                f"the ID profile has no entry for module {name!r}; it covers {len(self.layers)} "
                "modules (estimate_ids(..., modules=...) chooses which)"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def get(self, name: str, default: float | None = None) -> float | None:
        """The ID of ``name``, or ``default``."""
        layer = self.layers.get(name)
        return layer.id if layer is not None else default

    def ids(self) -> dict[str, float]:
        """module name -> ID."""
        return {n: layer.id for n, layer in self.layers.items()}

    def by_modality(self) -> dict[str, list[LayerID]]:
        """modality -> its layers, in forward order."""
        out: dict[str, list[LayerID]] = {}
        for layer in self.layers.values():
            out.setdefault(layer.modality, []).append(layer)
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """Per modality: number of layers, mean, min, max and first/peak/last position of the ID."""
        out: dict[str, dict[str, float]] = {}
        for modality, layers in self.by_modality().items():
            values = [x.id for x in layers]
            peak = max(range(len(values)), key=values.__getitem__)
            out[modality] = {
                "layers": float(len(values)),
                "mean": sum(values) / len(values),
                "min": min(values),
                "max": max(values),
                "first": values[0],
                "last": values[-1],
                "peak_position": peak / max(1, len(values) - 1),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "format": "vlprune.IDProfile/1",
            "representation": self.representation,
            "estimator": self.estimator,
            "discard_fraction": self.discard_fraction,
            "n_blocks": self.n_blocks,
            "model_class": self.model_class,
            "layers": [asdict(layer) for layer in self.layers.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IDProfile:
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != "vlprune.IDProfile/1":
            raise VLPruneError("not a vlprune ID profile (missing format 'vlprune.IDProfile/1')")
        layers = {d["name"]: LayerID(**d) for d in data["layers"]}
        return cls(
            layers=layers,
            representation=data.get("representation", "flatten"),
            estimator=data.get("estimator", "linear"),
            discard_fraction=data.get("discard_fraction", 0.1),
            n_blocks=data.get("n_blocks"),
            model_class=data.get("model_class", ""),
        )

    def to_json(self, path: str | Path) -> Path:
        """Write the profile as JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> IDProfile:
        """Read a profile written by :meth:`to_json`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise VLPruneError(f"cannot read an ID profile from {path}: {exc}") from exc
        return cls.from_dict(data)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Plot ID over depth, one line per modality (the paper's vision "hunchback" vs flat
        language figure), and save it as an image; returns the path."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(8, 4))
        colours = {"vision": "tab:red", "language": "tab:blue", "fusion": "tab:green"}
        for modality, layers in self.by_modality().items():
            ax.plot(
                range(len(layers)),
                [x.id for x in layers],
                marker="o",
                markersize=3,
                label=f"{modality} ({len(layers)} modules)",
                color=colours.get(modality, "tab:gray"),
            )
        ax.set_xlabel("module index within its modality (forward order)")
        ax.set_ylabel(f"intrinsic dimension (TwoNN, {self.estimator})")
        ax.set_title(title or f"ID profile of {self.model_class or 'model'} ({self.representation})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
