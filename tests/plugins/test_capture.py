"""Activation capture: selection, output kinds, masks, hook and mode hygiene."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from vlprune import DataError, ModelStructureError
from vlprune.plugins.capture import ActivationCapture, ChannelMean, StoreRows, capture, first_tensor, represent, resolve_modules


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.b(self.drop(torch.relu(self.a(x))))


class _TupleOut(nn.Module):
    def forward(self, x: torch.Tensor):
        return (x * 2, None)


class _ModelOutputOut(nn.Module):
    def forward(self, x: torch.Tensor):
        return BaseModelOutput(last_hidden_state=x + 1)


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t = _TupleOut()
        self.m = _ModelOutputOut()

    def forward(self, x):
        return self.m(self.t(x)[0])


def test_resolve_by_name_pattern_type_and_default() -> None:
    model = _Toy()
    assert resolve_modules(model) == ["a", "b"]
    assert resolve_modules(model, "b") == ["b"]
    assert resolve_modules(model, "[ab]") == ["a", "b"]
    assert resolve_modules(model, nn.Dropout) == ["drop"]
    assert resolve_modules(model, ["b", nn.Dropout]) == ["b", "drop"]
    with pytest.raises(ModelStructureError, match="matches no module"):
        resolve_modules(model, "c*")


def test_tuple_and_model_output_are_unwrapped() -> None:
    assert first_tensor((None, torch.ones(1))).item() == 1
    x = torch.randn(2, 3, 4)
    got = capture(_Wrapper(), [x], ["t", "m"], lambda n: StoreRows("flatten"), progress=False)
    torch.testing.assert_close(got["t"], (x * 2).flatten(1))
    torch.testing.assert_close(got["m"], (x * 2 + 1).flatten(1))


def test_mask_applies_only_to_matching_shapes() -> None:
    out = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(represent(out, "mean", mask), torch.stack([out[0, :2].mean(0), out[1, :1].mean(0)]))
    assert represent(out, "tokens", mask).shape == (3, 2)
    flat = represent(out, "flatten", mask)
    assert flat[0, 4:].abs().sum() == 0 and flat[1, 2:].abs().sum() == 0
    other = torch.tensor([[1, 0], [1, 0]])  # a different sequence length: not applied
    assert represent(out, "tokens", other).shape == (6, 2)


def test_channel_mean_streams_over_batches() -> None:
    model = _Toy()
    xs = [torch.randn(5, 4) for _ in range(3)]
    got = capture(model, xs, ["a"], lambda n: ChannelMean(), progress=False)["a"]
    with torch.no_grad():
        expected = torch.cat([model.a(x) for x in xs]).double().mean(0)
    torch.testing.assert_close(got, expected)


def test_store_rows_caps_and_pads() -> None:
    r = StoreRows("flatten", n_samples=5)
    r.update(torch.ones(3, 2, 2), None)
    r.update(torch.ones(4, 3, 2), None)
    out = r.result()
    assert out.shape == (5, 6) and r.full
    assert out[:3, 4:].abs().sum() == 0


def test_hooks_removed_and_mode_restored_on_error() -> None:
    model = _Toy().train()
    model.drop.eval()  # a mixed-mode model must come back mixed

    class Boom(Exception):
        pass

    class Exploding:
        def update(self, output, mask):
            raise Boom

        def result(self):
            return None

    from vlprune.errors import DataError

    with pytest.raises(DataError) as info:  # a failing forward (hooks included) is reported with the batch
        capture(model, [torch.randn(2, 4)], ["a"], lambda n: Exploding(), progress=False)
    assert isinstance(info.value.__cause__, Boom)
    assert not any(m._forward_hooks for m in model.modules())
    assert model.training and model.a.training and not model.drop.training


def test_runs_in_eval_without_grad_and_stops_early() -> None:
    model = _Toy().train()
    seen = []

    class Spy:
        def update(self, output, mask):
            seen.append((model.training, output.requires_grad))

        def result(self):
            return None

    with ActivationCapture(model, ["a"], lambda n: Spy()) as cap:
        n = cap.run([torch.randn(2, 4)] * 5, progress=False, stop_when=lambda: len(seen) >= 2)
    assert seen == [(False, False), (False, False)] and n == 4
    assert model.training


def test_a_failing_forward_is_a_data_error_naming_what_the_model_takes() -> None:
    from vlprune.errors import DataError
    from vlprune.plugins.capture import call_model
    from vlprune.testbed.tiny import tiny_model

    model = tiny_model("vit")
    with pytest.raises(DataError, match=r"takes no 'pixels'; it takes pixel_values") as info:
        call_model(model, {"pixels": torch.zeros(1, 3, 32, 32)})
    assert "pixels: float32(1, 3, 32, 32)" in str(info.value) and info.value.__cause__ is not None


class _Convs(nn.Module):
    """A 2-D and a 1-D convolution, and a channels-last linear on an image (Swin / ConvNeXt style)."""

    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(3, 5, 3, padding=1)
        self.c1 = nn.Conv1d(5, 4, 3)
        self.lin = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.c2(x)                                   # (B, 5, H, W)
        z = self.c1(y.flatten(2))                         # (B, 4, H*W - 2)
        return self.lin(y.permute(0, 2, 3, 1)).sum() + z.sum()  # lin: (B, H, W, 6)


def test_convolution_outputs_reduce_over_positions_with_channels_as_features() -> None:
    torch.manual_seed(0)
    model = _Convs().eval()
    x = torch.randn(4, 3, 6, 7)
    # a padding mask whose shape equals (B, H) and (B, C): it must not touch image positions
    batch = {"x": x, "attention_mask": torch.tensor([[1, 1, 0, 0, 0, 0]] * 4)}
    with torch.no_grad():
        y = model.c2(x)
        z = model.c1(y.flatten(2))
        w = model.lin(y.permute(0, 2, 3, 1))
    # independent reference: positions (H*W, or L) as tokens, channels as features
    want = {
        "mean": {"c2": y.mean(dim=(2, 3)), "c1": z.mean(dim=2), "lin": w.mean(dim=(1, 2))},
        "cls": {"c2": y[:, :, 0, 0], "c1": z[:, :, 0], "lin": w[:, 0, 0]},
        "tokens": {"c2": y.permute(0, 2, 3, 1).reshape(-1, 5), "c1": z.transpose(1, 2).reshape(-1, 4),
                   "lin": w.reshape(-1, 6)},
    }
    for rep, expected in want.items():
        got = capture(model, [batch], ["c2", "c1", "lin"], lambda n, rep=rep: StoreRows(rep), progress=False)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, msg=f"{rep} {name}")
    assert want["mean"]["c2"].shape == (4, 5) and want["tokens"]["c2"].shape == (4 * 6 * 7, 5)
    flat = capture(model, [batch], ["c2"], lambda n: StoreRows("flatten"), progress=False)["c2"]
    assert flat.shape == (4, 5 * 6 * 7)  # the whole output per sample (channels-last order)
    torch.testing.assert_close(flat.sort(dim=1).values, y.flatten(1).sort(dim=1).values)
    means = capture(model, [batch], ["c2", "c1"], lambda n: ChannelMean(), progress=False)
    torch.testing.assert_close(means["c2"].float(), y.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(means["c1"].float(), z.mean(dim=(0, 2)))


# ------------------------------------------------------------------ cut forwards
class _Routed(nn.Module):
    """``a`` then ``b`` (and then an expensive ``tail``), except that a batch with a negative
    first value runs ``b`` first: the order of the hooked calls depends on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.tail = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x)) if float(x[0, 0]) >= 0 else self.a(self.b(x))
        return self.tail(h)


