"""``llava-real``: a LLaVA assembled from real parts, DINOv2-S tower + SmolLM2-135M, trained projector.

A transformers ``LlavaForConditionalGeneration`` whose vision tower is the real DINOv2 ViT-S/14
(:func:`vlprune.testbed.real_vision.load_dinov2_s`) and whose language model is the real
SmolLM2-135M-Instruct (:func:`vlprune.testbed.real_text.load_smollm2`). Trained: the projector
(LLaVA's 2-layer MLP, 384 -> 576 -> 576, GELU) and rank-8 low-rank updates of the LM's linears
(q/k/v/o, gate/up/down of the 30 layers; the tower and the LM weights themselves frozen), on the
testbed's caption + VQA mix. Both ship in ``checkpoints/llava-real/`` (2.2 MB projector, 4.9 MB of
bf16 updates); the rest is assembled from the installed packages at load time and the updates are
merged into the LM weights (:func:`merge_lm_deltas`), so the model is a plain Llava.

Choices (and why):

* **Image size 112 px** (the 56 px scenes upsampled bilinearly, grey replicated to RGB, ImageNet
  mean/std): 8 x 8 = **64 visual tokens** per scene, each digit (a quadrant) exactly 4 x 4 patches.
  56 px would give 16 tokens (a digit = 2 x 2 patches, far below DINOv2's 224 px training scale) and
  leaves little room for token pruning; 224 px would give 256 tokens, too slow on 2 CPU cores.
* **Features**: ``vision_feature_layer=-1`` (the output of the 12th block, before DINOv2's final
  LayerNorm: ``Dinov2Model`` ``hidden_states[-1]``), ``vision_feature_select_strategy="default"``
  (CLS dropped; the 64 patch tokens only), as LLaVA does with CLIP. transformers' Llava accepts a
  ``Dinov2Config`` as ``vision_config`` unchanged (``AutoModel.from_config``).
* **Image token**: ``<image>`` added to SmolLM2's tokenizer (id 49152); the embedding matrix (tied
  with the LM head) grows by one zero row, so ``<image>`` is never generated (its logit is 0 while
  the LM's top logits are positive) and every other logit is unchanged.
* **Prompt format**: SmolLM2's chat turns without a system prompt,
  ``<|im_start|>user\\n<image>*64\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`` then the answer and
  ``<|im_end|>`` (the LM's own end of turn, used as EOS). Prompts are the testbed's questions
  (``data.vqa``) and ``"caption"``; answers are the testbed's.
* **Training** (:func:`train_projector`): the DINOv2 features of 2000 training scenes are computed
  once. Stage 0 (cheap, no LM): every patch token of a quadrant is regressed (MSE) onto SmolLM2's
  input embedding of that quadrant's digit word, so the LM first sees the image as words it knows.
  Stage 1: next-token loss on the answer tokens only (per-example average), projector and LM
  updates trained (:class:`LowRankDeltas`, LoRA-style: ``B`` starts at zero), cosine schedule
  planned from the measured step time so it ends inside the time cap. A projector-only stage 1
  (LLaVA's stage 1, ``lm_rank=0``) did not read the digits within 700 steps here (docs). The
  shipped run: ``--train DIR --steps 1500 --max-minutes 35`` (the other defaults), 35 min on the 2
  idle cores: 3000 stage-0 steps (36 s, held-out quadrant accuracy 0.70) and 1211 stage-1 steps of
  8 examples (1.7 s each). On 100 test questions per task: VQA math 0.27 / general 0.71 (blind
  0.24 / 0.29), forced digit choice 0.65 (chance 0.1), caption digits 0.79 (blind 0.085).

Example:
    >>> from vlprune.testbed import real                            # doctest: +SKIP
    >>> model, proc = real.load("llava-real"), real.processor("llava-real")   # doctest: +SKIP
    >>> from vlprune.testbed.real_llava import answer                 # doctest: +SKIP
    >>> from vlprune.testbed.data import make_scenes                 # doctest: +SKIP
    >>> answer(model, make_scenes("test", 2), ["caption", "what is the sum of the digits ?"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlprune.errors import VLPruneError
from vlprune.plugins.capture import preserved_mode
from vlprune.testbed.data import DIGIT_WORDS, Scene, make_scenes, vqa
from vlprune.testbed.train import _pad_right

__all__ = [
    "IMAGE_PX",
    "N_VISUAL_TOKENS",
    "IMAGE_TOKEN",
    "CHECKPOINT_DIR",
    "PROJECTOR_FILE",
    "PROJECTOR_SHA256",
    "llava_real_tokenizer",
    "llava_real_processor",
    "llava_real_config",
    "scene_pixels",
    "prompt_ids",
    "example",
    "training_batch",
    "load_llava_real",
    "projector_state",
    "LM_DELTA_FILE",
    "LM_DELTA_SHA256",
    "LowRankDeltas",
    "merge_lm_deltas",
    "train_projector",
    "answer",
    "main",
]

logger = logging.getLogger(__name__)

#: input size of the tower: the 56 px scenes upsampled 2x (8 x 8 patches of 14 px)
IMAGE_PX = 112
PATCH = 14
#: visual tokens per scene (CLS dropped)
N_VISUAL_TOKENS = (IMAGE_PX // PATCH) ** 2
IMAGE_TOKEN = "<image>"
VISION_FEATURE_LAYER = -1
VISION_FEATURE_SELECT = "default"
CHECKPOINT_DIR = Path(__file__).parent / "checkpoints" / "llava-real"
PROJECTOR_FILE = "projector.safetensors"
#: sha256 of the shipped ``checkpoints/llava-real/projector.safetensors``
PROJECTOR_SHA256 = "29eae287a3eefbbd1e0adf3344ab4561067981fabe773f199071838b135a3f51"
#: low-rank updates of the language model's linears, merged into its weights at load time
LM_DELTA_FILE = "lm_delta.safetensors"
#: sha256 of the shipped ``checkpoints/llava-real/lm_delta.safetensors`` (None: none shipped)
LM_DELTA_SHA256: str | None = "45f07010684614ef61837b4fc16417f395a910964b27cc296168447db8218861"
#: the language-model linears (per decoder layer) that get a trained low-rank update
LM_DELTA_TARGETS: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
CAPTION_PROMPT = "caption"
#: caption, math VQA, general VQA shares of a training batch (the testbed's TASK_MIX)
TASK_MIX: tuple[float, float, float] = (0.2, 0.4, 0.4)


# --------------------------------------------------------------------------------------- text side
@functools.lru_cache(maxsize=1)
def llava_real_tokenizer() -> Any:
    """SmolLM2's tokenizer with the ``<image>`` token added (id 49152), padding on the left.

    Returns:
        A transformers fast tokenizer (a fresh copy is cached; do not mutate it).

    Example:
        >>> tok = llava_real_tokenizer()                        # doctest: +SKIP
        >>> tok.convert_tokens_to_ids("<image>")                # doctest: +SKIP
        49152
    """
    from vlprune.testbed.real_text import smollm2_tokenizer

    tok = smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.padding_side = "left"
    return tok


def _ids(text: str) -> list[int]:
    return list(llava_real_tokenizer()(text, add_special_tokens=False).input_ids)


def prompt_ids(prompt: str) -> list[int]:
    """Token ids of one user turn about an image, ending where the assistant's answer starts.

    ``<|im_start|>user\\n`` + 64 ``<image>`` + ``\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``.
    """
    image_id = llava_real_tokenizer().convert_tokens_to_ids(IMAGE_TOKEN)
    return _ids("<|im_start|>user\n") + [image_id] * N_VISUAL_TOKENS + _ids(f"\n{prompt}<|im_end|>\n<|im_start|>assistant\n")


def example(prompt: str, answer_text: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one training example: labels are -100 except on the answer and ``<|im_end|>``."""
    head = prompt_ids(prompt)
    tail = _ids(f"{answer_text}<|im_end|>")
    return head + tail, [-100] * len(head) + tail


