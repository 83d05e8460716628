"""The reference interaction model: embeddings → decoder-only MoE transformer → text head and flow head.

Pure structure, read top to bottom: norm → rotary embedding → attention → block → model. ``forward`` takes a
packed ragged batch (the new tokens of many sessions, concatenated, no padding) and an
:class:`~inference.kv_cache.AttentionPlan` saying which rows belong to which sequence and where their keys
live; it knows nothing about sessions. Training and inference run this same code: training gives whole
sequences with no cache, the engine gives a micro-turn's tokens with each session's cache. """

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inference.audio_encoder import AudioEncoder
from inference.config import ModelConfig
from inference.flow_head import FlowHead
from inference.kv_cache import AttentionPlan
from inference.layout import AUDIO_IN, AUDIO_OUT, FEATURE, PATCH, TEXT, Tokens
from inference.moe import MoE, Routing
from inference.video import PatchStem


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for absolute ``positions`` (N,) → two (N, 1, head_dim / 2); angles in float64, exact at any
    position a long session reaches."""
    even = torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device)
    inv_freq = base ** (-even / head_dim)
    angles = positions.double()[:, None] * inv_freq[None]  # (N, D/2)
    return angles.cos().float()[:, None], angles.sin().float()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (N, H, D) pairs (x[..., :D/2], x[..., D/2:])."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention over each sequence's kept keys (its pool slot, or its own tokens)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], plan: AttentionPlan
                ) -> torch.Tensor:
        n, g = x.shape[0], self.n_heads // self.n_kv
        q, k, v = self.qkv(x).view(n, -1, self.head_dim).split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (N, H, D), (N, Hkv, D)
        pool = plan.pool
        if pool is None:
            keys, values = plan.pad(k), plan.pad(v)  # (B, Hkv, T, D)
        else:
            assert plan.row_slot is not None and plan.row_cache is not None and plan.slots is not None
            pool.k[self.layer, plan.row_slot, :, plan.row_cache] = k
            pool.v[self.layer, plan.row_slot, :, plan.row_cache] = v
            keys = pool.k[self.layer, plan.slots, :, :plan.used]  # (B, Hkv, used, D)
            values = pool.v[self.layer, plan.slots, :, :plan.used]
        b, t, d = plan.batch, plan.t_max, self.head_dim
        queries = plan.pad(q).reshape(b * self.n_kv, g * t, d)  # a group's queries share their keys
        keys, values = keys.reshape(b * self.n_kv, -1, d), values.reshape(b * self.n_kv, -1, d)
        scores = torch.baddbmm(plan.bias(self.n_kv, g), queries, keys.transpose(1, 2), alpha=d**-0.5)
        out = torch.bmm(scores.softmax(dim=-1), values)  # (B·Hkv, g·T, D)
        return self.proj(plan.unpad(out.view(b, self.n_heads, t, d)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, layer)
        self.norm2 = RMSNorm(cfg.d_model)
        self.moe = MoE(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.d_expert, cfg.d_shared)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], plan: AttentionPlan
                ) -> tuple[torch.Tensor, Routing]:
        x = x + self.attn(self.norm1(x), rope, plan)
        y, routing = self.moe(self.norm2(x))
        return x + y, routing


class DepthHead(nn.Module):
    """The model's text tokens of one micro-turn, one after another, from the trunk's state at its last user
    token: a small residual recurrence, so a micro-turn costs one trunk forward however many tokens it writes.

    ``z_0 = h``; ``z_{j+1} = z_j + MLP(norm(z_j + emb(token_j) + pos_j))``. ``z_j`` gives the logits of token
    ``j`` (``SPEAK``/``SILENT``, then the captions); the last state, after every token is known, conditions
    the flow head.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.emb = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Embedding(1 + cfg.text_out, d)
        self.norm = RMSNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.out_norm = RMSNorm(d)

    def step(self, z: torch.Tensor, token: torch.Tensor, j: int) -> torch.Tensor:
        """(B, d), (B,) → (B, d): the state after token ``j``."""
        return z + self.down(F.gelu(self.up(self.norm(z + self.emb(token) + self.pos.weight[j]))))


