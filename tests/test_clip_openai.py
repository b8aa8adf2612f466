"""OpenAI's released CLIP files without the released weights: ViT-B-32 with random weights in OpenAI's layout
(float16 where OpenAI's files are, plus their three hyperparameter entries), saved as a plain state dict and as a
TorchScript archive holding the same tensors under the standard name in ~/.cache/clip. The reference is
open_clip's own loader of OpenAI files (`load_openai_model`, which builds the model from the state dict): what
`vqgan imagine` loads must compute the same embeddings."""
import shutil
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vqgan.errors import UserError
from vqgan.imagine.clip_models import ClipSpec, clip_specs, load_clip, open_clip_name

open_clip = pytest.importorskip("open_clip")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")  # in open_clip's loader


def openai_state_dict() -> dict[str, torch.Tensor]:
    """ViT-B-32 (random) as OpenAI's `clip` package holds it: its float16 conversion and hyperparameters."""
    from open_clip.model import convert_weights_to_fp16

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    convert_weights_to_fp16(model)  # what OpenAI did before saving: conv, linear, attention, projections
    sd = dict(model.state_dict())
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    return sd


def torchscript_archive(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """A TorchScript archive whose state dict is `sd` (a tree of modules holding the tensors as buffers): the
    structure torch.jit.load reads from OpenAI's files, without their code."""
    root = torch.nn.Module()
    for key, tensor in sd.items():
        *names, leaf = key.split(".")
        module = root
        for name in names:
            if not hasattr(module, name):
                module.add_module(name, torch.nn.Module())
            module = getattr(module, name)
        module.register_buffer(leaf, tensor)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        torch.jit.script(root).save(str(path))
    return path


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("openai")
    sd = openai_state_dict()
    plain = root / "plain" / "ViT-B-32.pt"
    plain.parent.mkdir()
    torch.save(sd, plain)
    yield {"plain": plain, "jit": torchscript_archive(sd, root / "home" / ".cache" / "clip" / "ViT-B-32.pt")}
    shutil.rmtree(root, ignore_errors=True)  # 680 MB: not kept until the session ends


def same_embeddings(clip, reference: torch.nn.Module) -> None:
    """`clip` (ours) and open_clip's model of OpenAI's file embed an image and a text alike."""
    torch.manual_seed(2)
    images = torch.rand(2, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a red house", "fog"])
    with torch.no_grad():
        want_image = reference.encode_image((images - clip.mean) / clip.std, normalize=True)
        want_text = reference.encode_text(tokens, normalize=True)
        assert torch.allclose(clip.encode_image(images), want_image, atol=1e-6)
    assert torch.allclose(clip.encode_text(["a red house", "fog"]), want_text, atol=1e-6)


@pytest.mark.slow
def test_openai_torchscript_file_from_the_clip_cache(openai_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(openai_files["jit"].parents[2]))  # ~/.cache/clip/ViT-B-32.pt
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    clip = load_clip(ClipSpec("ViT-B-32", "openai"))
    assert clip.source["path"] == str(openai_files["jit"]) and clip.source["file"] == "ViT-B-32.pt"
    assert next(clip.model.parameters()).dtype == torch.float32
    # random weights under the released name: recorded as not OpenAI's file (its URL carries the real sha256)
    assert clip.source["checked"] == "NOT the released ViT-B-32.pt of ViT-B-32 / openai: sha256 differs"
    assert clip.source["pretrained"] == "openai" and clip.source["activation"] == "QuickGELU"
    same_embeddings(clip, open_clip.load_openai_model(str(openai_files["jit"]), precision="fp32", device="cpu"))


@pytest.mark.slow
def test_openai_plain_state_dict_gets_quickgelu_whatever_the_tag(openai_files):
    reference = open_clip.load_openai_model(str(openai_files["plain"]), precision="fp32", device="cpu")
    # a tag whose own weights use nn.GELU: the file's OpenAI entries still select OpenAI's QuickGELU
    clip = load_clip(ClipSpec("ViT-B-32", "laion2b_s34b_b79k", openai_files["plain"]))
    same_embeddings(clip, reference)
    assert clip.source["pretrained"] == "openai" and clip.source["activation"] == "QuickGELU"
    with pytest.raises(UserError) as err:  # OpenAI's ViT-B/32 file under another model's name
        load_clip(ClipSpec(open_clip_name("ViT-B/16"), "openai", openai_files["plain"]))
    assert "\n" not in str(err.value) and "wrong shapes" in str(err.value) and "ViT-B-16" in str(err.value)


def test_unreadable_torchscript_archive_is_one_line(tmp_path):
    bad = tmp_path / "ViT-B-32.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("ViT-B-32/constants.pkl", b"not a pickle")
        z.writestr("ViT-B-32/data.pkl", b"nor this")
    with pytest.raises(UserError) as err:
        load_clip(ClipSpec(weights=bad))
    assert "\n" not in str(err.value) and "not a readable TorchScript archive" in str(err.value)


def test_openai_model_names():
    assert [open_clip_name(n) for n in ("ViT-B/32", "ViT-L/14@336px", "RN50x4", "ViT-B-16")] == [
        "ViT-B-32", "ViT-L-14-336", "RN50x4", "ViT-B-16"]
    assert clip_specs(["ViT-B/32"], [], None) == [ClipSpec("ViT-B-32")]
