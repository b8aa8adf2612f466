"""Sliding-window sampling: grids larger than the prior's training grid."""
import torch

from vqgan.priors import GPT, GPTConfig, TokenLayout, sample_grid, sample_images_tokens, window_origin


def prior(layout, window):
    torch.manual_seed(0)
    block = layout.prefix_len + window[0] * window[1] - 1
    return GPT(GPTConfig(vocab_size=layout.vocab_size, block_size=block, n_layer=2, n_head=2, n_embd=32)).eval()


def test_window_origin_is_centred_and_clamped():
    assert window_origin(0, 0, (8, 12), (4, 4)) == (0, 0)
    assert window_origin(5, 6, (8, 12), (4, 4)) == (3, 4)
    assert window_origin(7, 11, (8, 12), (4, 4)) == (4, 8)


def test_on_the_training_grid_it_equals_the_plain_sampler():
    layout = TokenLayout(n_embed=12, n_classes=2)
    gpt = prior(layout, (3, 4))
    labels = torch.tensor([0, 1])
    kw = dict(labels=labels, guidance_scale=2.0, top_k=6)
    a = sample_grid(gpt, layout, (3, 4), 2, (3, 4), generator=torch.Generator().manual_seed(3), **kw)
    b = sample_images_tokens(gpt, layout, 12, 2, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.reshape(2, 12), b)


def test_large_grid_runs_and_each_position_sees_only_its_window():
    layout = TokenLayout(n_embed=12)
    window, grid = (3, 4), (6, 10)
    gpt = prior(layout, window)
    seen = []
    original = gpt.forward

    def spy(idx, cache=None):
        seen.append((cache.length if cache is not None else 0) + idx.shape[1])
        return original(idx, cache)

    gpt.forward = spy
    out = sample_grid(gpt, layout, grid, 2, window, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 6, 10, 1)  # (B, H, W, depth)
    out = out[..., 0]
    assert out.min() >= 0 and out.max() < 12
    assert max(seen) <= layout.prefix_len + 12 - 1  # never more context than the window
    gpt.forward = original

    # fill every position but one: the sampled token is the greedy choice of the plain sampler on its window
    known = torch.randint(0, 12, (1, *grid))
    keep = torch.ones(grid, dtype=torch.bool)
    keep[4, 7] = False
    got = sample_grid(gpt, layout, grid, 1, window, known=known, keep=keep, greedy=True)[..., 0]
    i0, j0 = window_origin(4, 7, grid, window)
    local = known[:, i0:i0 + 3, j0:j0 + 4].reshape(1, 12)
    k = (4 - i0) * 4 + (7 - j0)
    local_keep = torch.zeros(12, dtype=torch.bool)
    local_keep[:k] = True
    expect = sample_images_tokens(gpt, layout, k + 1, 1, known=local[:, :k + 1], keep=local_keep[:k + 1], greedy=True)
    assert got[0, 4, 7] == expect[0, k]
    assert torch.equal(got[0][keep], known[0][keep])


def test_spatial_prior_slides_its_condition_window_too():
    layout = TokenLayout(n_embed=12, cond_n_embed=5, cond_len=6)
    gpt = prior(layout, (2, 3))
    cond = torch.randint(0, 5, (2, 4, 9))
    out = sample_grid(gpt, layout, (4, 9), 2, (2, 3), cond=cond, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 9, 1)
    same = sample_grid(gpt, layout, (2, 3), 2, (2, 3), cond=cond[:, :2, :3],
                                 generator=torch.Generator().manual_seed(0))
    plain = sample_images_tokens(gpt, layout, 6, 2, cond=cond[:, :2, :3], generator=torch.Generator().manual_seed(0))
    assert torch.equal(same.reshape(2, 6), plain)
