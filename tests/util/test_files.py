"""Atomic writes: readers see the old result or the new one, never half of one."""
import json
import re

import matplotlib
import pytest
import torch

from ssd.util.files import (atomic_dir, atomic_path, atomic_save_figure, atomic_torch_save, atomic_write_bytes,
                       atomic_write_json, atomic_write_text)

matplotlib.use("Agg")


class Boom(RuntimeError):
    pass


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")))


class TestAtomicFile:
    def test_writes_and_replaces(self, tmp_path):
        path = tmp_path / "deep" / "er" / "out.json"
        atomic_write_json(path, {"b": 1, "a": [1, 2]})
        assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
        atomic_write_text(path, "new")
        assert path.read_text() == "new"
        assert leftovers(path.parent) == []

    def test_writer_raising_midway_keeps_old_file(self, tmp_path):
        path = tmp_path / "result.txt"
        atomic_write_text(path, "old contents")
        with pytest.raises(Boom):
            with atomic_path(path) as tmp:
                tmp.write_text("half of the new")
                raise Boom("crash while writing")
        assert path.read_text() == "old contents"
        assert leftovers(tmp_path) == []

    def test_failure_without_old_file_leaves_nothing(self, tmp_path):
        with pytest.raises(Boom):
            with atomic_path(tmp_path / "new.bin") as tmp:
                tmp.write_bytes(b"\0" * 100)
                raise Boom()
        assert list(tmp_path.iterdir()) == []

    def test_torch_save_failing_midway_keeps_old_file(self, tmp_path):
        path = tmp_path / "model.pt"
        atomic_torch_save({"w": torch.ones(3)}, path)
        # The tensor is written before pickling reaches the lambda and fails.
        with pytest.raises(Exception):
            atomic_torch_save({"w": torch.zeros(1000), "f": lambda: 0}, path)
        assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
        assert leftovers(tmp_path) == []

    def test_bytes_and_figure(self, tmp_path):
        import matplotlib.pyplot as plt

        atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
        assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        atomic_save_figure(fig, tmp_path / "pics" / "plot.png")
        plt.close(fig)
        assert (tmp_path / "pics" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert leftovers(tmp_path / "pics") == []


class TestAtomicDir:
    def test_replaces_folder_whole(self, tmp_path):
        target = tmp_path / "pictures"
        target.mkdir()
        (target / "stale.png").write_text("stale")
        (target / "keep.png").write_text("old")
        with atomic_dir(target) as tmp:
            (tmp / "keep.png").write_text("new")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "x.txt").write_text("x")
        assert sorted(p.name for p in target.iterdir()) == ["keep.png", "sub"]
        assert (target / "keep.png").read_text() == "new"
        assert leftovers(tmp_path) == []

    def test_failure_leaves_old_folder(self, tmp_path):
        target = tmp_path / "pictures"
        target.mkdir()
        (target / "a.png").write_text("old")
        with pytest.raises(Boom):
            with atomic_dir(target) as tmp:
                (tmp / "a.png").write_text("new")
                (tmp / "b.png").write_text("new")
                raise Boom()
        assert sorted(p.name for p in target.iterdir()) == ["a.png"]
        assert (target / "a.png").read_text() == "old"
        assert leftovers(tmp_path) == []

    def test_creates_missing_folder(self, tmp_path):
        with atomic_dir(tmp_path / "x" / "new") as tmp:
            (tmp / "f").write_text("1")
        assert (tmp_path / "x" / "new" / "f").read_text() == "1"


def test_a_full_disk_is_named_and_keeps_the_previous_file(small_disk):
    import errno

    import torch

    from ssd.util.files import atomic_torch_save, atomic_write_bytes

    target = small_disk / "model.pt"
    atomic_write_bytes(target, b"previous")
    with pytest.raises(OSError, match=rf"^\[Errno 28\] no space left on device writing {re.escape(str(target))} ") as info:
        atomic_torch_save({"w": torch.zeros(1 << 20)}, target)  # 4 MiB on a 1 MiB disk
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="no space left on device writing"):
        atomic_write_bytes(target, bytes(2 << 20))
    assert target.read_bytes() == b"previous" and [p.name for p in small_disk.iterdir()] == ["model.pt"]
