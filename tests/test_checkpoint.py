import pickle

import pytest
import torch
from conftest import tiny_model_config

from vqgan.checkpoint import check_state_dict, load_model, load_state_dict_file, safe_torch_load
from vqgan.errors import UserError
from vqgan.tokenizers import VQModel


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _RunsCommand(marker)}, f)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCommand(marker)}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(UserError, match="refused for safety"):
            safe_torch_load(p)
    assert not marker.exists()


def test_truncated_and_empty_checkpoints_are_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"w": torch.randn(100, 100)}}, good)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="corrupt or truncated"):
        safe_torch_load(tmp_path / "cut.pt")
    with pytest.raises(UserError, match="empty"):
        safe_torch_load(tmp_path / "empty.pt")
    assert set(load_state_dict_file(good)) == {"w"}


def test_save_pretrained_roundtrip_is_bit_exact(tmp_path):
    model = VQModel(tiny_model_config())
    model.save_pretrained(tmp_path / "m")
    again = VQModel.from_pretrained(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "config.yaml").is_file()


def test_mismatched_weights_name_the_first_offending_keys(tmp_path):
    model = VQModel(tiny_model_config())
    sd = model.state_dict()
    sd.pop("encoder.conv_in.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing keys \['encoder.conv_in.weight'\].*unexpected keys \['extra"):
        check_state_dict(model, sd, "x.safetensors")
    sd = model.state_dict()
    sd["quantize.embedding.weight"] = torch.zeros(3, 3)
    with pytest.raises(UserError, match="quantize.embedding.weight"):
        check_state_dict(model, sd, "x.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nothing")
