"""Train the testbed models on CPU, seeded: ``python -m vlprune.testbed.train clip``.

* ``clip``: a small ``CLIPModel`` (56 px scenes, 14 px patches) trained contrastively on
  (scene, caption) pairs.
* ``llava``: ``LlavaForConditionalGeneration`` whose vision tower starts from the testbed CLIP,
  trained on captioning + math VQA + general VQA (loss on answer tokens only).

Checkpoints (``save_pretrained``, safetensors), the tokenizer and ``train_log.json`` go to
``src/vlprune/testbed/checkpoints/<name>/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlprune.recipes.finetune import cosine_lr
from vlprune.testbed.data import IMAGE_SIZE, build_tokenizer, make_scenes, pixel_values, vocab_index, vocabulary, vqa

__all__ = ["CHECKPOINTS", "clip_config", "llava_config", "lm_example", "llava_batch", "per_example_loss", "TASK_MIX", "train_clip", "train_llava", "tune_cpu_runtime", "main"]

logger = logging.getLogger(__name__)

CHECKPOINTS = Path(__file__).parent / "checkpoints"
MAX_TEXT = 24
N_IMAGE_TOKENS = (IMAGE_SIZE // 14) ** 2  # 16 patch tokens (the CLS token is dropped)
DEEP_LAYERS = 8  # decoder layers of the testbed "llava-deep"


def clip_config() -> Any:
    """The testbed CLIP: 4-layer ViT on 56 px scenes (16 patches + CLS), 2-layer text encoder."""
    from transformers import CLIPConfig

    vocab = vocabulary()
    return CLIPConfig(
        vision_config=dict(
            hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=14, num_channels=3,
        ),
        text_config=dict(
            hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
            vocab_size=len(vocab), max_position_embeddings=MAX_TEXT, bos_token_id=vocab.index("[BOS]"),
            eos_token_id=vocab.index("[EOS]"), pad_token_id=vocab.index("[PAD]"),
        ),
        projection_dim=64,
    )


def llava_config(vision_config: Any | None = None, num_layers: int = 4) -> Any:
    """The testbed LLaVA: the testbed CLIP's vision tower, a 2-layer projector and a
    ``num_layers``-layer Llama-style decoder (GQA: 4 query / 2 key-value heads); 4 layers for
    ``llava``, 8 for ``llava-deep`` (depth pruning needs more layers to remove)."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vocab = vocabulary()
    vision = vision_config if vision_config is not None else CLIPVisionConfig(**clip_config().vision_config.to_dict())
    return LlavaConfig(
        vision_config=vision.to_dict() | {"model_type": "clip_vision_model"},
        text_config=dict(
            model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=64,
            bos_token_id=vocab.index("[BOS]"), eos_token_id=vocab.index("[EOS]"), pad_token_id=vocab.index("[PAD]"),
            tie_word_embeddings=False,
        ),
        image_token_index=vocab.index("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=N_IMAGE_TOKENS,
    )


def blip_config() -> Any:
    """The testbed BLIP captioner: a 4-layer ViT on 56 px scenes (as the CLIP tower) and a 3-layer
    BERT-style text decoder with cross-attention to the image tokens."""
    from transformers import BlipConfig

    vocab = vocabulary()
    ids = {k: vocab.index(v) for k, v in (("bos", "[BOS]"), ("eos", "[EOS]"), ("pad", "[PAD]"), ("sep", "[SEP]"))}
    return BlipConfig(
        vision_config=dict(
            hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=14,
        ),
        text_config=dict(
            vocab_size=len(vocab), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
            num_attention_heads=4, encoder_hidden_size=96, max_position_embeddings=MAX_TEXT,
            bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], sep_token_id=ids["sep"],
        ),
        projection_dim=64,
    )


