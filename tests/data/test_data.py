"""Reading banana-layout splits built in tmp_path, and the loader's batches and sharding."""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ssd.data.dataset import DetectionDataset, load_dataset, make_loader, read_split
from ssd.data.labels import read_labels

S = 32  # image_size the tests read at
HEADER = "img_name,label,xmin,ymin,xmax,ymax\n"
# name -> (PIL mode, size (w, h), fill colour); every image distinct so a sample can be traced back.
IMAGES = {
    "0.png": ("RGB", (S, S), (10, 0, 0)),
    "1.png": ("RGB", (S, S), (20, 0, 0)),
    "2.png": ("RGB", (64, 32), (30, 0, 0)),          # another size: resized, boxes normalised by (64, 32)
    "3.png": ("RGBA", (S, S), (40, 50, 60, 128)),    # alpha dropped
    "4.png": ("L", (S, S), 77),                      # grey -> (77, 77, 77)
    "5.png": ("P", (S, S), None),                    # palette: index 1 -> (200, 100, 50)
    "6.jpg": ("RGB", (S, S), (90, 0, 0)),            # PNG bytes behind a .jpg name
}
EXPECTED_RGB = {"0.png": (10, 0, 0), "1.png": (20, 0, 0), "2.png": (30, 0, 0), "3.png": (40, 50, 60),
                "4.png": (77, 77, 77), "5.png": (200, 100, 50), "6.jpg": (90, 0, 0)}
# Label rows; 1.png's second box comes last, so rows are grouped by image name, not by position.
ROWS = [
    ("0.png", "0", 2, 4, 10, 12),
    ("1.png", "0", 0, 0, 16, 16),
    ("2.png", "banana", 8, 4, 40, 28),
    ("3.png", "0", 1, 2, 3, 4),
    ("4.png", "0", 4, 4, 28, 28),
    ("5.png", "0", 0, 0, 32, 32),
    ("6.jpg", "0", 5, 6, 7, 8),
    ("1.png", "0", 16, 8, 32, 24),
]
NAMES = list(IMAGES)


def write_image(path, mode, size, fill):
    if mode == "P":
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, 200, 100, 50] + [0] * (256 * 3 - 6))
    else:
        img = Image.new(mode, size, fill)
    img.save(path, format="PNG")


def write_split(split_dir, rows=ROWS, images=IMAGES, header=HEADER, label_name="label.csv"):
    (split_dir / "images").mkdir(parents=True)
    for name, (mode, size, fill) in images.items():
        write_image(split_dir / "images" / name, mode, size, fill)
    lines = [",".join(map(str, r)) for r in rows]
    (split_dir / label_name).write_text(header + "\n".join(lines) + "\n")
    return split_dir


@pytest.fixture
def root(tmp_path):
    write_split(tmp_path / "banana-detection" / "bananas_train")
    return tmp_path / "banana-detection"


@pytest.fixture
def dataset(root):
    return load_dataset(root, "train", image_size=S)


def indices_of(batch_images: torch.Tensor, dataset: DetectionDataset) -> list[int]:
    """Which dataset items a batch holds (every test image has its own colour)."""
    return [int(torch.nonzero((dataset.images == img).flatten(1).all(dim=1))[0]) for img in batch_images]


class TestReadSplit:
    def test_shapes_dtypes_names(self, dataset):
        assert dataset.images.shape == (7, 3, S, S) and dataset.images.dtype == torch.uint8
        assert dataset.labels.shape == (7, 2, 5) and dataset.labels.dtype == torch.float32
        assert dataset.names == NAMES and len(dataset) == 7
        img, lab = dataset[1]
        assert img.shape == (3, S, S) and lab.shape == (2, 5)

    def test_boxes_divided_by_image_size_and_padded(self, dataset):
        torch.testing.assert_close(dataset.labels[0], torch.tensor([[0, 2 / S, 4 / S, 10 / S, 12 / S], [-1] * 5]))
        torch.testing.assert_close(dataset.labels[1], torch.tensor([[0, 0, 0, 0.5, 0.5], [0, 0.5, 0.25, 1, 0.75]]))

    def test_other_size_resized_boxes_normalised_by_original_size(self, dataset):
        torch.testing.assert_close(dataset.labels[2, 0], torch.tensor([0, 8 / 64, 4 / 32, 40 / 64, 28 / 32]))
        assert (dataset.labels[2, 1] == -1).all()

    @pytest.mark.parametrize("name", NAMES)
    def test_any_mode_loads_as_rgb(self, dataset, name):
        img = dataset.images[NAMES.index(name)]
        expected = torch.tensor(EXPECTED_RGB[name], dtype=torch.uint8)[:, None, None].expand(3, S, S)
        assert torch.equal(img, expected)

    def test_class_names_and_indices(self, tmp_path):
        rows = [("0.png", "apple", 1, 1, 5, 5), ("0.png", "1", 2, 2, 6, 6), ("1.png", "banana", 3, 3, 9, 9),
                ("1.png", "0", 1, 2, 3, 4)]
        split = write_split(tmp_path / "s", rows=rows, images={k: IMAGES[k] for k in ("0.png", "1.png")})
        ds = load_dataset(split, "train", S, classes=["banana", "apple"])
        assert ds.labels[:, :, 0].tolist() == [[1, 1], [0, 0]]
        assert ds.classes == ["banana", "apple"]

    def test_split_folder_itself_and_labels_csv_name(self, tmp_path):
        split = write_split(tmp_path / "only", label_name="labels.csv")
        ds = load_dataset(split, "val", S)
        assert ds.names == NAMES

    def test_val_split_names(self, tmp_path):
        write_split(tmp_path / "bananas_val")
        assert load_dataset(tmp_path, "val", S).split_dir == tmp_path / "bananas_val"

    @pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
    def test_matches_d2l_reader_on_256_images(self, tmp_path):
        # The book reads with torchvision.io.read_image and divides pixel boxes by 256.
        noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        split = tmp_path / "bananas_train"
        (split / "images").mkdir(parents=True)
        Image.fromarray(noise).save(split / "images" / "0.png")
        (split / "label.csv").write_text(HEADER + "0.png,0,104,20,143,58\n")
        images, labels, _ = read_split(split, 256)
        assert torch.equal(images[0], torchvision.io.read_image(str(split / "images" / "0.png")))
        assert torch.equal(labels, torch.tensor([[[0, 104, 20, 143, 58]]]) / 256)


