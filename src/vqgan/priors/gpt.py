"""A GPT-2 style decoder-only transformer over token sequences (the stage-2 prior of Taming Transformers).

Pre-LayerNorm blocks, causal self-attention through `scaled_dot_product_attention`, GELU MLP, learned
position embeddings. Module names follow minGPT as taming uses it (`tok_emb`, `pos_emb`, `blocks.i.attn.query`,
`mlp.0`, `ln_f`, `head`), so its checkpoints convert by key copy. `forward` takes a KV cache so that sampling
a growing prefix costs one position per new token.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import from_dict
from ..errors import UserError
from ..native.decode import decode_step
from ..registry import MODELS
from .kv_cache import KVCache
from .linear import Linear, linear


@dataclass
class GPTConfig:
    vocab_size: int = 1024
    block_size: int = 256  # the longest sequence (condition tokens + image tokens - 1)
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    n_unmasked: int = 0  # the first n positions attend to each other both ways (taming's prefix option)

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise UserError(f"gpt.n_embd {self.n_embd} must be divisible by gpt.n_head {self.n_head}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_unmasked = cfg.n_unmasked
        self.key = Linear(cfg.n_embd, cfg.n_embd)
        self.query = Linear(cfg.n_embd, cfg.n_embd)
        self.value = Linear(cfg.n_embd, cfg.n_embd)
        self.proj = Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, past: int = 0) -> torch.Tensor:
        """`past`: how many positions precede x (all in `cache`)."""
        b, t, c = x.shape
        # one matmul for the three projections: (B, T, 3, nh, hd)
        qkv = linear(x, *self._qkv_weights()).view(b, t, 3, self.n_head, c // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hd)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        dropout = self.attn_dropout if self.training else 0.0
        if past == 0 and self.n_unmasked == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif t == 1 and self.n_unmasked == 0:  # one new position sees everything before it
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(past, t, x.device), dropout_p=dropout)
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_drop(self.proj(y))

    def _qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """query/key/value stacked into one (3C, C) matrix; kept between calls while no weight changes."""
        params = (self.query.weight, self.key.weight, self.value.weight, self.query.bias, self.key.bias, self.value.bias)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return torch.cat(params[:3]), torch.cat(params[3:])  # differentiable
        stamp = tuple((p.data_ptr(), p._version) for p in params)
        if getattr(self, "_fused_stamp", None) != stamp:
            self._fused = (torch.cat(params[:3]).detach(), torch.cat(params[3:]).detach())
            self._fused_stamp = stamp
        return self._fused

    def _mask(self, past: int, t: int, device: torch.device) -> torch.Tensor:
        """Query positions past..past+t-1 may see keys 0..their own position (and the unmasked prefix)."""
        rows = torch.arange(past, past + t, device=device)[:, None]
        cols = torch.arange(past + t, device=device)[None, :]
        return (cols <= rows) | ((rows < self.n_unmasked) & (cols < self.n_unmasked))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, past: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer, past)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.block_size, config.n_embd))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer, self.config.block_size)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """With a cache, `idx` holds only the new positions, which follow the cached ones."""
        t = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + t > self.config.block_size:
            raise ValueError(f"sequence of {start + t} tokens exceeds block_size {self.config.block_size}")
        if cache is not None and t == 1 and start >= self.config.n_unmasked and not self.training \
                and not torch.is_grad_enabled():
            return self._next_position(idx, cache)
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, start:start + t])
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, start)
        if cache is not None:
            cache.advance(t)
        return self.head(self.ln_f(x))

    def _next_position(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`forward` for one new position after cached ones, at inference: the same arithmetic without the module
        calls and attribute lookups, which cost a third as much as the arithmetic in a small model's sampling step
        on CPU. The weights are gathered once per cache: a cache serves one set of weights. On CPU the whole step
        runs in C where the kernel can be built (vqgan.native.decode), 2-4x faster than these PyTorch ops."""
        b, c, n_head, eps = idx.shape[0], self.config.n_embd, self.config.n_head, self.ln_f.eps
        if cache.weights is None:
            cache.weights = [(*attn._qkv_weights(), attn.proj.weight, attn.proj.bias, block.ln1.weight, block.ln1.bias,
                              block.ln2.weight, block.ln2.bias, *block.mlp[0].parameters(), *block.mlp[2].parameters())
                             for block in self.blocks for attn in [block.attn]]
            if idx.device.type == "cpu":
                cache.native = decode_step(self, cache.weights, cache, b)
        if cache.native is not None and cache.native.batch == b:
            logits = cache.native(idx[:, 0], cache.length)
            cache.advance(1)
            return logits[:, None]
        x = self.tok_emb.weight[idx[:, 0]] + self.pos_emb[0, cache.length]  # (B, C)
        for i, (w_qkv, b_qkv, w_proj, b_proj, w_ln1, b_ln1, w_ln2, b_ln2, w_fc1, b_fc1, w_fc2, b_fc2) \
                in enumerate(cache.weights):
            h = F.layer_norm(x, (c,), w_ln1, b_ln1, eps)
            q, k, v = linear(h, w_qkv, b_qkv).reshape(b, 3, n_head, 1, c // n_head).unbind(1)
            k, v = cache.append(i, k, v)
            y = F.scaled_dot_product_attention(q.contiguous(), k, v).view(b, c)  # contiguous q: the fused kernel
            x = x + linear(y, w_proj, b_proj)
            h = F.layer_norm(x, (c,), w_ln2, b_ln2, eps)
            x = x + linear(F.gelu(linear(h, w_fc1, b_fc1)), w_fc2, b_fc2)
        cache.advance(1)
        x = F.layer_norm(x, (c,), self.ln_f.weight, self.ln_f.bias, eps)
        return linear(x, self.head.weight)[:, None]

    def config_dict(self) -> dict[str, Any]:
        return {"kind": "gpt", **asdict(self.config)}

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> GPT:
        return cls(from_dict(GPTConfig, {k: v for k, v in data.items() if k not in ("kind", "conditioning")}, "gpt"))


MODELS.register("gpt")(GPT.from_config_dict)  # `load_model` builds a saved prior (config kind: gpt) with this
