"""The SSD augmentation: boxes follow the pixels, padding stays padding, a seed fixes the result."""
import pytest
import torch

from ssd.core.augment import (crop, epoch_generator, hflip, mosaic, photometric_distort, photos_augment, random_crop,
                              random_hflip, ssd_augment, zoom_out)

S = 32


def marked(box: tuple[float, float, float, float], value: int = 255) -> torch.Tensor:
    """``uint8 Tensor[3, S, S]``: black with ``box`` (normalised corners) filled with ``value``."""
    image = torch.zeros(3, S, S, dtype=torch.uint8)
    x1, y1, x2, y2 = (round(v * S) for v in box)
    image[:, y1:y2, x1:x2] = value
    return image


def filled_box(image: torch.Tensor) -> list[float]:
    """The normalised bounding box of the bright pixels of ``image Tensor[3, S, S]``."""
    ys, xs = torch.nonzero(image[0] > 127, as_tuple=True)
    return [xs.min().item() / S, ys.min().item() / S, (xs.max().item() + 1) / S, (ys.max().item() + 1) / S]


BOX = (0.125, 0.25, 0.5, 0.75)
LABELS = torch.tensor([[[0, *BOX], [-1, -1, -1, -1, -1]]])  # [1, 2, 5]: one box, one padding row


def batch(n: int = 4):
    images = torch.stack([marked(BOX)] * n)
    return images, LABELS.expand(n, -1, -1).clone()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TestFlip:
    def test_known_box_is_mirrored_with_its_pixels(self):
        images, labels = batch(2)
        out, out_labels = hflip(images, labels, torch.tensor([True, False]))
        assert out_labels[0, 0].tolist() == [0, 0.5, 0.25, 0.875, 0.75]
        assert filled_box(out[0]) == out_labels[0, 0, 1:].tolist()
        assert torch.equal(out[1], images[1]) and torch.equal(out_labels[1], labels[1])
        assert out_labels[:, 1].eq(-1).all()  # padding untouched

    def test_random_flip_flips_about_half(self):
        images, labels = batch(200)
        out, _ = random_hflip(images, labels, gen())
        flipped = (out != images).flatten(1).any(1).float().mean().item()
        assert 0.35 < flipped < 0.65


class TestCrop:
    def test_whole_image_patch_is_the_identity(self):
        images, labels = batch(2)
        out, out_labels = crop(images, labels, torch.tensor([[0.0, 0, 1, 1]] * 2))
        assert torch.equal(out, images) and torch.equal(out_labels, labels)

    def test_known_patch_moves_and_clips_the_box_with_its_pixels(self):
        # The right half of the image: the box (x 0.125..0.5) has its centre (0.3125) outside it,
        # so it is dropped; the patch (0, 0, 0.5, 0.625) keeps it (centre 0.3125, 0.5), clipped at
        # y = 0.625, then scaled by (2, 1.6).
        images, labels = batch(2)
        patches = torch.tensor([[0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.625]])
        out, out_labels = crop(images, labels, patches)
        assert out_labels[0].eq(-1).all()
        assert out_labels[1, 0].tolist() == pytest.approx([0, 0.25, 0.4, 1.0, 1.0])
        assert filled_box(out[1]) == pytest.approx(out_labels[1, 0, 1:].tolist(), abs=1 / S)
        assert out_labels[:, 1].eq(-1).all()
        assert out.dtype == torch.uint8 and out.shape == images.shape

    def test_random_crops_keep_boxes_inside_and_valid(self):
        torch.manual_seed(0)
        n, m = 64, 4
        xy = torch.rand(n, m, 2) * 0.6
        wh = 0.1 + torch.rand(n, m, 2) * 0.3
        labels = torch.cat((torch.randint(0, 3, (n, m, 1)).float(), xy, xy + wh), -1)
        labels[::3, -1] = -1  # some padding rows
        images = torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8)
        out, out_labels = random_crop(images, labels, gen())
        real = out_labels[..., 0] >= 0
        boxes = out_labels[real][:, 1:]
        assert boxes.min() >= 0 and boxes.max() <= 1
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert out_labels[::3, -1].eq(-1).all()                    # padding preserved
        assert out_labels[~real].eq(-1).all()                      # dropped rows are whole padding rows
        assert real.any(dim=1).all()                               # every image keeps a box
        assert set(out_labels[real][:, 0].tolist()) <= {0.0, 1.0, 2.0}
        changed = (out != images).flatten(1).any(1)
        assert 0 < int(changed.sum()) < n                          # "none" keeps some images whole
        assert torch.equal(out_labels[~changed], labels[~changed])


class TestPhotometric:
    def test_changes_colours_not_shapes(self):
        images = torch.randint(0, 256, (16, 3, S, S), dtype=torch.uint8)
        out = photometric_distort(images, gen())
        assert out.dtype == torch.uint8 and out.shape == images.shape
        assert not torch.equal(out, images)

    def test_no_distortion_when_p_is_zero(self):
        images = torch.randint(0, 256, (4, 3, S, S), dtype=torch.uint8)
        assert torch.equal(photometric_distort(images, gen(), p=0.0), images)

    def test_grey_stays_grey_under_hue_and_saturation(self):
        grey = torch.full((8, 3, S, S), 100, dtype=torch.uint8)
        out = photometric_distort(grey, gen(), brightness=0, contrast=(1, 1), p=1.0)
        assert (out.int() - 100).abs().max() <= 1


