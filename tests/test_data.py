import numpy as np
import pytest
import torch
from PIL import Image

from vqgan.data.images import ImageDataset, load_rgb, scan_images
from vqgan.data.scenes import SCENE_CLASSES, SEGMENT_CLASSES, render_scene
from vqgan.errors import UserError


def write_odd_images(folder):
    """One image of each awkward kind, plus broken files."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a_rgb.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "b_cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "c_palette.png")
    rgba = Image.fromarray(np.dstack([rgb, np.full((40, 48), 128, np.uint8)]), "RGBA")
    rgba.save(folder / "d_rgba.png")
    Image.fromarray((rng.integers(0, 65535, (40, 48))).astype(np.uint16)).save(folder / "e_16bit.png")
    Image.fromarray(rgb[..., 0]).save(folder / "f_grey.bmp")
    Image.fromarray(rgb).save(folder / "g.webp")
    sub = folder / "nested" / "deeper"
    sub.mkdir(parents=True)
    Image.fromarray(rgb).save(sub / "h_nested.jpeg")
    (folder / "x_empty.png").write_bytes(b"")
    (folder / "y_garbage.jpg").write_bytes(b"this is not an image at all")
    full = (folder / "a_rgb.png").read_bytes()
    (folder / "z_truncated.png").write_bytes(full[: len(full) // 2])  # header fine, data cut
    (folder / "notes.txt").write_text("ignored")


def test_every_mode_becomes_rgb_and_bad_files_are_skipped_and_counted(tmp_path, caplog):
    write_odd_images(tmp_path)
    good, bad = scan_images(tmp_path)
    assert {p.name for p in bad} == {"x_empty.png", "y_garbage.jpg"}
    assert len(good) == 9  # the truncated file has a valid header: caught at load time
    ds = ImageDataset.from_paths(good, resolution=32, crop="random", train=True)
    skipped = 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert -1.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        skipped += item["skipped"]
    assert skipped == 1
    assert "z_truncated.png" in caplog.text and "x_empty.png" in caplog.text


def test_a_bug_in_the_reading_code_is_raised_not_counted_as_bad_files(tmp_path, monkeypatch):
    write_odd_images(tmp_path)
    good, _ = scan_images(tmp_path)
    ds = ImageDataset.from_paths(good, resolution=32, crop="random", train=True)
    assert ds.read(0) is not None

    def wrong_signature(im, index):  # as an override that missed a new argument once did
        return None

    monkeypatch.setattr(ds, "prepare", wrong_signature)
    with pytest.raises(TypeError):
        ds.read(0)


@pytest.mark.parametrize("rank, logged", [("0", True), ("1", False)])
def test_the_folder_scan_is_reported_by_the_first_torchrun_process_only(tmp_path, caplog, monkeypatch, rank, logged):
    """Every replica scans the same folder: one process names its bad files, not each of them."""
    (tmp_path / "a.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "c.png").symlink_to(tmp_path / "gone.png")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr("vqgan.data.images._reported", set())
    good, bad = scan_images(tmp_path)
    assert [p.name for p in good] == ["b.png"] and [p.name for p in bad] == ["a.png", "c.png"]
    assert ("a.png" in caplog.text and "c.png" in caplog.text) is logged
    assert ("skipping" in caplog.text) is logged

def test_16bit_and_rgba_conversions(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "white16.png")
    assert np.asarray(load_rgb(tmp_path / "white16.png")).min() == 255
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_rgb(tmp_path / "clear.png")).min() == 255  # transparent -> white


def test_empty_and_unreadable_folders_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan_images(tmp_path / "missing")
    with pytest.raises(UserError, match="no images"):
        scan_images(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="none of the 1 image files"):
        scan_images(tmp_path)


def test_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    good, _ = scan_images(tmp_path)
    a = ImageDataset.from_paths(good, resolution=32, train=True, seed=3)
    b = ImageDataset.from_paths(good, resolution=32, train=True, seed=3)
    assert torch.equal(a[0]["image"], b[0]["image"])
    crops = set()
    for epoch in range(8):
        crops.add(a[(epoch, 0)]["image"].sum().item())
    assert len(crops) > 1


def test_an_evaluation_batch_is_every_centre_crop_stacked(tmp_path):
    rng = np.random.default_rng(2)
    for i, size in enumerate([(50, 70), (64, 40)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    good, _ = scan_images(tmp_path)
    images = ImageDataset.from_paths(good, resolution=32, train=False)
    batch = images.batch()
    assert batch.shape == (2, 3, 32, 32)
    assert torch.equal(batch, torch.stack([images[0]["image"], images[1]["image"]]))
    assert torch.equal(batch, images.batch())  # no random crop or flip outside training


def test_builtin_scenes_are_varied_with_labels_and_masks():
    images = []
    for i in range(8):
        img, seg, label = render_scene(i, 64)
        assert img.size == (64, 64) and seg.size == (64, 64)
        assert label == i % len(SCENE_CLASSES)
        assert int(np.asarray(seg).max()) < len(SEGMENT_CLASSES)
        images.append(np.asarray(img, dtype=np.float32))
    stack = np.stack(images)
    assert stack.std(axis=(1, 2)).mean() > 20  # not flat colours
    assert np.abs(stack[0] - stack[4]).mean() > 10  # different scenes of the same kind differ
    assert np.array_equal(np.asarray(render_scene(3, 64)[0]), images[3].astype(np.uint8))


def test_builtin_scenes_are_identical_in_every_process():
    import subprocess
    import sys

    code = "import numpy as np; from vqgan.data.scenes import render_scene; print(int(np.asarray(render_scene(5, 32)[0]).sum()))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": s, "PATH": ""},
                           check=True).stdout for s in ("1", "2")}
    assert len(outs) == 1


def test_builtin_images_are_read_without_their_depth_maps(monkeypatch):
    """A depth map costs three times the drawing: RGB and label reads must not make one (the GPU run's data
    side was a quarter as fast with it), while depth reads still do."""
    from vqgan.data import sources
    from vqgan.data.scenes import depth_from_segmentation

    calls = []
    monkeypatch.setattr(sources, "depth_from_segmentation", lambda seg: calls.append(1) or depth_from_segmentation(seg))
    for name, kind in (("scenes", "rgb"), ("scenes-seg", "segmentation")):
        items, _ = sources.image_sources(f"builtin:{name}", 3, 32, kind)
        assert [item.load().size for item in items] == [(32, 32)] * 3
    assert not calls
    depth = sources.image_sources("builtin:scenes-depth", 1, 32, "depth")[0][0].load()
    assert calls and depth.mode == "F"


@pytest.mark.parametrize("setting,cores,ranks,expected", [(None, 2, 1, 2), (None, 16, 1, 8), (None, 16, 4, 4),
                                                          (None, 2, 4, 1), (0, 16, 1, 0), (3, 16, 1, 3)])
def test_loader_processes_follow_the_cores(monkeypatch, setting, cores, ranks, expected):
    """data.num_workers=None: one loader process per core this process may use, the cores shared among the
    local ranks, 1 to 8; a number is taken as given (0: load in the training process)."""
    import os

    from vqgan.train.common import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert loader_workers(setting, ranks) == expected


def test_one_endless_loader_gives_each_epochs_batches_and_crops(tmp_path):
    """`EpochBatches` walks the sampler's epochs from a resume position, and an `(epoch, index)` key crops as
    that epoch's item: the same batches and crops as a loader per epoch, without restarting its workers."""
    from itertools import islice

    from vqgan.train.common import EpochBatches, ResumableSampler

    sampler = ResumableSampler(10, batch_size=3, seed=4)  # 3 batches an epoch, the 10th image dropped
    per_epoch = []
    for epoch in range(3):
        sampler.set_position(epoch, 0)
        keys = list(sampler)
        per_epoch += [[(epoch, i) for i in keys[b:b + 3]] for b in range(0, 9, 3)]
    assert list(islice(iter(EpochBatches(sampler, 0, 0)), 9)) == per_epoch
    assert list(islice(iter(EpochBatches(sampler, 1, 2)), 4)) == per_epoch[5:9]  # resumed mid-epoch

    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    ds = ImageDataset.from_paths(sorted(tmp_path.glob("*.png")), resolution=16, seed=1)
    assert torch.equal(ds[(0, 3)]["image"], ds[3]["image"]) and ds[(2, 3)]["epoch"] == 2  # an index alone: epoch 0
    assert any(not torch.equal(ds[(1, i)]["image"], ds[i]["image"]) for i in range(4))  # another epoch's crops
