import numpy as np
import pytest
import torch

from vqgan.cli import main
from vqgan.convert.taming import load_taming_transformer
from vqgan.priors import GPT, GPTConfig, filter_logits, sample
from vqgan.priors.linear import linear


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"vocab_size": 50, "block_size": 40, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw})).eval()


@pytest.mark.parametrize("n_unmasked", [0, 3])
def test_cached_forward_equals_full_forward(n_unmasked):
    gpt = tiny_gpt(n_unmasked=n_unmasked)
    idx = torch.randint(0, 50, (3, 20))
    full = gpt(idx)
    cache = gpt.new_cache()
    start = max(n_unmasked, 1)  # the unmasked prefix must arrive in one piece
    pieces = [gpt(idx[:, :start], cache)] + [gpt(idx[:, i:i + 1], cache) for i in range(start, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 70])  # one row, the transposed small-batch product, F.linear again
def test_one_position_inference_path_equals_full_forward(batch):
    gpt = tiny_gpt()
    idx = torch.randint(0, 50, (batch, 12))
    with torch.no_grad():
        full = gpt(idx)
        cache = gpt.new_cache()
        pieces = [gpt(idx[:, :2], cache)] + [gpt(idx[:, i:i + 1], cache) for i in range(2, 12)]
    assert cache.weights is not None  # the one-position path ran
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 24), (4, 24), (64, 24), (65, 24), (2, 3, 24), (3, 40, 24)])
def test_small_batch_linear_equals_f_linear(shape):
    x, weight, bias = torch.randn(shape), torch.randn(40, 24), torch.randn(40)
    torch.testing.assert_close(linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))
    torch.testing.assert_close(linear(x, weight), torch.nn.functional.linear(x, weight))


def test_causality():
    gpt = tiny_gpt()
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    torch.testing.assert_close(gpt(idx)[:, :8], gpt(changed)[:, :8])


@pytest.mark.parametrize("kw", [dict(), dict(top_k=5), dict(top_p=0.7, temperature=0.8), dict(greedy=True)])
def test_cached_sampler_gives_exactly_the_uncached_tokens(kw):
    gpt = tiny_gpt()
    prefix = torch.randint(0, 50, (4, 3))
    a = sample(gpt, prefix, 30, generator=torch.Generator().manual_seed(7), use_cache=True, **kw)
    b = sample(gpt, prefix, 30, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert a.shape == (4, 30) and torch.equal(a, b)


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all() and torch.isfinite(filter_logits(logits, 2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert torch.isfinite(filter_logits(logits, top_p=0.01))[0].tolist() == [True, False, False, False]


def test_taming_transformer_reproduces_reference_logits_and_greedy_samples(fixtures_dir):
    io = {k: torch.from_numpy(v) for k, v in np.load(fixtures_dir / "io.npz").items()}
    gpt, first_stage, conditioning, _ = load_taming_transformer(fixtures_dir / "transformer.ckpt",
                                                             fixtures_dir / "transformer.yaml")
    assert conditioning["kind"] == "unconditional" and conditioning["sos_token"] == 0
    z = first_stage.encode(io["images"]).reshape(4, -1)
    assert torch.equal(z, io["tr_z_indices"])
    with torch.no_grad():
        logits = gpt(io["tr_gpt_input"])
    assert (logits - io["tr_logits"]).abs().max() < 1e-4
    c = io["tr_c_indices"]
    assert torch.equal(sample(gpt, c, 64, greedy=True), io["tr_greedy_full"])
    half = sample(gpt, torch.cat([c, z[:, :32]], 1), 32, greedy=True)
    assert torch.equal(torch.cat([z[:, :32], half], 1), io["tr_greedy_half"])
    img = first_stage.decode(io["tr_greedy_full"].reshape(4, 8, 8, 1))
    assert (img - io["tr_greedy_full_img"]).abs().max() < 1e-4


def test_convert_transformer_command(fixtures_dir, tmp_path):
    import shutil

    import vqgan

    io = {k: torch.from_numpy(v) for k, v in np.load(fixtures_dir / "io.npz").items()}
    assert main(["convert", str(fixtures_dir / "transformer.ckpt"), str(tmp_path / "tr"), "--config",
                 str(fixtures_dir / "transformer.yaml")]) == 0
    gpt = vqgan.load(tmp_path / "tr")
    tokenizer = vqgan.load(tmp_path / "tr" / "tokenizer")
    assert isinstance(gpt, GPT)
    with torch.no_grad():
        assert (gpt(io["tr_gpt_input"]) - io["tr_logits"]).abs().max() < 1e-4
    assert torch.equal(tokenizer.encode(io["images"]).reshape(4, -1), io["tr_z_indices"])
    shutil.copy(fixtures_dir / "transformer.ckpt", tmp_path / "last.ckpt")
    shutil.copy(fixtures_dir / "transformer.yaml", tmp_path / "model.yaml")
    assert isinstance(vqgan.load(tmp_path / "last.ckpt"), GPT)


def test_sample_command_from_a_converted_taming_transformer(fixtures_dir, tmp_path):

    assert main(["convert", str(fixtures_dir / "transformer.ckpt"), str(tmp_path / "tr"), "--config",
                 str(fixtures_dir / "transformer.yaml")]) == 0
    assert main(["sample", str(tmp_path / "tr"), str(tmp_path / "s"), "--n", "3", "--top-k", "10"]) == 0
    assert len(list((tmp_path / "s").glob("sample_*.png"))) == 3 and (tmp_path / "s" / "samples.png").is_file()


def test_finetune_a_converted_taming_transformer_on_new_tokens(fixtures_dir, tmp_path):
    from vqgan.config import load_config
    from vqgan.errors import UserError
    from vqgan.train.stage2 import PriorTrainer, TransformerTrainConfig

    assert main(["convert", str(fixtures_dir / "transformer.ckpt"), str(tmp_path / "conv"), "--config",
                 str(fixtures_dir / "transformer.yaml")]) == 0
    assert main(["tokenize", str(tmp_path / "conv" / "tokenizer"), "builtin:scenes", str(tmp_path / "store"),
                 "--count", "24", "--no-progress"]) == 0

    def cfg(init, out):
        return load_config(TransformerTrainConfig, {"data": {"tokens": str(tmp_path / "store"), "holdout": 4},
                                                    "train": {"out_dir": str(tmp_path / out), "steps": 2,
                                                              "batch_size": 4, "init_from": str(init)}})

    trainer = PriorTrainer(cfg(tmp_path / "conv", "ft"), progress=False)
    original = load_taming_transformer(fixtures_dir / "transformer.ckpt", fixtures_dir / "transformer.yaml")[0]
    assert trainer.layout.taming and trainer.layout.start_token == 0
    for k, v in original.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k
    trainer.fit()
    assert main(["sample", str(tmp_path / "ft"), str(tmp_path / "out"), "--n", "1"]) == 0
    from conftest import tiny_model_config

    from vqgan.tokenizers import VQModel

    VQModel(tiny_model_config()).save_pretrained(tmp_path / "other")
    assert main(["tokenize", str(tmp_path / "other"), "builtin:scenes", str(tmp_path / "store2"), "--count", "8",
                 "--no-progress"]) == 0
    with pytest.raises(UserError, match="not the one that made"):
        PriorTrainer(load_config(TransformerTrainConfig, {"data": {"tokens": str(tmp_path / "store2")},
                                                          "train": {"out_dir": str(tmp_path / "x"),
                                                                    "init_from": str(tmp_path / "conv")}}))
