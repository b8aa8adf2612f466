"""The C sampling step (vqgan.native): it builds here, and gives PyTorch's logits, keys and values."""
import shutil

import pytest
import torch

import vqgan.native
import vqgan.priors.gpt
from vqgan.native import load
from vqgan.priors import GPT, GPTConfig, sample

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def gpt(**kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{"vocab_size": 1000, "block_size": 40, "n_layer": 2, "n_head": 4, "n_embd": 40, **kw}))
    for p in model.parameters():  # away from the init's zero biases and unit norms, so that every term counts
        p.data.normal_(0.0, 0.3)
    return model.eval()


def step_by_step(model, idx, native: bool, monkeypatch):
    """Logits of positions 2.. (one at a time after a two-token prefix) and the cache, native or PyTorch."""
    with monkeypatch.context() as patch:
        if not native:
            patch.setattr(vqgan.priors.gpt, "decode_step", lambda *args: None)
        with torch.no_grad():
            cache = model.new_cache()
            model(idx[:, :2], cache)
            logits = torch.cat([model(idx[:, i:i + 1], cache) for i in range(2, idx.shape[1])], 1)
    assert (cache.native is not None) == native
    return logits, cache


def test_the_kernel_builds_here():
    assert load("decode_step") is not None  # a compiler is on this machine: the fallback must not hide a failure


@pytest.mark.parametrize("batch", [1, 3, 70])  # one row, a partial group of four, many groups
@pytest.mark.parametrize("shape", [dict(n_head=4, n_embd=40), dict(n_head=2, n_embd=64, vocab_size=1024)])
def test_native_step_equals_pytorch(batch, shape, monkeypatch):
    """Odd sizes on purpose: head_dim 10 and vocab 1000 are no multiple of the kernel's 8 lanes or 16 rows."""
    model = gpt(**shape)
    idx = torch.randint(0, model.config.vocab_size, (batch, 30))
    ours, cache = step_by_step(model, idx, True, monkeypatch)
    theirs, reference = step_by_step(model, idx, False, monkeypatch)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours, model(idx)[:, 2:], atol=2e-5, rtol=2e-5)
    for mine, yours in zip(cache.keys + cache.values, reference.keys + reference.values):
        torch.testing.assert_close(mine[:, :, :30], yours[:, :, :30], atol=2e-5, rtol=2e-5)


def test_thread_count_does_not_change_the_numbers(monkeypatch):
    """Every output is computed whole by one thread, so splitting the work differently changes no bit."""
    model, idx, threads = gpt(), torch.randint(0, 1000, (5, 20)), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = step_by_step(model, idx, True, monkeypatch)
        torch.set_num_threads(2)
        two, _ = step_by_step(model, idx, True, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_out_of_range_token_is_an_error_not_a_read_past_the_table():
    model = gpt()
    with torch.no_grad():
        cache = model.new_cache()
        model(torch.zeros(2, 1, dtype=torch.long), cache)
        with pytest.raises(IndexError, match="out of range"):
            model(torch.tensor([[3], [1000]]), cache)


def test_cached_sampler_on_the_kernel_gives_the_uncached_tokens():
    model = gpt(vocab_size=64)
    prefix = torch.randint(0, 64, (4, 2))
    a = sample(model, prefix, 30, top_k=20, generator=torch.Generator().manual_seed(3))
    b = sample(model, prefix, 30, top_k=20, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a, b)


def test_weights_are_packed_again_after_an_update():
    model, idx = gpt(), torch.randint(0, 1000, (2, 6))
    with torch.no_grad():
        before = model(idx)[:, -1]
        cache = model.new_cache()
        model(idx[:, :5], cache)
        torch.testing.assert_close(model(idx[:, 5:], cache)[:, -1], before, atol=2e-5, rtol=2e-5)
        model.head.weight.mul_(2)  # an optimiser step, a load_state_dict: the packed copy is stale
        cache = model.new_cache()
        model(idx[:, :5], cache)
        torch.testing.assert_close(model(idx[:, 5:], cache)[:, -1], 2 * before, atol=4e-5, rtol=2e-5)


def test_build_is_cached_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("VQGAN_CACHE", str(tmp_path))
    load.cache_clear()
    try:
        assert load("decode_step") is not None
        built = list((tmp_path / "native").glob("decode_step-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        load.cache_clear()
        assert load("decode_step") is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
        load.cache_clear()
        monkeypatch.setenv("VQGAN_NATIVE", "0")
        assert load("decode_step") is None
        assert vqgan.native.enabled() is False
    finally:
        load.cache_clear()