def _pad_right(rows: Sequence[Sequence[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(len(rows), longest)`` tensor of ``rows`` and its 0/1 attention mask."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return out, mask


def blip_batch(scenes: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Captioning batch for the testbed BLIP: ``[BOS] caption [SEP]`` (BLIP stops at ``[SEP]``),
    labels = the ids with padding set to -100 (the decoder shifts them itself)."""
    vocab = vocab_index()
    rows = [[vocab["[BOS]"], *(vocab[w] for w in s.caption().split()), vocab["[SEP]"]] for s in scenes]
    input_ids, mask = _pad_right(rows, vocab["[PAD]"])
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"pixel_values": pixel_values(scenes), "input_ids": input_ids, "attention_mask": mask, "labels": labels}


def lm_example(prompt: str, answer: str | None) -> tuple[list[int], list[int]]:
    """Token ids and labels of one LLaVA example: ``[BOS] <image>*16 prompt [SEP] answer [EOS]``;
    labels are -100 except on the answer and [EOS]. With ``answer=None`` only the prompt part
    (ending in [SEP]) is returned, for generation."""
    vocab = vocab_index()
    head = [vocab["[BOS]"]] + [vocab["<image>"]] * N_IMAGE_TOKENS + [vocab[w] for w in prompt.split()] + [vocab["[SEP]"]]
    if answer is None:
        return head, [-100] * len(head)
    tail = [vocab[w] for w in answer.split()] + [vocab["[EOS]"]]
    return head + tail, [-100] * len(head) + tail


#: share of captioning, math VQA and general VQA examples in a training batch
TASK_MIX: tuple[float, float, float] = (0.2, 0.4, 0.4)
#: task mix of the LLaVA's second (VQA) stage: caption, math, general
VQA_STAGE_MIX: tuple[float, float, float] = (0.05, 0.25, 0.7)


def llava_batch(
    scenes: Sequence[Any], rng: random.Random, mix: tuple[float, float, float] = TASK_MIX
) -> dict[str, torch.Tensor]:
    """A training batch mixing captioning, math VQA and general VQA (shares ``mix``)."""
    pad = vocab_index()["[PAD]"]
    ids, labels = [], []
    for scene in scenes:
        task = rng.choices(range(3), weights=mix)[0]
        if task == 0:
            prompt, answer = "caption", scene.caption()
        else:
            q, answer = vqa(scene, "math" if task == 1 else "general", rng)
            prompt = f"question {q}"
        x, y = lm_example(prompt, answer)
        ids.append(x)
        labels.append(y)
    input_ids, mask = _pad_right(ids, pad)
    label_t, _ = _pad_right(labels, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t, "pixel_values": pixel_values(scenes)}


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over each example's labelled tokens, then over examples.

    transformers' default averages over all labelled tokens of the batch, so a 17-word caption
    outweighs a one-word answer 17 to 1; here every example weighs the same.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(dim=1).clamp(min=1)
    return (tokens.sum(dim=1) / counts).mean()


def train_llava(
    out: Path,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    clip_dir: Path | None = None,
    mix: tuple[float, float, float] = TASK_MIX,
    vqa_steps: int = 2000,
    vqa_mix: tuple[float, float, float] = VQA_STAGE_MIX,
    vqa_lr: float = 1e-3,
    stage1_dir: Path | None = None,
    num_layers: int = 4,
) -> dict[str, Any]:
    """Train the testbed LLaVA (``num_layers`` decoder layers); returns the log.

    Stage 1 (``steps``): vision tower initialised from the testbed CLIP, the task ``mix``. Stage 2
    (``vqa_steps``, 0 to skip): the same recipe on a VQA-general-heavy mix (``vqa_mix``), which
    lifts the retrieval-type questions ("where is", "is there") that stage 1 leaves at 50-60%.
    ``stage1_dir``: start from a stage-1 checkpoint instead of training stage 1.
    """
    from transformers import CLIPModel, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    rng = random.Random(seed)
    log: dict[str, Any] = {
        "model": "llava", "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "task_mix": list(mix), "loss_average": "per example", "num_layers": num_layers,
    }

    def loss_of(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        def loss(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            labels = inputs.pop("labels")
            return per_example_loss(model(**inputs).logits, labels)

        return loss

    if stage1_dir is not None:
        model = LlavaForConditionalGeneration.from_pretrained(stage1_dir, local_files_only=True)
        previous = json.loads((Path(stage1_dir) / "train_log.json").read_text())
        log.update({k: previous[k] for k in ("steps", "lr", "task_mix", "loss", "train_seconds") if k in previous})
        log["stage1_from"] = "checkpoint"
    else:
        clip = CLIPModel.from_pretrained(clip_dir or CHECKPOINTS / "clip", local_files_only=True)
        model = LlavaForConditionalGeneration(llava_config(clip.config.vision_config, num_layers=num_layers))
        missing = model.model.vision_tower.load_state_dict(clip.vision_model.state_dict(), strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"CLIP vision weights do not fit the LLaVA tower: {missing.unexpected_keys[:3]}")
        del clip

        def batch(step: int) -> dict[str, torch.Tensor]:
            return llava_batch(make_scenes("train", batch_size, seed=seed * 1_000_003 + 500_000 + step), rng, mix)

        _fit(model, batch, log, loss_of(model))
    if vqa_steps > 0:
        stage = {"steps": vqa_steps, "lr": vqa_lr, "task_mix": list(vqa_mix), "model": "llava stage 2"}
        rng2 = random.Random(seed + 7)

        def batch2(step: int) -> dict[str, torch.Tensor]:
            return llava_batch(make_scenes("train", batch_size, seed=seed * 1_000_003 + 777_000 + step), rng2, vqa_mix)

        _fit(model, batch2, stage, loss_of(model))
        log["vqa_stage"] = stage
        log["train_seconds"] = round(log.get("train_seconds", 0.0) + stage["train_seconds"], 1)
    return _save(model, out, log)


def _fit_and_save(
    model: torch.nn.Module,
    batch: Callable[[int], dict[str, torch.Tensor]],
    out: Path,
    log: dict[str, Any],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """:func:`_fit`, then :func:`_save`."""
    _fit(model, batch, log, loss_fn)
    return _save(model, out, log)


def _fit(
    model: torch.nn.Module,
    batch: Callable[[int], dict[str, torch.Tensor]],
    log: dict[str, Any],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> None:
    """AdamW (weight decay 0.05) with 5% linear warm-up + cosine schedule and gradient clipping on
    ``batch(step)`` for ``log["steps"]`` steps at peak ``log["lr"]``; the loss is
    ``loss_fn(batch)`` or the model output's ``.loss``. Fills ``log["loss"]`` and
    ``log["train_seconds"]``."""
    steps, lr = log["steps"], log["lr"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    log["loss"] = []
    start = time.time()
    model.train()
    for step in tqdm(range(steps), desc=f"train {log['model']}"):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, steps // 20, lr)
        inputs = batch(step)
        loss = loss_fn(inputs) if loss_fn is not None else model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            value = float(loss.detach())
            log["loss"].append([step, round(value, 4)])
            logger.info("step %d loss %.4f", step, value)
    log["train_seconds"] = round(time.time() - start, 1)
    model.eval()


def _save(model: torch.nn.Module, out: Path, log: dict[str, Any]) -> dict[str, Any]:
    """Save the model, the tokenizer and the training log to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)  # type: ignore[attr-defined]
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def tune_cpu_runtime(threads: int = 1) -> None:
    """Settings that make small-model training several times faster on small shared CPUs:
    few intra-op threads (OpenMP spinning costs more than it gains at these sizes) and a glibc
    heap that keeps freed memory instead of returning every large block to the OS (page faults
    dominated each step otherwise)."""
    torch.set_num_threads(threads)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 4 * 1024 * 1024 * 1024 - 1)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 256 * 1024 * 1024)  # M_TOP_PAD
    except (OSError, AttributeError):  # not glibc
        pass


def train_blip(out: Path, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """Train the testbed BLIP captioner on scene captions; returns the training log."""
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(blip_config())
    log = {"model": "blip", "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}

    def batch(step: int) -> dict[str, torch.Tensor]:
        return blip_batch(make_scenes("train", batch_size, seed=seed * 1_000_003 + 700_000 + step))

    return _fit_and_save(model, batch, out, log)


def train_clip(out: Path, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> dict[str, Any]:
    """Train the testbed CLIP contrastively; returns the training log."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = CLIPModel(clip_config())
    log = {"model": "clip", "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}

    def batch(step: int) -> dict[str, torch.Tensor]:
        scenes = make_scenes("train", batch_size, seed=seed * 1_000_003 + step)
        texts = tok([s.caption() for s in scenes], padding=True, return_tensors="pt")  # type: ignore[operator]
        return {
            "input_ids": texts.input_ids, "attention_mask": texts.attention_mask,
            "pixel_values": pixel_values(scenes), "return_loss": True,
        }

    return _fit_and_save(model, batch, out, log)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["clip", "llava", "llava-deep", "blip"],
                        help="llava-deep: the LLaVA recipe with an 8-layer decoder (for depth pruning)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="intra-op threads (default: 2 where there are 2 cores; 1.6x faster than 1 for the LLaVA)")
    parser.add_argument("--mix", type=float, nargs=3, default=None, metavar=("CAPTION", "MATH", "GENERAL"),
                        help="llava: shares of the three tasks in a batch (default %s)" % (TASK_MIX,))
    parser.add_argument("--vqa-steps", type=int, default=None, help="llava: steps of the VQA stage (0 skips it)")
    parser.add_argument("--stage1", default=None,
                        help="llava: directory of a stage-1 checkpoint to start the VQA stage from")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    parser_threads = args.threads
    tune_cpu_runtime(parser_threads)
    out = Path(args.out) if args.out else CHECKPOINTS / args.model
    kwargs: dict[str, Any] = {"steps": args.steps} if args.steps else {}
    if args.mix is not None:
        if args.model not in ("llava", "llava-deep"):
            parser.error("--mix applies to llava only")
        kwargs["mix"] = tuple(args.mix)
    llava = args.model in ("llava", "llava-deep")
    if args.model == "llava-deep":
        kwargs["num_layers"] = DEEP_LAYERS
    if not llava and (args.vqa_steps is not None or args.stage1):
        parser.error("--vqa-steps / --stage1 apply to llava only")
    if args.vqa_steps is not None:
        kwargs["vqa_steps"] = args.vqa_steps
    if args.stage1:
        kwargs["stage1_dir"] = Path(args.stage1)
    trainer = {"clip": train_clip, "llava": train_llava, "llava-deep": train_llava, "blip": train_blip}[args.model]
    log = trainer(out, seed=args.seed, **kwargs)
    sys.stdout.write(f"trained {args.model} in {log['train_seconds']} s; final loss {log['loss'][-1][1]}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