def _tail_calls(model: nn.Module, tail: str) -> list[int]:
    calls = [0]
    model.get_submodule(tail).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cut_forwards_skip_what_follows_the_last_hooked_module() -> None:
    torch.manual_seed(0)
    model = _Routed()
    batches = [torch.randn(5, 4).abs() for _ in range(4)]
    tail = _tail_calls(model, "tail")
    whole = capture(model, batches, ["a", "b"], lambda n: StoreRows("flatten"), progress=False)
    assert tail[0] == 4
    tail[0] = 0
    with ActivationCapture(model, ["a", "b"], lambda n: StoreRows("flatten")) as cap:
        cap.run(batches[:1], progress=False, cut=True)  # the first whole forward: the plan
        cap.run(batches[1:], progress=False, cut=True)
        cut = cap.results()
    assert tail[0] == 1  # only the first batch ran whole
    assert all(torch.equal(cut[n], whole[n]) for n in ("a", "b"))


def test_a_batch_that_strays_from_the_first_order_runs_whole() -> None:
    torch.manual_seed(0)
    model = _Routed()
    batches = [torch.randn(5, 4).abs() for _ in range(3)]
    batches[1][0, 0] = -1.0  # b before a: not the plan's order
    tail = _tail_calls(model, "tail")
    whole = capture(model, batches, ["a", "b"], lambda n: StoreRows("flatten"), progress=False)
    tail[0] = 0
    with ActivationCapture(model, ["a", "b"], lambda n: StoreRows("flatten")) as cap:
        cap.run(batches, progress=False, cut=True)
        cut = cap.results()
    assert tail[0] == 2  # the first batch and the stray one
    assert all(torch.equal(cut[n], whole[n]) for n in ("a", "b"))