def task_example(scene: Scene, task: int, rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) of task 0 (caption), 1 (math VQA) or 2 (general VQA) about ``scene``."""
    if task == 0:
        return CAPTION_PROMPT, scene.caption()
    return vqa(scene, "math" if task == 1 else "general", rng)


def training_batch(prompts: Sequence[str], answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` of (prompt, answer) examples."""
    pad = llava_real_tokenizer().pad_token_id
    rows = [example(p, a) for p, a in zip(prompts, answers)]
    ids, mask = _pad_right([x for x, _ in rows], pad)
    labels, _ = _pad_right([y for _, y in rows], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------- image side
def scene_pixels(scenes: Sequence[Scene]) -> torch.Tensor:
    """``(N, 3, 112, 112)`` tower inputs of ``scenes``: bilinear 2x upsampling, grey to RGB, ImageNet mean/std."""
    images = torch.from_numpy(np.stack([s.image() for s in scenes])).float()[:, None]
    x = torch.nn.functional.interpolate(images, size=(IMAGE_PX, IMAGE_PX), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1)
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


class LlavaRealProcessor:
    """What ``real.processor("llava-real")`` returns: turns testbed scenes and prompts into model inputs.

    Attributes:
        tokenizer: :func:`llava_real_tokenizer`.

    Example:
        >>> proc = llava_real_processor()                                   # doctest: +SKIP
        >>> batch = proc(make_scenes("test", 2), ["caption", "caption"])    # doctest: +SKIP
        >>> model.generate(**batch, max_new_tokens=30)                      # doctest: +SKIP
    """

    image_px = IMAGE_PX
    n_visual_tokens = N_VISUAL_TOKENS

    def __init__(self) -> None:
        self.tokenizer = llava_real_tokenizer()

    def __call__(self, scenes: Sequence[Scene], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded generation inputs: ``input_ids``, ``attention_mask``, ``pixel_values``."""
        if len(scenes) != len(prompts):
            raise VLPruneError(f"got {len(scenes)} scenes but {len(prompts)} prompts; give one prompt per scene")
        rows = [prompt_ids(p) for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": scene_pixels(scenes)}

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids -> answer text (up to ``<|im_end|>``), stripped."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return text.split("<|im_end|>")[0].strip()


def llava_real_processor() -> LlavaRealProcessor:
    """The :class:`LlavaRealProcessor` of ``llava-real`` (scenes + prompts -> inputs; decode)."""
    return LlavaRealProcessor()


# ------------------------------------------------------------------------------------------ model
def llava_real_config(vision_config: Any, text_config: Any) -> Any:
    """``LlavaConfig`` joining a ``Dinov2Config`` tower and SmolLM2's ``LlamaConfig`` (vocab + 1 for ``<image>``)."""
    from transformers import LlavaConfig

    image_id = llava_real_tokenizer().convert_tokens_to_ids(IMAGE_TOKEN)
    text = text_config.to_dict() | {"vocab_size": image_id + 1}
    return LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text,
        image_token_index=image_id,
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy=VISION_FEATURE_SELECT,
        projector_hidden_act="gelu",
        image_seq_length=N_VISUAL_TOKENS,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", True)),
    )


def _assemble(attn_implementation: str, init_projector: bool = True) -> Any:
    """The Llava with the real tower and LM; the projector initialised as transformers does (seed 0),
    or left uninitialised (``init_projector=False``, much faster: a trained one is loaded next)."""
    import contextlib

    from transformers import LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    from vlprune.testbed.real_text import load_smollm2
    from vlprune.testbed.real_vision import load_dinov2_s

    tower, lm = load_dinov2_s(), load_smollm2()
    config = llava_real_config(tower.config, lm.config)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(), (contextlib.nullcontext() if init_projector else no_init_weights()):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    lm_sd = dict(lm.model.state_dict())
    emb = lm_sd["embed_tokens.weight"]
    lm_sd["embed_tokens.weight"] = torch.cat([emb, torch.zeros(1, emb.shape[1], dtype=emb.dtype)])
    model.model.language_model.load_state_dict(lm_sd)
    if not config.tie_word_embeddings:  # pragma: no cover - SmolLM2 ties them
        w = lm.lm_head.weight
        model.lm_head.weight.data = torch.cat([w, torch.zeros(1, w.shape[1], dtype=w.dtype)])
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr() and config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    tok = llava_real_tokenizer()
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def projector_state(model: Any) -> dict[str, torch.Tensor]:
    """The projector's tensors (``linear_1`` / ``linear_2`` weight and bias), as shipped."""
    return {k: v.detach().clone().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}


def load_llava_real(checkpoint: str | Path | None = None, attn_implementation: str = "sdpa", expected_sha256: str | None = None) -> Any:
    """``llava-real`` in eval mode: real DINOv2-S + SmolLM2-135M + the shipped trained projector.

    Args:
        checkpoint: directory holding ``projector.safetensors`` and, when the LM was adapted too,
            ``lm_delta.safetensors`` (low-rank updates merged into the LM weights; default: the
            shipped ones).
        attn_implementation: ``"sdpa"`` (default) or ``"eager"`` (needed by FastV token pruning).
        expected_sha256: checksum the projector file must have (default: :data:`PROJECTOR_SHA256` for
            the shipped file, none for another ``checkpoint``).

    Returns:
        ``transformers.LlavaForConditionalGeneration`` (float32, eval mode, 64 visual tokens per scene).

    Raises:
        VLPruneError: a real-tier package is missing (the ``make real`` hint), or the projector file is
            missing, fails its checksum (named) or does not fit.

    Example:
        >>> model = load_llava_real()                        # doctest: +SKIP
        >>> model.config.image_seq_length                    # doctest: +SKIP
        64
    """
    from safetensors.torch import load_file

    path = Path(checkpoint or CHECKPOINT_DIR) / PROJECTOR_FILE
    if not path.is_file():
        raise VLPruneError(f"no trained projector at {path}; train one with `python -m vlprune.testbed.real_llava --train DIR`")
    from vlprune.testbed.real import sha256_file

    def check(file: Path, expected: str | None) -> None:
        if expected is not None and (actual := sha256_file(file)) != expected:
            raise VLPruneError(f"{file} is corrupt or truncated: sha256 {actual} != expected {expected}; "
                               "reinstall vlprune or retrain with `python -m vlprune.testbed.real_llava --train DIR`")

    shipped = checkpoint is None
    check(path, expected_sha256 or (PROJECTOR_SHA256 if shipped else None))
    delta_path = path.parent / LM_DELTA_FILE
    if shipped and LM_DELTA_SHA256 is not None and not delta_path.is_file():
        raise VLPruneError(f"{delta_path} is missing; reinstall vlprune")
    if delta_path.is_file():
        check(delta_path, LM_DELTA_SHA256 if shipped else None)
    model = _assemble(attn_implementation, init_projector=False)
    try:
        model.model.multi_modal_projector.load_state_dict(load_file(str(path)))
    except Exception as exc:  # safetensors raises its own SafetensorError on a damaged header
        raise VLPruneError(f"{path} does not hold a llava-real projector (384 -> 576 -> 576): {exc}") from exc
    if delta_path.is_file():
        try:
            state = load_file(str(delta_path))
        except Exception as exc:
            raise VLPruneError(f"{delta_path} is not a readable safetensors file: {exc}") from exc
        merge_lm_deltas(model, state)
    return model.eval()


# ------------------------------------------------------------------------ low-rank LM updates
class LowRankDeltas:
    """Trainable low-rank updates ``W + (alpha / r) B A`` of the LM linears, applied by forward hooks.

    ``A`` (r x in) starts small and random, ``B`` (out x r) at zero, so training starts from the
    unchanged LM (LoRA's initialisation). The hooks add ``(alpha / r) (x A^T) B^T`` to each target's
    output; :meth:`state` gives the tensors to ship and :func:`merge_lm_deltas` folds them into the
    weights, so the loaded model is a plain ``LlavaForConditionalGeneration`` with plain ``nn.Linear``
    layers (what the pruning tools see).

    Args:
        model: the assembled Llava.
        rank: ``r``.
        alpha: the scale numerator (``alpha / r`` multiplies ``B A``).
        targets: linears per decoder layer (:data:`LM_DELTA_TARGETS`).
        generator: seeds ``A``.
    """

    def __init__(self, model: Any, rank: int, alpha: float, targets: Sequence[str] = LM_DELTA_TARGETS,
                 generator: torch.Generator | None = None) -> None:
        if rank < 1:
            raise VLPruneError(f"rank must be at least 1, got {rank}")
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / int(rank)
        self.params: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self._handles: list[Any] = []
        layers = model.model.language_model.layers
        for i, layer in enumerate(layers):
            for t in targets:
                lin = layer.get_submodule(t)
                a = torch.nn.Parameter(torch.randn(self.rank, lin.in_features, generator=generator) / lin.in_features**0.5)
                b = torch.nn.Parameter(torch.zeros(lin.out_features, self.rank))
                name = f"layers.{i}.{t}"
                self.params[name] = (a, b)
                self._handles.append(lin.register_forward_hook(self._hook(a, b)))

    def _hook(self, a: torch.nn.Parameter, b: torch.nn.Parameter) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            return output + (inputs[0] @ a.T) @ (b.T * self.scale)
        return hook

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every ``A`` and ``B``."""
        return [p for pair in self.params.values() for p in pair]

    def state(self) -> dict[str, torch.Tensor]:
        """``{"<layer>.<target>.A": A, ".B": B}`` plus ``"scale"`` (what :func:`merge_lm_deltas` reads)."""
        out = {"scale": torch.tensor([self.scale])}
        for name, (a, b) in self.params.items():
            out[f"{name}.A"] = a.detach().clone().contiguous()
            out[f"{name}.B"] = b.detach().clone().contiguous()
        return out

    def remove(self) -> None:
        """Take the hooks off (the weights are unchanged)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def merge_lm_deltas(model: Any, state: dict[str, torch.Tensor]) -> int:
    """Fold shipped low-rank updates into the LM weights: ``W += scale * B @ A`` (float32).

    Args:
        model: the assembled Llava.
        state: :meth:`LowRankDeltas.state` (as saved).

    Returns:
        The number of linears updated.

    Raises:
        VLPruneError: a key names no LM linear, or a shape does not fit.
    """
    scale = float(state["scale"].reshape(-1)[0]) if "scale" in state else None
    names = sorted({k.rsplit(".", 1)[0] for k in state if k != "scale"})
    if scale is None or any(f"{n}.A" not in state or f"{n}.B" not in state for n in names):
        raise VLPruneError("the LM update file must hold 'scale' and an A and a B per linear")
    lm = model.model.language_model
    with torch.no_grad():
        for n in names:
            try:
                lin = lm.get_submodule(n)
                delta = (state[f"{n}.B"].float() @ state[f"{n}.A"].float()) * scale
                lin.weight.add_(delta.to(lin.weight.dtype))
            except (AttributeError, RuntimeError) as exc:
                raise VLPruneError(f"LM update {n!r} does not fit the language model: {exc}") from exc
    return len(names)



# --------------------------------------------------------------------------------------- training
@torch.no_grad()
def _features(model: Any, scenes: Sequence[Scene], batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """Frozen tower features ``(N, 64, 384)`` of ``scenes`` (the layer / strategy of the config)."""
    tower = model.model.vision_tower
    out = []
    for i in tqdm(range(0, len(scenes), batch_size), desc="DINOv2 features", disable=not progress):
        hs = tower(pixel_values=scene_pixels(scenes[i : i + batch_size]), output_hidden_states=True).hidden_states
        out.append(hs[VISION_FEATURE_LAYER][:, 1:].clone())
    return torch.cat(out)


def _quadrant_of_token() -> torch.Tensor:
    """Quadrant (0..3, reading order) of each of the 64 patch tokens (raster order)."""
    side = IMAGE_PX // PATCH
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return ((r >= side // 2).long() * 2 + (c >= side // 2).long()).flatten()


def _stage0(model: Any, feats: torch.Tensor, digits: torch.Tensor, held: tuple[torch.Tensor, torch.Tensor], log: dict[str, Any], steps: int, lr: float, batch: int, gen: torch.Generator, max_seconds: float) -> None:
    """Warm-up without the LM: each patch token is pulled onto the LM input embedding of its quadrant's
    digit word (MSE, normalised by the embeddings' mean square) and scored against the 10 digit words
    through the tied embedding / LM head (cross-entropy on ``token @ E_digits.T``)."""
    from vlprune.recipes.finetune import cosine_lr

    proj = model.model.multi_modal_projector
    emb = model.model.language_model.embed_tokens.weight.detach()
    word_ids = torch.tensor([_ids(f" {w}")[0] for w in DIGIT_WORDS])
    words = emb[word_ids]  # (10, 576)
    scale = words.pow(2).mean()
    quad = _quadrant_of_token()
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    curve, start = [], time.time()
    for step in tqdm(range(steps), desc="llava-real stage 0", disable=not log.get("progress", True)):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, steps // 20, lr)
        idx = torch.randint(0, len(feats), (batch,), generator=gen)
        label = digits[idx][:, quad]  # (batch, 64)
        out = proj(feats[idx])
        mse = torch.nn.functional.mse_loss(out, words[label]) / scale
        ce = torch.nn.functional.cross_entropy((out @ words.T).flatten(0, 1), label.flatten())
        loss = mse + ce
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            curve.append([step, round(float(mse.detach()), 4), round(float(ce.detach()), 4)])
        if time.time() - start > max_seconds:
            curve.append([step, round(float(mse.detach()), 4), round(float(ce.detach()), 4)])
            logger.info("stage 0: time budget reached after %d of %d steps", step + 1, steps)
            steps = step + 1
            break
    with torch.no_grad():  # digit word nearest (by LM-head score) to each quadrant's mean token, held-out scenes
        out = proj(held[0])
        q_mean = torch.stack([out[:, quad == q].mean(1) for q in range(4)], 1)
        acc = float(((q_mean @ words.T).argmax(-1) == held[1]).float().mean())
    log["stage0"] = {"steps": steps, "lr": lr, "max_seconds": max_seconds, "schedule": "cosine, 5% warm-up", "batch_scenes": batch,
                     "loss_mse_ce": curve, "seconds": round(time.time() - start, 1),
                     "held_out_quadrant_digit_accuracy": round(acc, 4), "held_out_scenes": len(held[0])}


def _lm_loss(model: Any, feats: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example answer loss with the projector applied to precomputed ``feats`` (logits on answer positions only)."""
    core = model.model
    ids, labels = batch["input_ids"], batch["labels"]
    embeds = core.language_model.embed_tokens(ids)
    image = core.multi_modal_projector(feats).reshape(-1, embeds.shape[-1])
    embeds = embeds.masked_scatter((ids == model.config.image_token_id)[..., None], image.to(embeds.dtype))
    hidden = core.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    target = labels[:, 1:]
    where = target != -100
    logits = model.lm_head(hidden[:, :-1][where]).float()
    tokens = torch.nn.functional.cross_entropy(logits, target[where], reduction="none")
    row = where.nonzero()[:, 0]
    per_example = torch.zeros(len(ids)).index_add_(0, row, tokens) / where.sum(1).clamp(min=1)
    return per_example.mean()


def train_projector(
    out: str | Path,
    *,
    n_scenes: int = 2000,
    stage0_steps: int = 3000,
    stage0_lr: float = 1e-3,
    stage0_batch: int = 16,
    steps: int = 1000,
    batch_size: int = 8,
    lr: float = 5e-4,
    lm_rank: int = 8,
    lm_alpha: float = 16.0,
    lm_lr: float = 5e-4,
    seed: int = 0,
    threads: int = 2,
    max_minutes: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the ``llava-real`` projector (and low-rank LM updates) and save them with ``train_log.json``.

    Args:
        out: output directory (``projector.safetensors``, ``lm_delta.safetensors`` when
            ``lm_rank > 0``, ``train_log.json``).
        n_scenes: training scenes whose DINOv2 features are computed once (the last quarter, at most
            256, is held out of stage 0 to measure its quadrant -> digit-word accuracy).
        stage0_steps / stage0_lr / stage0_batch: the no-LM warm-up (module docstring; batch in scenes); 0 skips it.
        steps / batch_size / lr: stage-1 steps (next-token loss on the answers), batch, projector
            peak learning rate (cosine schedule, 3% warm-up).
        lm_rank / lm_alpha / lm_lr: rank, scale numerator and peak learning rate of the low-rank
            updates of the LM's linears (:class:`LowRankDeltas`); ``lm_rank=0`` keeps the LM frozen
            (projector only, LLaVA stage 1).
        seed: seeds scene sampling, task draws and initialisation.
        threads: torch intra-op threads.
        max_minutes: wall-clock cap of the two stages (stage 0 at most 15%; stage 1 plans its
            step count from the measured time per step so that its cosine schedule ends within the
            cap; the steps actually run are logged).
        progress: tqdm bars.

    Returns:
        The training log (also written to ``out/train_log.json``).
    """
    from safetensors.torch import save_file

    from vlprune.recipes.finetune import cosine_lr
    from vlprune.testbed.train import tune_cpu_runtime

    tune_cpu_runtime(threads)
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = _assemble("sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.model.multi_modal_projector
    for p in proj.parameters():
        p.requires_grad_(True)
    trained = "projector only (tower and LM frozen)" if lm_rank == 0 else (
        f"projector + rank-{lm_rank} updates of the LM linears {list(LM_DELTA_TARGETS)} (tower and LM weights frozen)")
    log: dict[str, Any] = {"model": "llava-real", "trained": trained, "seed": seed,
                           "threads": threads, "image_px": IMAGE_PX, "visual_tokens": N_VISUAL_TOKENS,
                           "vision_feature_layer": VISION_FEATURE_LAYER, "select": VISION_FEATURE_SELECT}
    start = time.time()
    budget = 60 * max_minutes if max_minutes else float("inf")
    scenes = make_scenes("train", n_scenes, seed=seed * 1_000_003 + 900_000)
    feats = _features(model, scenes, progress=progress)
    digits = torch.tensor([s.digits for s in scenes])
    log["feature_seconds"] = round(time.time() - start, 1)
    gen = torch.Generator().manual_seed(seed)
    if stage0_steps > 0:
        n_held = min(256, n_scenes // 4)
        log["progress"] = progress
        _stage0(model, feats[:-n_held], digits[:-n_held], (feats[-n_held:], digits[-n_held:]), log, stage0_steps, stage0_lr, stage0_batch, gen,
                max_seconds=0.15 * budget)
        del log["progress"]
        logger.info("stage 0: %s", {k: v for k, v in log["stage0"].items() if k != "loss_mse_ce"})
    deltas = LowRankDeltas(model, lm_rank, lm_alpha, generator=gen) if lm_rank > 0 else None
    rng = random.Random(seed)
    groups = [{"params": list(proj.parameters()), "peak": lr}]
    if deltas is not None:
        groups.append({"params": deltas.parameters(), "peak": lm_lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    stage1: dict[str, Any] = {"steps_planned": steps, "batch_size": batch_size, "lr": lr, "task_mix": list(TASK_MIX),
                              "schedule": "cosine, 3% warm-up", "lm_rank": lm_rank, "lm_alpha": lm_alpha, "lm_lr": lm_lr,
                              "loss_average": "per example (answer tokens)", "loss": []}
    t1 = time.time()
    remaining = budget - (t1 - start)
    total = steps
    bar = tqdm(total=steps, desc="llava-real stage 1", disable=not progress)
    step = 0
    while step < total:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, max(1, total * 3 // 100), g["peak"])
        idx = [rng.randrange(len(scenes)) for _ in range(batch_size)]
        pairs = [task_example(scenes[i], rng.choices(range(3), weights=TASK_MIX)[0], rng) for i in idx]
        batch = training_batch([p for p, _ in pairs], [a for _, a in pairs])
        loss = _lm_loss(model, feats[idx], batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step == 5 and remaining < float("inf"):  # plan the schedule from the measured step time
            per_step = (time.time() - t1) / step
            fit = int(remaining / per_step)
            if fit < total:
                logger.info("stage 1: %.2f s per step; %d of %d steps fit in the time cap", per_step, fit, total)
                total = max(step + 1, fit)
                bar.total = total
        if step % 10 == 0 or step == total:
            stage1["loss"].append([step, round(float(loss.detach()), 4)])
            logger.info("stage 1 step %d/%d loss %.4f (%.2f s/step)", step, total, float(loss.detach()), (time.time() - t1) / step)
    bar.close()
    stage1["steps"] = step
    stage1["seconds"] = round(time.time() - t1, 1)
    stage1["seconds_per_step"] = round(stage1["seconds"] / max(step, 1), 2)
    log["stage1"] = stage1
    log["train_seconds"] = round(time.time() - start, 1)
    save_file(projector_state(model), str(out / PROJECTOR_FILE))
    if deltas is not None:  # bfloat16 halves the file; the merged model scores the same (docs)
        deltas.remove()
        save_file({k: v if k == "scale" else v.to(torch.bfloat16) for k, v in deltas.state().items()}, str(out / LM_DELTA_FILE))
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


# ------------------------------------------------------------------------------------------ usage
@torch.no_grad()
def answer(model: Any, scenes: Sequence[Scene], prompts: Sequence[str], max_new_tokens: int = 8, batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers of ``llava-real`` to ``prompts`` about ``scenes`` (one prompt per scene).

    Args:
        model: :func:`load_llava_real` (possibly pruned, or with token pruning attached).
        scenes: testbed scenes.
        prompts: ``"caption"`` or a testbed question, one per scene.
        max_new_tokens: generation budget (a caption needs about 20 tokens).
        batch_size: scenes per ``generate`` call.
        progress: tqdm bar over batches.

    Returns:
        The decoded answers, stripped, up to ``<|im_end|>``.
    """
    proc = llava_real_processor()
    out: list[str] = []
    with preserved_mode(model, training=False):
        for i in tqdm(range(0, len(scenes), batch_size), desc="generate", disable=not progress):
            batch = proc(scenes[i : i + batch_size], prompts[i : i + batch_size])
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            out.extend(proc.decode(row) for row in gen[:, batch["input_ids"].shape[1] :].tolist())
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m vlprune.testbed.real_llava --train OUT [...]`` reproduces the shipped projector;
    ``--eval [--n N]`` prints the task numbers of the shipped model next to the blind baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--train", type=Path, metavar="OUT", help="train a projector into OUT")
    what.add_argument("--eval", action="store_true", help="evaluate the shipped model on the test split")
    parser.add_argument("--n", type=int, default=100, help="--eval: scenes per task")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lm-rank", type=int, default=8, help="rank of the LM updates (0: projector only)")
    parser.add_argument("--lm-lr", type=float, default=5e-4)
    parser.add_argument("--stage0-steps", type=int, default=3000)
    parser.add_argument("--n-scenes", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock cap of the training stages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.eval:
        from vlprune.testbed.real_llava_eval import chance_baseline, evaluate_llava_real
        from vlprune.testbed.train import tune_cpu_runtime

        tune_cpu_runtime(args.threads)
        start = time.time()
        scores = evaluate_llava_real(load_llava_real(), n=args.n, progress=True)
        print(json.dumps({"llava-real": scores, "blind baseline": chance_baseline(n=args.n), "n": args.n,
                          "seconds": round(time.time() - start, 1)}, indent=1))
        return 0
    log = train_projector(args.train, n_scenes=args.n_scenes, stage0_steps=args.stage0_steps, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, lm_rank=args.lm_rank, lm_lr=args.lm_lr,
                          seed=args.seed, threads=args.threads,
                          max_minutes=args.max_minutes)
    print(json.dumps({k: v for k, v in log.items() if k != "stage1"}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
