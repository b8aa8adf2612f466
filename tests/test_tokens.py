import json

import numpy as np
import pytest
import torch
from conftest import tiny_model_config
from PIL import Image

from vqgan.cli import main
from vqgan.data.tokens import TokenStore, tokenize_folder
from vqgan.errors import UserError
from vqgan.tokenizers import VQModel


@pytest.fixture
def setup(tmp_path):
    model = VQModel(tiny_model_config())
    model.save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    return model.eval(), tmp_path


def test_token_store_roundtrips_with_folder_labels(setup):
    model, tmp = setup
    assert main(["tokenize", str(tmp / "tok"), str(tmp / "imgs"), str(tmp / "store"), "--labels", "folders",
                 "--no-progress"]) == 0
    store = TokenStore(tmp / "store")
    assert len(store) == 10 and store.grid == (16, 16) and store.class_names == ["cats", "dogs"]
    assert store.tokens.dtype == np.uint16
    assert store.labels.tolist() == [0] * 5 + [1] * 5
    from vqgan.data.images import ImageDataset, scan_images

    files, _ = scan_images(tmp / "imgs")
    x = ImageDataset.from_paths(files, resolution=32, crop="center", train=False)[7]["image"][None]
    assert torch.equal(store.rows_to_codes(store[7]["tokens"][None]), model.encode(x))
    assert store.spec == model.code_spec and store.spec.streams == [64] and store.meta["files"][7].endswith("dogs/2.png")


def test_interrupted_tokenize_resumes(setup, monkeypatch):
    model, tmp = setup
    full = tokenize_folder(str(tmp / "tok"), str(tmp / "imgs"), str(tmp / "a"), batch_size=3, crops_per_image=2,
                           progress=False)
    assert full["count"] == 20
    import vqgan.data.tokens as tokens_module

    calls = {"n": 0}
    original = tokens_module._write_json_atomic

    def dies_after_two_batches(path, data):
        original(path, data)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tokens_module, "_write_json_atomic", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        tokenize_folder(str(tmp / "tok"), str(tmp / "imgs"), str(tmp / "b"), batch_size=3, crops_per_image=2,
                        progress=False)
    monkeypatch.setattr(tokens_module, "_write_json_atomic", original)
    assert json.loads((tmp / "b" / "meta.json").read_text())["done"] == 6
    with pytest.raises(UserError, match="incomplete"):
        TokenStore(tmp / "b")
    tokenize_folder(str(tmp / "tok"), str(tmp / "imgs"), str(tmp / "b"), batch_size=3, crops_per_image=2,
                    progress=False)
    assert np.array_equal(TokenStore(tmp / "a").tokens, TokenStore(tmp / "b").tokens)


def test_csv_labels_and_mismatched_store(setup):
    model, tmp = setup
    mapping = tmp / "labels.csv"
    mapping.write_text("file,label\n" + "".join(f"cats/{i}.png,{i % 2}\n" for i in range(5)))
    tokenize_folder(str(tmp / "tok"), str(tmp / "imgs"), str(tmp / "s"), labels=str(mapping), progress=False)
    store = TokenStore(tmp / "s")
    assert store.labels.tolist() == [0, 1, 0, 1, 0] + [-1] * 5
    other = VQModel(tiny_model_config())
    other.save_pretrained(tmp / "other")
    with pytest.raises(UserError, match="made differently"):
        tokenize_folder(str(tmp / "other"), str(tmp / "imgs"), str(tmp / "s"), progress=False)


def test_each_crop_of_an_image_is_its_own_and_its_map_is_cut_alike(tmp_path):
    """`tokenize --crops N`: crop k of an image is epoch k's random crop (different per k, the same on every
    run), and a condition map paired with it is cut by the same k."""
    from vqgan.data.images import ImageDataset
    from vqgan.data.tokens import _Crops

    pixels = np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    paths = [tmp_path / "a.png"]
    images = ImageDataset.from_paths(paths, resolution=16, train=True, seed=5)
    rows = [_Crops(images, 4)[k]["image"] for k in range(4)]
    assert len({r.sum().item() for r in rows}) > 1
    assert all(torch.equal(a, _Crops(images, 4)[k]["image"]) for k, a in enumerate(rows))
    paired = _Crops(images, 4, maps=ImageDataset.from_paths(paths, resolution=16, train=True, seed=5))
    assert all(torch.equal(paired[k]["image"], paired[k]["cond"]) and torch.equal(paired[k]["image"], rows[k])
               for k in range(4))