class TestReadErrors:
    def test_missing_folder(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="dataset folder not found: .*nowhere"):
            load_dataset(tmp_path / "nowhere", "train", S)

    def test_missing_split(self, root):
        with pytest.raises(FileNotFoundError, match="no 'val' split in .*banana-detection"):
            load_dataset(root, "val", S)

    def test_missing_label_file(self, root):
        (root / "bananas_train" / "label.csv").unlink()
        with pytest.raises(FileNotFoundError, match="no label file in .*bananas_train"):
            load_dataset(root, "train", S)
        with pytest.raises(FileNotFoundError, match="label file not found: .*label.csv"):
            read_labels(root / "bananas_train" / "label.csv")

    def test_missing_column(self, tmp_path):
        split = write_split(tmp_path / "s", rows=[r[:-1] for r in ROWS], header="img_name,label,xmin,ymin,xmax\n")
        with pytest.raises(ValueError, match=r"label.csv: missing column\(s\) ymax"):
            load_dataset(split, "train", S)

    @pytest.mark.parametrize("label, match", [
        ("cherry", r"label.csv row 3: unknown class 'cherry' \(classes: banana\)"),
        ("1", r"label.csv row 3: class '1' out of range 0..0"),
        ("0.5", r"label.csv row 3: class '0.5' out of range"),
    ])
    def test_bad_class(self, tmp_path, label, match):
        rows = list(ROWS)
        rows[1] = ("1.png", label, 0, 0, 16, 16)
        split = write_split(tmp_path / "s", rows=rows)
        with pytest.raises(ValueError, match=match):
            load_dataset(split, "train", S)

    def test_missing_image(self, root):
        (root / "bananas_train" / "images" / "4.png").unlink()
        with pytest.raises(FileNotFoundError, match=r"4.png: image listed in the label file is missing"):
            load_dataset(root, "train", S)

    def test_unreadable_image(self, root):
        (root / "bananas_train" / "images" / "3.png").write_bytes(b"not an image")
        with pytest.raises(ValueError, match=r"3.png: cannot be read as an image"):
            load_dataset(root, "train", S)


class TestMakeLoader:
    def test_batches(self, dataset):
        batches = list(make_loader(dataset, batch_size=3, shuffle=False))
        assert [len(b[0]) for b in batches] == [3, 3, 1]
        images, labels = batches[0]
        assert images.shape == (3, 3, S, S) and images.dtype == torch.uint8
        assert labels.shape == (3, 2, 5) and labels.dtype == torch.float32
        assert torch.equal(torch.cat([b[0] for b in batches]), dataset.images)
        # Labels are padded per batch: to the batch's most crowded image, not the split's.
        assert [b[1].shape[1] for b in batches] == [2, 1, 1]
        start = 0
        for _, labels in batches:
            assert torch.equal(labels, dataset.labels[start:start + len(labels), :labels.shape[1]])
            start += len(labels)

    def test_drop_last(self, dataset):
        assert [len(b[0]) for b in make_loader(dataset, batch_size=3, drop_last=True)] == [3, 3]

    def test_shuffle_depends_only_on_seed_and_epoch(self, dataset):
        def order(seed, epoch):
            loader = make_loader(dataset, batch_size=4, seed=seed)
            loader.sampler.set_epoch(epoch)
            return [i for images, _ in loader for i in indices_of(images, dataset)]

        assert sorted(order(0, 0)) == list(range(7))
        assert order(0, 0) == order(0, 0)
        assert order(0, 0) != order(0, 1)
        assert order(0, 1) != order(1, 1)

    @pytest.mark.parametrize("shuffle", [False, True])
    def test_two_ranks_partition_the_data(self, dataset, shuffle):
        shards = []
        for rank in range(2):
            loader = make_loader(dataset, batch_size=2, shuffle=shuffle, seed=3, rank=rank, world_size=2)
            loader.sampler.set_epoch(1)
            shards.append([i for images, _ in loader for i in indices_of(images, dataset)])
        # 7 items over 2 ranks: 4 each, the sampler repeats one item so the ranks stay in step.
        assert [len(s) for s in shards] == [4, 4]
        assert set(shards[0]) | set(shards[1]) == set(range(7))
        assert len(set(shards[0]) & set(shards[1])) == 1

    def test_two_ranks_disjoint_with_drop_last(self, dataset):
        shards = [[i for images, _ in make_loader(dataset, 1, rank=r, world_size=2, drop_last=True)
                   for i in indices_of(images, dataset)] for r in range(2)]
        assert [len(s) for s in shards] == [3, 3]
        assert not set(shards[0]) & set(shards[1])
