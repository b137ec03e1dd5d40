"""NNI 3.0's ``TransformersEvaluator``, mended for transformers 5.x.

NNI's own evaluator fails with transformers 5 in three places (NNI 3.0, transformers 5.24):

* training pruners: ``AssertionError`` at ``assert optimizer is not None`` in its
  ``custom_on_train_begin`` callback: transformers 5's ``Trainer`` always has a ``deepspeed``
  attribute (``None`` without DeepSpeed), which NNI takes for the optimizer;
* a ``Trainer`` built without an ``nni.trace``d optimizer: ``TypeError: ...patched_get_optimizer_cls_and_kwargs()
  takes 1 positional argument but 3 were given`` (transformers 5 passes ``(args, model)``), and NNI
  leaves ``Trainer.get_optimizer_cls_and_kwargs`` patched for the whole process;
* ``patch_loss`` (NNI's ``MovementPruner``): transformers 5 calls ``compute_loss`` with
  ``num_items_in_batch``, which NNI's patch does not accept.

:class:`PatchedTransformersEvaluator` patches the optimizer that the ``Trainer`` really steps,
with a callback of its own (NNI mutates one shared callback class), passes extra ``compute_loss``
arguments through, and asks for a traced optimizer up front instead of patching transformers.
Note that ``transformers.TrainingArguments`` itself needs ``accelerate>=1.1.0`` installed.

Example:
    >>> trainer = nni.trace(Trainer)(model=model, args=args, train_dataset=data,
    ...     optimizers=(nni.trace(torch.optim.AdamW)(model.parameters(), lr=1e-4), None))  # doctest: +SKIP
    >>> evaluator = PatchedTransformersEvaluator(trainer)  # doctest: +SKIP
    >>> PlatonPruner(model, config_list, evaluator, warmup_step=10, cooldown_begin_step=80)  # doctest: +SKIP
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from nni.common import is_traceable
from nni.compression.utils.evaluator import TransformersEvaluator

from vlprune.errors import VLPruneError

__all__ = ["PatchedTransformersEvaluator"]


class PatchedTransformersEvaluator(TransformersEvaluator):
    """NNI's ``TransformersEvaluator`` that works with transformers 5.x (see the module docstring).

    Args:
        trainer: ``nni.trace(transformers.Trainer)(..., optimizers=(nni.trace(Optimizer)(...), scheduler))``.
        dummy_input: as NNI's.

    Raises:
        VLPruneError: the trainer is not ``nni.trace``d, or its optimizer is missing / not traced.
    """

    def __init__(self, trainer: Any, dummy_input: Any | None = None) -> None:
        if not is_traceable(trainer):
            raise VLPruneError("wrap the Trainer class with nni.trace: nni.trace(transformers.Trainer)(model=..., ...)")
        optimizer = getattr(trainer, "optimizer", None)
        if optimizer is None or not is_traceable(optimizer):
            raise VLPruneError(
                "give the Trainer an nni.trace'd optimizer: optimizers=(nni.trace(torch.optim.AdamW)(model.parameters(), "
                "lr=...), None); NNI's fallback to the Trainer's default optimizer breaks on transformers 5"
            )
        super().__init__(trainer, dummy_input)
        self._vlprune_callback: Any = None

    def patch_optimizer_step(self, before_step_tasks: list[Callable], after_step_tasks: list[Callable]) -> None:
        from transformers import TrainerCallback

        evaluator = self

        class _PatchStep(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                trainer = evaluator.trainer
                optimizer = getattr(trainer, "deepspeed", None) or trainer.optimizer or kwargs.get("optimizer")
                if optimizer is None:
                    raise VLPruneError("the Trainer has no optimizer at on_train_begin; cannot drive the pruner")
                old_step = optimizer.step

                def patched_step(_: Any, *a: Any, **k: Any) -> Any:
                    for task in before_step_tasks:
                        task()
                    output = old_step(*a, **k)
                    for task in after_step_tasks:
                        task()
                    return output

                optimizer.step = types.MethodType(patched_step, optimizer)

        self._vlprune_callback = _PatchStep()
        self.trainer.add_callback(self._vlprune_callback)

    def patch_loss(self, patch: Callable[[Any, Any], Any]) -> None:
        old_compute_loss = self.trainer.compute_loss

        def patched_compute_loss(_: Any, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
            result = old_compute_loss(model, inputs, return_outputs, **kwargs)
            if return_outputs:
                return patch(result[0], inputs), result[1]
            return patch(result, inputs)

        self.trainer.compute_loss = types.MethodType(patched_compute_loss, self.trainer)

    def unbind_model(self) -> None:
        if self.model is not None and self._vlprune_callback is not None:
            self.trainer.remove_callback(self._vlprune_callback)
            self._vlprune_callback = None
        super().unbind_model()
