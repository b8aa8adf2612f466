"""The one sampling loop (vqgan.priors.sampling): its window policies, guidance and completion."""
import pytest
import torch

from vqgan.errors import UserError
from vqgan.priors import GPT, GPTConfig, TokenLayout, WholeSequence, sample, sample_images_tokens, sample_tokens
from vqgan.priors.bundle import ArgNames, Prior
from vqgan.priors.sampling import chooser


def tiny(layout, block=12):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=layout.vocab_size, block_size=block, n_layer=2, n_head=2, n_embd=32)).eval()


def test_guided_completion_the_unconditional_rows_see_the_given_tokens():
    """Greedy guided completion after two given tokens: the first sampled token is the argmax of
    uncond + s * (cond - uncond), both passes over [condition, the given tokens]."""
    layout = TokenLayout(n_embed=10, n_classes=3)
    gpt = tiny(layout)
    known, labels = torch.randint(0, 10, (2, 10)), torch.tensor([0, 2])
    keep = torch.zeros(10, dtype=torch.bool)
    keep[:2] = True
    got = sample_images_tokens(gpt, layout, 10, 2, labels, known=known, keep=keep, guidance_scale=3.0, greedy=True)
    with torch.no_grad():
        cond = gpt(torch.cat([layout.condition_tokens(labels, 2, torch.device("cpu")), known[:, :2]], 1))[:, -1]
        uncond = gpt(torch.cat([torch.full((2, 1), layout.null_class), known[:, :2]], 1))[:, -1]
    expect = (uncond + 3.0 * (cond - uncond))[:, :10].argmax(-1)
    assert torch.equal(got[:, 2], expect) and torch.equal(got[:, :2], known[:, :2])


def test_positions_given_in_every_row_are_not_sampled():
    layout = TokenLayout(n_embed=10)
    gpt = tiny(layout)
    calls = []
    original = gpt.forward
    gpt.forward = lambda idx, cache=None: calls.append(idx.shape[1]) or original(idx, cache)
    keep = torch.ones(10, dtype=torch.bool)
    keep[4] = keep[8] = False
    out = sample_images_tokens(gpt, layout, 10, 2, known=torch.randint(0, 10, (2, 10)), keep=keep,
                               generator=torch.Generator().manual_seed(0))
    assert calls == [1 + 4, 4]  # condition + 4 given tokens, then positions 4..7 at once
    assert out.shape == (2, 10)


def test_the_loop_with_the_whole_sequence_policy_is_sample():
    layout = TokenLayout(n_embed=10)
    gpt = tiny(layout)
    prefix = torch.randint(0, 10, (3, 2))
    a = sample(gpt, prefix, 8, top_p=0.8, generator=torch.Generator().manual_seed(5))
    b = sample_tokens(gpt, torch.zeros(3, 8, dtype=torch.long), WholeSequence(8), lambda window: prefix,
                      chooser(None, top_p=0.8, generator=torch.Generator().manual_seed(5)), use_cache=False)
    assert torch.equal(a, b)


def test_library_errors_name_arguments_the_command_names_flags():
    layout = TokenLayout(n_embed=10, n_classes=2)
    prior = Prior(tiny(layout), layout, None, (2, 5), {"class_names": ["cat", "dog"]})
    assert prior.label_id("dog") == 1
    with pytest.raises(UserError, match="^label 'cow' is neither"):
        prior.label_id("cow")
    with pytest.raises(UserError, match="^--label 'cow' is neither"):
        prior.label_id("cow", ArgNames(label="--label"))