class ReferenceNet(nn.Module):
    """Embeddings, trunk, text head and flow head of the reference interaction model."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.text_emb = nn.Embedding(cfg.vocab_size, d)
        # dMel: one small embedding per (channel, bin), concatenated over channels and frames, then projected
        self.bin_emb = nn.Embedding(cfg.n_mels * cfg.dmel_bins, cfg.dmel_bin_dim)
        self.dmel_proj = nn.Linear(cfg.frames_per_token * cfg.n_mels * cfg.dmel_bin_dim, d)
        self.source = nn.Embedding(2, d)  # who made an audio token: 0 the user, 1 the model itself
        # the user's audio tokens also hear the frames before them (a word-long window), when audio_context > 0
        self.audio = (AudioEncoder(cfg.n_mels, cfg.dmel_bins, cfg.audio_context + cfg.frames_per_token,
                                   cfg.audio_encoder_dim, d) if cfg.audio_context else None)
        self.stem = PatchStem(d, cfg.stem_dims)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(d)
        self.depth = DepthHead(cfg)
        self.text_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.flow = FlowHead(d, cfg.frames_per_turn, cfg.n_mels, cfg.flow_dim, cfg.flow_layers, cfg.vocab_size,
                             cfg.flow_text_turns * cfg.text_out)
        self.register_buffer("channel_offset", torch.arange(cfg.n_mels) * cfg.dmel_bins, persistent=False)
        self.channel_offset: torch.Tensor

    def embed(self, tokens: Tokens) -> torch.Tensor:
        """(N,) mixed tokens → (N, d)."""
        x = torch.zeros(len(tokens), self.cfg.d_model, device=self.text_emb.weight.device)
        text_rows = (tokens.kind == TEXT).nonzero().squeeze(1)
        audio_rows = ((tokens.kind == AUDIO_IN) | (tokens.kind == AUDIO_OUT)).nonzero().squeeze(1)
        patch_rows = (tokens.kind == PATCH).nonzero().squeeze(1)
        feature_rows = (tokens.kind == FEATURE).nonzero().squeeze(1)
        x = x.index_put((text_rows,), self.text_emb(tokens.text[text_rows]))
        if len(audio_rows):
            bins = self.bin_emb(tokens.dmel + self.channel_offset)  # (Na, G, M, e)
            audio = self.dmel_proj(bins.flatten(1)) + self.source(tokens.kind[audio_rows] - AUDIO_IN)
            if self.audio is not None:
                heard = (tokens.kind[audio_rows] == AUDIO_IN).nonzero().squeeze(1)  # the user's, among audio_rows
                if len(heard) and tokens.before.shape[1] != self.cfg.audio_context:
                    raise ValueError(f"audio-in tokens carry {tokens.before.shape[1]} frames before them; this "
                                     f"model hears {self.cfg.audio_context}")
                if len(heard):
                    audio = audio.index_put((heard,), self.audio(tokens.heard_windows()), accumulate=True)
            x = x.index_put((audio_rows,), audio)
        if len(patch_rows):
            x = x.index_put((patch_rows,), self.stem(tokens.patches, tokens.grid))
        if len(feature_rows):
            x = x.index_put((feature_rows,), tokens.features)
        return x

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> tuple[torch.Tensor, list[Routing]]:
        """(N, d) embedded rows → (N, d) final hidden states, and each layer's routing."""
        rope = rope_tables(plan.positions, self.cfg.head_dim, self.cfg.rope_base)
        routings = []
        for block in self.blocks:
            x, routing = block(x, rope, plan)
            routings.append(routing)
        return self.norm(x), routings

    def text_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of the next text token from a depth state (B, d) → (B, vocab)."""
        return self.text_head(self.depth.out_norm(z))

    def teacher_forced(self, h: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth head over known tokens: (M, d) trunk states, (M, 1 + text_out) ids → logits (M, 1 + text_out,
        vocab) and flow conditioning (M, d)."""
        z, logits = h, []
        for j in range(tokens.shape[1]):
            logits.append(self.text_logits(z))
            z = self.depth.step(z, tokens[:, j], j)
        return torch.stack(logits, dim=1), z
