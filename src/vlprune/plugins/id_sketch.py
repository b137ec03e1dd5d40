"""Random-projection sketch of activation rows: trade the exactness of an ID estimate for memory.

A sparse Johnson-Lindenstrauss projection (Kane & Nelson's sparse JL / an Achlioptas-style
sign matrix with ``density`` non-zeros per input feature) maps a width-``W`` row to ``dim``
values: input feature ``j`` adds ``+-x_j / sqrt(density)`` to ``density`` output coordinates
drawn (with their signs) from a seeded generator. Squared distances are preserved in
expectation and, with high probability, within ``1 +- O(sqrt(log N / dim))`` for N points, so
the TwoNN ratios ``r2 / r1`` (and the ID) move little when ``dim`` is large enough; the estimate
is also capped near ``dim``. Applied in the capture hook, a module keeps ``N x dim`` values
instead of ``N x W`` (W = tokens x width for ``"flatten"``). Cost: ``density`` passes over each
batch's rows, no ``W x dim`` matrix in memory (the hashes take ``2 x density`` small integers
per input feature).

The projection of feature ``j`` depends only on ``(seed, j)`` (features come in blocks of
2**16 with their own generator), so rows of different widths (zero-padded ``"flatten"`` rows of
shorter batches) are sketched consistently, and results are reproducible.

Example:
    >>> import torch
    >>> sketch = SparseSignSketch(256, seed=0)
    >>> x = torch.randn(10, 5000)
    >>> y = sketch(x)
    >>> y.shape
    torch.Size([10, 256])
    >>> ratio = (torch.cdist(y, y)[0, 1:] / torch.cdist(x, x)[0, 1:])
    >>> bool(((ratio - 1).abs() < 0.3).all())
    True
"""

from __future__ import annotations

import math
import warnings

import torch

from vlprune.errors import VLPruneError

__all__ = ["SparseSignSketch", "DEFAULT_DENSITY"]

#: non-zeros per input feature
DEFAULT_DENSITY = 4

_BLOCK = 1 << 16


class SparseSignSketch:
    """Seeded sparse sign projection ``R^W -> R^dim`` for any W >= ``dim``.

    Args:
        dim: output width (the sketch dimension).
        density: non-zeros per input feature (1 is a CountSketch; more lowers the distortion of
            rows dominated by a few large features, at ``density`` passes per batch).
        seed: seed of the hashes and signs.
        name: module name, for error messages.

    Raises:
        VLPruneError: ``dim < 1`` or ``density < 1``; when called, rows narrower than ``dim``.
    """

    def __init__(self, dim: int, density: int = DEFAULT_DENSITY, seed: int = 0, name: str = "") -> None:
        if int(dim) < 1:
            raise VLPruneError(f"sketch_dim must be a positive integer, got {dim}")
        if int(density) < 1:
            raise VLPruneError(f"density must be >= 1, got {density}")
        self.dim = int(dim)
        self.density = min(int(density), self.dim)
        self.seed = int(seed)
        self.name = name
        self._index = torch.empty(self.density, 0, dtype=torch.long)
        self._sign = torch.empty(self.density, 0, dtype=torch.float32)
        self._matrices: dict[tuple[int, str], torch.Tensor] = {}

    def _extend(self, width: int) -> None:
        """Hashes and signs of features up to ``width`` (generated block by block)."""
        have = self._index.shape[1]
        if have >= width:
            return
        index, sign = [self._index], [self._sign]
        for block in range(have // _BLOCK, math.ceil(width / _BLOCK)):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
            index.append(torch.randint(0, self.dim, (self.density, _BLOCK), generator=g))
            signs = torch.randint(0, 2, (self.density, _BLOCK), generator=g).float().mul_(2).sub_(1)
            sign.append(signs / math.sqrt(self.density))
        self._index = torch.cat(index, dim=1)
        self._sign = torch.cat(sign, dim=1)

    def matrix(self, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The (dim, width) projection as a sparse CSR tensor (cached per width and device)."""
        key = (int(width), str(device))
        if key not in self._matrices:
            self._extend(width)
            features = torch.arange(width).repeat(self.density)
            coo = torch.sparse_coo_tensor(
                torch.stack([self._index[:, :width].reshape(-1), features]),
                self._sign[:, :width].reshape(-1),
                (self.dim, width),
            ).coalesce()  # a feature hashed twice to one coordinate adds its two signs
            self._matrices[key] = coo.to_sparse_csr().to(device)
        return self._matrices[key]

    def __call__(self, rows: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """Sketch (n, W) rows to (n, dim) float32 (``name``: the module, for error messages).

        Raises:
            VLPruneError: ``W < dim`` (a sketch wider than the data stores more than the data).
        """
        width = int(rows.shape[1])
        if width < self.dim:
            raise VLPruneError(
                f"sketch_dim={self.dim} is larger than the data of module {name or self.name or '?'}, whose rows have "
                f"{width} values; choose sketch_dim <= {width}, leave it None (exact), or leave that module out"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return (self.matrix(width, rows.device) @ rows.float().T).T.contiguous()
