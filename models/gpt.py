"""Character-level GPT (decoder-only transformer), the size of the classic "GPT from scratch"
lecture model: n_embd 384, 6 heads, 6 layers, context 256, dropout 0.2.

Pre-LN blocks: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``, a 4x MLP (Linear, GELU, Linear
adjacent in one nn.Sequential, so ``dlh.patch`` can fuse the GELU into the first matmul), a
final LayerNorm before the head. Attention: one fused QKV projection, heads of size
n_embd / n_head, ``F.scaled_dot_product_attention(..., is_causal=True)`` with its default scale
1 / sqrt(head size).

Fixed from the seed notebook: it never applied the final LayerNorm (the head read the last
block's un-normalised residual stream); here ``ln_f`` runs before ``lm_head``. The scores are
scaled by the head size (1 / sqrt(n_embd / n_head)), not by the embedding width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import VOCAB


@dataclass
class GPTConfig:
    vocab_size: int = len(VOCAB)
    block_size: int = 256
    n_embd: int = 384
    n_head: int = 6
    n_layer: int = 6
    dropout: float = 0.2
    bias: bool = True

    @classmethod
    def small(cls) -> "GPTConfig":
        return cls(block_size=32, n_embd=64, n_head=4, n_layer=2, dropout=0.0)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused Q, K, V
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                                   # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)                      # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias), nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias), nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} > block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        x = self.ln_f(self.blocks(x))                         # the final norm, applied
        return self.lm_head(x)                                # (B, T, vocab) logits

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None, top_k: int | None = None) -> torch.Tensor:
        """Append new_tokens characters sampled from the model to idx (B, T): each from the
        softmax of the last position's logits / temperature (temperature 0: the most likely
        character), restricted to the top_k most likely ones when top_k is given. The context
        is the last block_size characters."""
        for _ in range(new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                if generator is not None and generator.device != probs.device:
                    nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
                else:
                    nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
