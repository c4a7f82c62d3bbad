"""The loss and metrics against the chapter's own three definitions (the benchmark's seed) as the reference."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.seed import bbox_eval as chapter_bbox_eval
from benchmarks.seed import calc_loss as chapter_calc_loss
from benchmarks.seed import cls_eval as chapter_cls_eval
from ssd.core.anchors import multibox_prior, multibox_target
from ssd.core.loss import bbox_eval, calc_loss, cls_eval


def make_batch(seed: int, batch: int = 3, num_classes: int = 1):
    """Predictions and targets as training produces them: random predictions, real multibox_target labels."""
    g = torch.Generator().manual_seed(seed)
    anchors = multibox_prior(torch.zeros(4, 4), [0.75, 0.5, 0.25], [1, 2, 0.5])
    num_anchors = anchors.shape[1]
    lo = torch.rand(batch, 2, 2, generator=g) * 0.5
    boxes = torch.cat([lo, lo + 0.1 + torch.rand(batch, 2, 2, generator=g) * 0.4], dim=2)
    cls = torch.randint(0, num_classes, (batch, 2, 1), generator=g).float()
    labels = torch.cat([cls, boxes], dim=2)
    labels[0, 1] = -1  # one padding row
    bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, labels)
    cls_preds = torch.randn(batch, num_anchors, num_classes + 1, generator=g)
    bbox_preds = torch.randn(batch, num_anchors * 4, generator=g)
    return cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks


class TestCalcLoss:
    @pytest.mark.parametrize("seed", range(4))
    @pytest.mark.parametrize("num_classes", [1, 3])
    def test_matches_chapter(self, seed, num_classes):
        args = make_batch(seed, num_classes=num_classes)
        ours = calc_loss(*args)
        assert ours.shape == (3,)
        torch.testing.assert_close(ours, chapter_calc_loss(*args), rtol=1e-6, atol=1e-6)

    def test_hand_computed(self):
        # Uniform logits over 2 classes: cross entropy log(2) per anchor; one masked offset off by 2 of 8 values.
        cls_preds, cls_labels = torch.zeros(1, 2, 2), torch.tensor([[0, 1]])
        bbox_preds = torch.tensor([[2.0, 0, 0, 0, 5, 5, 5, 5]])
        bbox_labels, bbox_masks = torch.zeros(1, 8), torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]])
        loss = calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
        torch.testing.assert_close(loss, torch.tensor([torch.log(torch.tensor(2.0)) + 2 / 8]))

    def test_low_precision_predictions_give_float32_loss(self):
        cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks = make_batch(0)
        loss = calc_loss(cls_preds.bfloat16(), cls_labels, bbox_preds.bfloat16(), bbox_labels, bbox_masks)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, chapter_calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks),
                                   rtol=2e-2, atol=2e-2)

    def test_gradient_matches_chapter(self):
        cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks = make_batch(1)
        grads = []
        for fn in (calc_loss, chapter_calc_loss):
            c, b = cls_preds.clone().requires_grad_(), bbox_preds.clone().requires_grad_()
            fn(c, cls_labels, b, bbox_labels, bbox_masks).mean().backward()
            grads.append((c.grad, b.grad))
        for o, r in zip(*grads):
            torch.testing.assert_close(o, r)


class TestMetrics:
    @pytest.mark.parametrize("seed", range(4))
    def test_cls_eval_matches_chapter(self, seed):
        cls_preds, cls_labels, *_ = make_batch(seed, num_classes=2)
        ours = cls_eval(cls_preds, cls_labels)
        assert ours.dim() == 0  # a tensor, so a loop can sum on the device
        assert float(ours) == chapter_cls_eval(cls_preds, cls_labels)

    @pytest.mark.parametrize("seed", range(4))
    def test_bbox_eval_matches_chapter(self, seed):
        _, _, bbox_preds, bbox_labels, bbox_masks = make_batch(seed)
        ours = bbox_eval(bbox_preds, bbox_labels, bbox_masks)
        assert ours.dim() == 0
        assert float(ours) == pytest.approx(chapter_bbox_eval(bbox_preds, bbox_labels, bbox_masks), rel=1e-6)

    def test_hand_computed(self):
        cls_preds = torch.tensor([[[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]])  # argmax 0, 1, 0
        assert int(cls_eval(cls_preds, torch.tensor([[0, 1, 1]]))) == 2
        err = bbox_eval(torch.tensor([[1.0, -1.0, 3.0, 0.0]]), torch.zeros(1, 4), torch.tensor([[1.0, 1.0, 0.0, 1.0]]))
        assert float(err) == 2.0


# --- No host sync per training step ----------------------------------------------------------------

class HostSyncs(TorchDispatchMode):
    """Counts what would stall a GPU on the host in a training step, observable on a CPU too:
    reading a value (``.item()``, ``float(t)``, ``bool(t)``: ``_local_scalar_dense``), data-dependent
    shapes (``nonzero``, ``masked_select``: a boolean-mask index), a tensor made from host data
    (``torch.tensor(...)`` and Python scalars assigned through index tensors: ``lift_fresh``, a
    host-to-device copy), and ``.tolist()``/``.numpy()``."""

    SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.lift_fresh")

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if str(func).rsplit(".", 1)[0] in self.SYNC_OPS:  # "aten.nonzero.default" -> "aten.nonzero"
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_syncs(monkeypatch):
    counter = HostSyncs()
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counter.calls.append(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


def _training_step(precision: str):
    """``ssd.engine.step.train_step`` on a 64x64 batch, added up as an epoch does; returns a closure
    running one step, and the running metric sums."""
    from ssd.core.model import TinySSD
    from ssd.engine.precision import AUTOCAST_DTYPES
    from ssd.engine.step import Tally, train_step

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    labels = torch.tensor([[[0, 0.1, 0.1, 0.5, 0.6]], [[0, 0.3, 0.2, 0.9, 0.7]]])
    model = TinySSD(1, image_size=64).to(memory_format=torch.channels_last).train()
    # Fused SGD takes GradScaler's inf check on the device; unfused, `scaler.step` reads it (a sync).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=5e-4, fused=precision == "fp16")
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    tally = Tally(torch.device("cpu"))

    def step() -> None:
        loss, stats = train_step(model, optimizer, scaler, images, labels, autocast_dtype=AUTOCAST_DTYPES[precision],
                                 channels_last=True)
        tally.add(1, loss, stats)

    return step, tally.sums


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_training_step_has_no_host_sync(host_syncs, precision):
    step, totals = _training_step(precision)
    step()  # warm-up: first calls may set things up
    with host_syncs:
        step()
        step()
    assert host_syncs.calls == []
    assert totals[1] == 6 and torch.isfinite(totals).all()  # the counts still add up (3 steps x 2 images)


def test_the_counter_sees_a_sync(host_syncs):
    """The counter is not blind: the pre-fix per-step count (a host tensor copied in) is caught."""
    with host_syncs:
        torch.tensor(float(2), dtype=torch.float64)
        torch.ones(2).sum().item()
        torch.zeros(3)[torch.tensor([True, False, True])]
        torch.ones(2).tolist()
    assert len(host_syncs.calls) >= 4