class TestZoomOut:
    def test_the_box_shrinks_with_its_pixels_onto_a_canvas_of_the_mean_colour(self):
        images, labels = batch(16)
        out, out_labels = zoom_out(images, labels, gen(), max_scale=3.0, p=1.0)
        assert out.dtype == torch.uint8 and out.shape == images.shape and out_labels.shape == labels.shape
        for i in range(16):
            box = out_labels[i, 0, 1:]
            assert (box[2] - box[0]) < (BOX[2] - BOX[0]) and filled_box(out[i]) == pytest.approx(box.tolist(), abs=2 / S)
        mean = images.float().mean()
        corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].float()  # at least one corner is canvas
        assert ((corners - mean).abs() <= 1).any(dim=-1).all()
        assert out_labels[:, 1].eq(-1).all()

    def test_nothing_changes_when_p_is_zero(self):
        images, labels = batch(4)
        out, out_labels = zoom_out(images, labels, gen(), p=0.0)
        assert torch.equal(out, images) and torch.equal(out_labels, labels)


class TestMosaic:
    def test_four_images_at_half_size_with_their_boxes(self):
        # Four images, each with its box in another place: each quadrant holds one, halved.
        boxes = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.25, 0.25, 0.75, 0.75)]
        images = torch.stack([marked(b) for b in boxes])
        labels = torch.tensor([[[k, *b]] for k, b in enumerate(boxes)], dtype=torch.float32)
        out, out_labels = mosaic(images, labels, gen(), p=1.0)
        assert out_labels.shape == (4, 4, 5) and out.shape == images.shape
        for i in range(4):
            for k in range(4):  # the k-th quadrant holds the box of the k-th image placed there, halved
                cls, x1, y1, x2, y2 = out_labels[i, k].tolist()
                ox, oy = (k % 2) * 0.5, (k // 2) * 0.5
                assert [x1, y1, x2, y2] == pytest.approx([v * 0.5 + o for v, o in zip(boxes[int(cls)], (ox, oy) * 2)])
                x1, y1, x2, y2 = (round(v * S) for v in (x1, y1, x2, y2))
                assert out[i, 0, y1:y2, x1:x2].float().mean() > 200  # the box's pixels came along

    def test_an_image_left_alone_keeps_its_rows_then_padding(self):
        images, labels = batch(3)
        out, out_labels = mosaic(images, labels, gen(), p=0.0)
        assert torch.equal(out, images)
        assert torch.equal(out_labels[:, :2], labels) and out_labels[:, 2:].eq(-1).all()


class TestWhole:
    def test_a_seed_fixes_the_result_and_another_changes_it(self):
        images, labels = batch(8)
        a = ssd_augment(images, labels, gen(1))
        b = ssd_augment(images, labels, gen(1))
        c = ssd_augment(images, labels, gen(2))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])
        assert a[0].shape == images.shape and a[1].shape == labels.shape

    def test_the_photos_recipe_keeps_boxes_valid_and_a_seed_fixes_it(self):
        images, labels = batch(16)
        a, b = photos_augment(images, labels, gen(3)), photos_augment(images, labels, gen(3))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        real = a[1][..., 0] >= 0
        boxes = a[1][real][:, 1:]
        assert real.any(dim=1).all() and boxes.min() >= 0 and boxes.max() <= 1
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()

    def test_epoch_generators_differ_by_epoch_and_rank(self):
        draws = {tuple(torch.rand(3, generator=epoch_generator(0, e, r, "cpu")).tolist())
                 for e in (1, 2) for r in (0, 1)}
        assert len(draws) == 4

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
    def test_runs_on_the_gpu(self):
        images, labels = batch(4)
        out, out_labels = ssd_augment(images.cuda(), labels.cuda(), torch.Generator("cuda").manual_seed(0))
        assert out.is_cuda and out_labels.is_cuda


@pytest.mark.slow
def test_training_with_augmentation_and_cosine_resumes_bit_exactly(tmp_path, mlflow_server):
    """The options in a real training: a run killed in epoch 2 and rerun ends with the weights of an
    uninterrupted one (augmentation seeded per epoch, schedule rebuilt at the resumed iteration),
    and those differ from the book's recipe."""
    import subprocess
    import sys

    from tiny_data import FAULTS, make_project, train_env

    options = {"augment": True, "lr_schedule": "cosine", "warmup_epochs": 1}
    cmd = [sys.executable, "-m", "ssd", "train"]
    runs = {}
    for name, fault, train in (("whole", None, options), ("crashed", "kill@2:1", options), ("book", None, {})):
        project = make_project(tmp_path / name, **train)
        if fault:
            killed = subprocess.run([sys.executable, FAULTS], cwd=project,
                                    env=train_env(mlflow_server, SSD_TEST_FAULT=fault),
                                    capture_output=True, timeout=300)
            assert killed.returncode == -9, killed.stderr.decode()[-2000:]
        done = subprocess.run(cmd, cwd=project, env=train_env(mlflow_server), capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert ("resuming from" in done.stderr.decode()) == bool(fault)
        runs[name] = torch.load(project / "models/model.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(runs["whole"][k], runs["crashed"][k]) for k in runs["whole"])
    assert not all(torch.equal(runs["whole"][k], runs["book"][k]) for k in runs["whole"])