class _Shared(nn.Module):
    """One hooked module called twice per forward, inside model code that catches Exception."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(3, 3)
        self.tail = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            h = self.block(torch.tanh(self.block(x)))
        except Exception:  # model code like this must not swallow the cut
            h = x
        return self.tail(h)


def test_a_module_called_twice_is_cut_after_its_second_call() -> None:
    torch.manual_seed(0)
    model = _Shared()
    batches = [torch.randn(4, 3) for _ in range(3)]
    tail = _tail_calls(model, "tail")
    whole = capture(model, batches, ["block"], lambda n: StoreRows("flatten"), progress=False)
    tail[0] = 0
    with ActivationCapture(model, ["block"], lambda n: StoreRows("flatten")) as cap:
        cap.run(batches, progress=False, cut=True)
        cut = cap.results()["block"]
    assert tail[0] == 1 and cut.shape == (24, 3)  # two calls per batch, the tail once
    assert torch.equal(cut, whole["block"])


def test_cut_needs_no_grad() -> None:
    from vlprune import VLPruneError

    with ActivationCapture(_Toy(), ["a"], lambda n: ChannelMean()) as cap:
        with pytest.raises(VLPruneError, match="grad=False"):
            cap.run([torch.randn(2, 4)], grad=True, cut=True)


@pytest.mark.parametrize("representation", ["flatten", "cls", "mean", "tokens"])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_outputs_are_stored_as_through_float32(representation: str, storage: torch.dtype) -> None:
    """bf16 rows go to the store in their own dtype (no float32 temporary) and come out as the
    float32 representation, rounded to the storage dtype, would."""
    torch.manual_seed(0)
    outputs = [torch.randn(3, 5, 4).bfloat16() for _ in range(2)]
    masks = [torch.ones(3, 5), torch.ones(3, 5)]
    masks[1][1, 3:] = 0
    store = StoreRows(representation, dtype=storage)
    for out, mask in zip(outputs, masks):
        store.update(out, mask)
    expected = torch.cat([represent(o.float(), representation, m) for o, m in zip(outputs, masks)]).to(storage).float()
    assert torch.equal(store.result(), expected)
    nan = outputs[0].clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or Inf"):
        StoreRows(representation).update(nan, None)


def test_a_model_dispatched_by_accelerate_runs_whole() -> None:
    """accelerate's hooks move offloaded weights back after a module's forward, which a cut
    would skip: such a model (its modules carry ``_hf_hook``) is never cut."""
    torch.manual_seed(0)
    model = _Routed()
    model.tail._hf_hook = object()  # what accelerate's dispatch_model / device_map leave on modules
    tail = _tail_calls(model, "tail")
    with ActivationCapture(model, ["a", "b"], lambda n: StoreRows("flatten")) as cap:
        cap.run([torch.randn(5, 4).abs() for _ in range(3)], progress=False, cut=True)
    assert tail[0] == 3


def test_an_offloaded_model_is_fed_on_its_execution_device_and_runs_whole() -> None:
    """accelerate's cpu_offload leaves the parameters on ``meta``: the batches go to the
    execution device (they went to ``meta`` before, and the forward failed), and no forward is cut."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = _Routed()
    batches = [torch.randn(5, 4).abs() for _ in range(3)]
    whole = capture(model, batches, ["a", "b"], lambda n: StoreRows("flatten"), progress=False)
    accelerate.cpu_offload(model, execution_device="cpu")
    tail = _tail_calls(model, "tail")
    with ActivationCapture(model, ["a", "b"], lambda n: StoreRows("flatten")) as cap:
        cap.run(batches, progress=False, cut=True)
        got = cap.results()
    assert all(torch.equal(got[n], whole[n]) for n in ("a", "b"))
    assert tail[0] == 3 and model.tail.weight.device.type == "meta"  # whole forwards, offloaded again
