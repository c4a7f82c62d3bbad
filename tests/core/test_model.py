"""TinySSD: output shapes, layout independence, gradients, the chapter's state dict, model files."""
from dataclasses import asdict

import d2l.torch as d2l
import pytest
import torch
from torch import nn

from ssd.core.anchors import multibox_target
from ssd.core.loss import calc_loss
from benchmarks.seed import TinySSD as ChapterTinySSD  # the chapter's network, as the book prints it
from ssd.core.model import (SEED_RATIOS, SEED_SIZES, GlobalMaxPool, SSDConfig, TinySSD, load_model, save_model,
                       unwrap)

# Anchors per input size with the seed's 4 anchors per pixel: feature maps S/8, S/16, S/32, S/64, 1x1.
NUM_ANCHORS = {(256, 256): 4 * (32 * 32 + 16 * 16 + 8 * 8 + 4 * 4 + 1),   # 5444, the chapter's number
               (128, 128): 4 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1),   # 1364
               (320, 256): 4 * (40 * 32 + 20 * 16 + 10 * 8 + 5 * 4 + 1),  # 6804
               (64, 64): 4 * (8 * 8 + 4 * 4 + 2 * 2 + 1 * 1 + 1)}      # 344


def images(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Float images 0..255 as the pipeline feeds them."""
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.fixture(scope="module")
def net() -> TinySSD:
    torch.manual_seed(0)
    return TinySSD(num_classes=1).eval()


class TestShapes:
    def test_chapter_batch_of_32(self, net):
        with torch.no_grad():
            anchors, cls_preds, bbox_preds = net(images(32, 256, 256))
        assert anchors.shape == (1, 5444, 4)
        assert cls_preds.shape == (32, 5444, 2)
        assert bbox_preds.shape == (32, 21776)
        assert anchors.dtype == torch.float32

    @pytest.mark.parametrize("h, w", [(128, 128), (320, 256), (64, 64)])
    def test_other_input_sizes(self, net, h, w):
        with torch.no_grad():
            anchors, cls_preds, bbox_preds = net(images(1, h, w))
        a = NUM_ANCHORS[(h, w)]
        assert anchors.shape == (1, a, 4) and cls_preds.shape == (1, a, 2) and bbox_preds.shape == (1, a * 4)

    def test_anchor_cache_follows_input_size(self, net):
        with torch.no_grad():
            small = net(images(1, 64, 64))[0]
            big = net(images(1, 128, 128))[0]
            again = net(images(1, 64, 64))[0]
        assert small.shape[1] == NUM_ANCHORS[(64, 64)] and big.shape[1] == NUM_ANCHORS[(128, 128)]
        assert torch.equal(small, again)

    def test_anchors_are_a_buffer_made_once_outside_the_state_dict(self, net):
        assert "anchors" in dict(net.named_buffers()) and "anchors" not in net.state_dict()
        with torch.no_grad():
            anchors = net(images(1, 256, 256))[0]
        assert anchors is net.anchors  # the image_size input: the buffer itself, nothing rebuilt
        ref = torch.cat([d2l.multibox_prior(torch.zeros(1, 1, s, s), SEED_SIZES[i], SEED_RATIOS)
                         for i, s in enumerate([32, 16, 8, 4, 1])], dim=1)
        assert torch.equal(anchors, ref)

    def test_forward_changes_no_module_state(self, net):
        before = {k: v.clone() for k, v in net.state_dict().items()}
        buffers, attrs = dict(net.named_buffers()), dict(vars(net))
        with torch.no_grad():
            net(images(1, 128, 128))
        assert dict(net.named_buffers()).keys() == buffers.keys() and net.anchors is buffers["anchors"]
        assert vars(net).keys() == attrs.keys()
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

    @pytest.mark.parametrize("num_classes", [2, 5])
    def test_multiple_classes(self, num_classes):
        model = TinySSD(num_classes=num_classes).eval()
        with torch.no_grad():
            anchors, cls_preds, bbox_preds = model(images(2, 64, 64))
        assert cls_preds.shape == (2, NUM_ANCHORS[(64, 64)], num_classes + 1)
        assert model.config.classes == [f"class{i}" for i in range(num_classes)]

    def test_anchors_match_d2l_multibox_prior(self, net):
        with torch.no_grad():
            anchors = net(images(1, 128, 128))[0]
        maps = [16, 8, 4, 2, 1]
        ref = torch.cat([d2l.multibox_prior(torch.zeros(1, 1, s, s), SEED_SIZES[i], SEED_RATIOS)
                         for i, s in enumerate(maps)], dim=1)
        assert torch.equal(anchors, ref)


class TestLayoutAndGradients:
    def test_channels_last_matches_contiguous(self, net):
        x = images(2, 128, 128, seed=1)
        cl_net = TinySSD(num_classes=1).eval()
        cl_net.load_state_dict(net.state_dict())
        cl_net = cl_net.to(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = net(x)
            out = cl_net(x.contiguous(memory_format=torch.channels_last))
        assert torch.equal(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[2], ref[2], rtol=1e-4, atol=1e-4)

    def test_backward_gives_finite_grads_for_every_parameter(self):
        torch.manual_seed(0)
        model = TinySSD(num_classes=2).train()
        labels = torch.tensor([[[0, 0.1, 0.1, 0.5, 0.6], [1, 0.5, 0.4, 0.9, 0.9]],
                               [[1, 0.2, 0.3, 0.7, 0.8], [-1, -1, -1, -1, -1]]])
        anchors, cls_preds, bbox_preds = model(images(2, 64, 64))
        bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, labels)
        loss = calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks).mean()
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
        assert any(p.grad.abs().sum() > 0 for p in model.parameters())


class TestGlobalMaxPool:
    def test_same_outputs_and_gradients_as_adaptive_max_pool(self):
        x = torch.randn(4, 8, 5, 3, requires_grad=True)  # continuous values: no ties
        ref_x = x.detach().clone().requires_grad_()
        out, ref = GlobalMaxPool()(x), nn.AdaptiveMaxPool2d((1, 1))(ref_x)
        assert torch.equal(out, ref)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        assert torch.equal(x.grad, ref_x.grad)

    def test_channels_last_and_no_parameters(self):
        x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
        assert torch.equal(GlobalMaxPool()(x), nn.AdaptiveMaxPool2d((1, 1))(x))
        assert GlobalMaxPool().state_dict() == {} and nn.AdaptiveMaxPool2d((1, 1)).state_dict() == {}

    def test_deterministic_mode_accepts_the_model(self):
        """``train.deterministic`` turns on deterministic algorithms; the backward must not refuse."""
        model = TinySSD().train()
        torch.use_deterministic_algorithms(True)
        try:
            model(images(2, 64, 64))[1].sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)


class TestChapterStateDict:
    def test_chapter_weights_load_and_give_the_same_outputs(self):
        torch.manual_seed(1)
        chapter = ChapterTinySSD(num_classes=1).eval()
        ours = TinySSD(num_classes=1).eval()
        ours.load_state_dict(chapter.state_dict(), strict=True)
        assert list(ours.state_dict()) == list(chapter.state_dict())
        x = images(2, 128, 128, seed=2)
        with torch.no_grad():
            for o, r in zip(ours(x), chapter(x)):
                assert torch.equal(o, r)

    def test_our_weights_load_into_the_chapter_model(self, net):
        ChapterTinySSD(num_classes=1).load_state_dict(net.state_dict(), strict=True)


class TestModelFiles:
    def test_save_load_roundtrip(self, tmp_path):
        torch.manual_seed(2)
        model = TinySSD(num_classes=2, classes=["banana", "apple"]).eval()
        path = tmp_path / "sub" / "model.pt"
        save_model(model, path, epoch=3)
        loaded = load_model(path)
        assert not loaded.training
        assert loaded.config == model.config and loaded.config.classes == ["banana", "apple"]
        x = images(1, 64, 64)
        with torch.no_grad():
            for o, r in zip(loaded(x), model(x)):
                assert torch.equal(o, r)
        blob = torch.load(path, weights_only=True)  # plain tensors and builtins only
        assert blob["epoch"] == 3 and set(blob) == {"config", "model", "epoch"}
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]

    def test_save_unwraps_wrappers(self, tmp_path):
        class Wrapper(nn.Module):  # stands in for DDP's `.module` attribute
            def __init__(self, module):
                super().__init__()
                self.module = module

        model = TinySSD()
        assert unwrap(Wrapper(model)) is model
        save_model(Wrapper(model), tmp_path / "m.pt")
        assert list(torch.load(tmp_path / "m.pt", weights_only=True)["model"]) == list(model.state_dict())

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="model file not found: .*nope.pt"):
            load_model(tmp_path / "nope.pt")

    def test_garbage_file(self, tmp_path):
        path = tmp_path / "garbage.pt"
        path.write_bytes(b"this is not a torch file")
        with pytest.raises(ValueError, match="garbage.pt is not a TinySSD model file"):
            load_model(path)

    def test_foreign_torch_file(self, tmp_path):
        path = tmp_path / "weights.pt"
        torch.save(TinySSD().state_dict(), path)  # a bare state dict, no config
        with pytest.raises(ValueError, match=r"weights.pt is not a TinySSD model file \(no 'config'"):
            load_model(path)


class TestWidthAndFusion:
    def test_the_book_net_has_neither_and_its_files_load_as_before(self, tmp_path):
        assert SSDConfig().width == 1.0 and SSDConfig().fusion is False
        blob = {"config": {k: v for k, v in asdict(SSDConfig()).items() if k not in ("width", "fusion")},
                "model": TinySSD().state_dict()}  # a file written before the two knobs existed
        torch.save(blob, tmp_path / "old.pt")
        assert load_model(tmp_path / "old.pt").config == SSDConfig()

    def test_a_wider_fused_net_is_saved_with_its_config_and_rebuilt_from_it(self, tmp_path):
        torch.manual_seed(3)
        model = TinySSD(2, classes=["a", "b"], width=1.5, fusion=True, image_size=64).eval()
        keys = list(model.state_dict())
        assert any(k.startswith("top_down.") for k in keys) and model.blk_1[0].out_channels == 192
        save_model(model, tmp_path / "m.pt")
        loaded = load_model(tmp_path / "m.pt")
        assert loaded.config == model.config and loaded.config.width == 1.5 and loaded.config.fusion
        x = images(2, 64, 64)
        with torch.no_grad():
            for o, r in zip(loaded(x), model(x)):
                assert torch.equal(o, r)
            plain = TinySSD(2, classes=["a", "b"], width=1.5, image_size=64).eval()
            plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("top_down.")})
            assert not torch.equal(plain(x)[1], model(x)[1])  # the fusion changes what the heads see

    def test_fusion_passes_gradients_to_every_scale(self):
        model = TinySSD(1, fusion=True)
        _, cls_preds, bbox_preds = model(images(2, 64, 64))
        (cls_preds.sum() + bbox_preds.sum()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


class TestConfig:
    def test_defaults_are_the_seed(self):
        cfg = SSDConfig()
        assert cfg.sizes == SEED_SIZES and cfg.ratios == SEED_RATIOS and cfg.num_anchors == 4

    @pytest.mark.parametrize("kwargs, match", [
        ({"num_classes": 0, "classes": []}, "num_classes must be >= 1"),
        ({"sizes": [[0.2]] * 4}, "5 scales"),
        ({"sizes": [[0.2], [0.3, 0.4], [0.5], [0.6], [0.7]]}, "same number of sizes"),
        ({"num_classes": 2}, "1 class names for num_classes=2"),
        ({"width": 0.1}, "width must be in"),
        ({"fusion": "yes"}, "fusion a bool"),
    ])
    def test_invalid(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            SSDConfig(**kwargs)
