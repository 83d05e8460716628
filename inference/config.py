"""The reference model's one config dataclass, and its size presets.

Every size-dependent number of the reference interaction model lives here, with its default; the checkpoint
stores this dataclass as ``config.json`` so a checkpoint always rebuilds the exact model it was saved from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from microturn.contracts import MICRO_TURN_SAMPLES, PATCH, VIDEO_HEIGHT, VIDEO_WIDTH


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the reference model; the defaults are the ``tiny`` preset (realtime on 2 CPU cores)."""

    # trunk
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: heads share keys/values, which halves the KV cache
    rope_base: float = 10_000.0
    # mixture of experts (SwiGLU experts)
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 192  # hidden width of one routed expert
    d_shared: int = 192  # hidden width of the always-on shared expert; 0: no shared expert
    # text (bytes + specials, see inference.tokenizer)
    vocab_size: int = 264
    text_in: int = 4  # user-side text slots per micro-turn (PAD when empty); longer input waits its turn
    text_out: int = 3  # caption bytes the model writes per micro-turn (after its speak / silent token): 15 B/s
    # audio (dMel in, mel out)
    hop: int = 400  # 25 ms at 16 kHz: 40 frames per second, 8 per micro-turn
    n_fft: int = 1024
    n_mels: int = 80
    dmel_bins: int = 16
    dmel_bin_dim: int = 8  # width of one channel's bin embedding (80 of them are concatenated then projected)
    frames_per_token: int = 4  # dMel frames grouped into one audio token: 2 audio tokens per micro-turn
    audio_context: int = 0  # user frames before an audio-in token its audio encoder also hears; 0: no encoder
    audio_encoder_dim: int = 128  # channels of the audio encoder's convolutions (see inference.audio_encoder)
    # video (40x40 patches through a hierarchical MLP stem)
    video_height: int = VIDEO_HEIGHT
    video_width: int = VIDEO_WIDTH
    video_slots: int = 2  # patch tokens per micro-turn, scanning the latest frame: all 12 every 6 (1.2 s)
    video_thumbnail: bool = False  # the first slot carries the frame's thumbnail every micro-turn, the others scan
    stem_dims: tuple[int, int] = (48, 96)  # widths of the stem's 5x5 and 10x10 stages
    # flow head (rectified flow over one micro-turn of output mel)
    flow_dim: int = 256
    flow_layers: int = 3
    flow_steps: int = 4  # Euler steps at inference
    flow_text_turns: int = 4  # micro-turns of caption bytes (this one and those before) the head sees; 0: none
    # bounded attention (per session: sink tokens + sliding window; see inference.kv_cache)
    window: int = 512  # tokens a query may look back (besides the sinks)
    n_sink: int = 16  # first tokens of a session, kept for ever
    max_step_tokens: int = 14  # most tokens one session appends in one forward (one micro-turn: 14 in tiny)
    # sampling and vocoder
    temperature: float = 1.0  # of the caption bytes; 0: greedy
    decision_temperature: float = 1.0  # of the SPEAK/SILENT choice; 0: greedy (speak only when more likely than not)
    start_threshold: float = 0.0  # a silent model starts to speak only when p(SPEAK) is at least this; 0: no floor
    griffin_lim_iters: int = 4  # momentum Griffin-Lim converges fast; 4 keeps 16+ sessions realtime on CPU
    vocoder_context: int = 2  # mel frames of the previous micro-turn given to the vocoder for continuity

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError("d_model must split into n_heads heads of even width")
        if MICRO_TURN_SAMPLES % (self.hop * self.frames_per_token):
            raise ValueError("a micro-turn must hold a whole number of audio tokens")
        if self.video_height % PATCH or self.video_width % PATCH:
            raise ValueError(f"video sides must be multiples of {PATCH}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if self.max_step_tokens < self.turn_tokens:
            raise ValueError(f"max_step_tokens must hold one micro-turn ({self.turn_tokens} tokens)")
        if self.video_thumbnail and self.video_slots < 2:
            raise ValueError("video_thumbnail takes one video slot; the patches need at least one more")
        if self.temperature < 0 or self.decision_temperature < 0:
            raise ValueError("temperatures cannot be negative (0 is greedy)")
        if not 0.0 <= self.start_threshold <= 1.0:
            raise ValueError(f"start_threshold is a probability, from 0 to 1, not {self.start_threshold}")
        if self.audio_context < 0:
            raise ValueError("audio_context cannot be negative")
        if self.top_k > self.n_experts:
            raise ValueError("top_k cannot exceed n_experts")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def frames_per_turn(self) -> int:
        """dMel frames in one micro-turn (8 at 40 Hz)."""
        return MICRO_TURN_SAMPLES // self.hop

    @property
    def audio_tokens(self) -> int:
        """Audio tokens per micro-turn, each way (2: four frames each)."""
        return self.frames_per_turn // self.frames_per_token

    @property
    def turn_tokens(self) -> int:
        """Tokens of one micro-turn, user side and model side: the same for every micro-turn."""
        return self.text_in + self.video_slots + self.audio_tokens + 1 + self.text_out + self.audio_tokens

    @property
    def patches(self) -> int:
        """Patch tokens of one camera frame (12 for 160x120)."""
        return (self.video_height // PATCH) * (self.video_width // PATCH)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        values = dict(data)
        values.setdefault("flow_text_turns", 0)  # checkpoints saved before it existed have no caption context
        if "stem_dims" in values:
            values["stem_dims"] = tuple(values["stem_dims"])
        return cls(**values)


def _gpu(**shape: Any) -> ModelConfig:
    """A GPU preset: more text in per micro-turn and a better (slower) Griffin-Lim."""
    return ModelConfig(text_in=6, max_step_tokens=16, griffin_lim_iters=32, **shape)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(audio_context=28, video_thumbnail=True),
    "small": _gpu(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, n_experts=16, d_expert=512, d_shared=512,
                  window=2048, n_sink=32, flow_dim=512),
    "base": _gpu(d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4, n_experts=32, d_expert=704,
                 d_shared=1408, window=4096, n_sink=64, stem_dims=(96, 192), flow_dim=1024, flow_layers=4),
    "large": _gpu(d_model=2048, n_layers=24, n_heads=16, n_kv_heads=4, n_experts=64, top_k=4, d_expert=1024,
                  d_shared=2048, window=8192, n_sink=64, stem_dims=(128, 256), flow_dim=1536, flow_layers=6),
}


def preset(name: str) -> ModelConfig:
    """The named preset: ``tiny`` (CPU), ``small``, ``base``, ``large`` (GPU)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
