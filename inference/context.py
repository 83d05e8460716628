"""Context records: what one micro-turn of the reference model leaves behind so a session can be rebuilt.

Each :class:`~microturn.contracts.MicroTurnOutput` carries the record of its micro-turn in ``context``; a worker
given all of a session's records (``ReferenceModel.restore``) rebuilds exactly the state the original worker had.
A record holds model features and tokens only, never raw audio or video:

- the text slots the micro-turn consumed and the text ids that joined the session's queue in it (typed text,
  background results and control events, already tokenised with their ``USER``/``TOOL``/``EVENT`` markers);
- the video slots' patch features, after the patch stem (fp16; the live path rounds them the same way);
- the dMel bins of its input audio (4 bits each);
- the model's decision, caption ids and, when it spoke, its output mel (fp16, exactly as the live path used it:
  its dMel bins are the model's own audio tokens and its last frames are the vocoder's context).

Layout (little-endian; ``tiny``: F = 8 frames, M = 80 mels, V = 2 video slots, D = 192, C = 3 caption ids)::

    offset  size             field
    0       4                magic b"MTC2"
    4       8                index         i64   micro-turn index
    12      2                control       u16   SPEAK or SILENT
    14      2                n_text        u16   ids in the text slots (≤ text_in)
    16      2                n_new         u16   ids that joined the text queue
    18      1                flags         u8    bit 0: video present, bit 1: spoke (mel present); others 0
    19      2·(n_text+n_new+C)  ids       u16   text-slot ids, new ids, caption ids
    ..      F·M/2            bins          u8    input dMel bins, two per byte (low nibble first), row-major (F, M)
    ..      2·V·D            video         f16   (V, D) stem features            [flag bit 0]
    ..      2·F·M            mel           f16   (F, M) output log10 mel          [flag bit 1]
    end-8   8                link                blake2b-64 of everything before it, keyed with the previous link

The link chains a session's records: the first is keyed with :func:`first_link` of the session seed, each next one
with the link of the one before. A record that was corrupted, lost, repeated, reordered or taken from another
session therefore fails :meth:`TurnRecord.decode` with a :class:`ValueError` instead of rebuilding a subtly
different session. Sizes for ``tiny`` (no text): 351 bytes silent without camera, 1,119 with camera,
2,399 with camera and speech; each text id adds 2.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch

from inference import tokenizer

MAGIC = b"MTC2"
LINK = 8
"""Bytes of the chained digest that ends every record."""
_HEADER = struct.Struct("<4sqHHHB")
_VIDEO, _SPOKE = 1, 2
_NO_BINS = torch.zeros(0, dtype=torch.long)


def first_link(seed: int) -> bytes:
    """The key of a session's first record: a function of the session seed."""
    return hashlib.blake2b(f"microturn-reference:{seed}".encode(), digest_size=LINK).digest()


def _link(previous: bytes, body: bytes | memoryview) -> bytes:
    return hashlib.blake2b(body, digest_size=LINK, key=previous).digest()


@dataclass(frozen=True)
class RecordShape:
    """The sizes a record of one model config has (from :class:`~inference.config.ModelConfig`)."""

    text_in: int
    text_out: int
    frames: int
    n_mels: int
    video_slots: int
    d_model: int
    vocab_size: int


@dataclass
class TurnRecord:
    """One micro-turn, as a session needs it to be rebuilt.

    A record decoded with ``payload=False`` has its ids and decision but no tensors (``audio_bins`` empty,
    ``video`` and ``mel`` None whatever the flags say): restore reads only the last window's payloads.
    """

    index: int
    text_slots: list[int]  # the ids the user side's text slots carried (without padding)
    new_text: list[int]  # ids that joined the session's text queue in this micro-turn
    video: torch.Tensor | None  # (video_slots, d_model) fp16 patch features, None without a camera
    audio_bins: torch.Tensor  # (frames, n_mels) dMel bins of the input
    control: int
    caption: list[int]
    mel: torch.Tensor | None  # (frames, n_mels) fp16 output log-mel when the model spoke

    @property
    def spoke(self) -> bool:
        return self.control == tokenizer.SPEAK

    def encode(self, previous: bytes) -> bytes:
        """The record's bytes, chained to ``previous`` (the last record's link, or :func:`first_link`)."""
        flags = (_VIDEO if self.video is not None else 0) | (_SPOKE if self.mel is not None else 0)
        parts = [_HEADER.pack(MAGIC, self.index, self.control, len(self.text_slots), len(self.new_text), flags),
                 np.asarray(self.text_slots + self.new_text + self.caption, dtype="<u2").tobytes()]
        bins = self.audio_bins.to(torch.uint8).numpy().reshape(-1)
        parts.append((bins[0::2] | (bins[1::2] << 4)).astype(np.uint8).tobytes())
        if self.video is not None:
            parts.append(self.video.to(torch.float16).numpy().astype("<f2").tobytes())
        if self.mel is not None:
            parts.append(self.mel.to(torch.float16).numpy().astype("<f2").tobytes())
        body = b"".join(parts)
        return body + _link(previous, body)

    @staticmethod
    def link_of(data: bytes) -> bytes:
        """The link a record ends with (the key of the next record)."""
        return bytes(data[-LINK:])

    @classmethod
    def decode(cls, data: bytes, shape: RecordShape, previous: bytes, payload: bool = True) -> TurnRecord:
        """Parse and check one record that must follow the record whose link is ``previous``."""
        if len(data) < _HEADER.size + LINK:
            raise ValueError(f"context record of {len(data)} bytes is too short")
        magic, index, control, n_text, n_new, flags = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"not a reference-model context record (magic {magic!r}, expected {MAGIC!r})")
        if flags & ~(_VIDEO | _SPOKE):
            raise ValueError(f"context record {index}: unknown flags {flags:#x}")
        n_ids = n_text + n_new + shape.text_out
        bins_at = _HEADER.size + 2 * n_ids
        video_at = bins_at + shape.frames * shape.n_mels // 2
        mel_at = video_at + (2 * shape.video_slots * shape.d_model if flags & _VIDEO else 0)
        end = mel_at + (2 * shape.frames * shape.n_mels if flags & _SPOKE else 0)
        if end + LINK != len(data):
            raise ValueError(f"context record {index}: {len(data)} bytes, expected {end + LINK} "
                             "(a record of another model config?)")
        view = memoryview(data)
        if _link(previous, view[:end]) != bytes(view[end:]):
            raise ValueError(f"context record {index} does not follow the records before it "
                             "(corrupt, lost, repeated, reordered, or from another session)")
        ids = np.frombuffer(data, dtype="<u2", count=n_ids, offset=_HEADER.size).tolist()
        text_slots, new_text, caption = ids[:n_text], ids[n_text:n_text + n_new], ids[n_text + n_new:]
        spoke = control == tokenizer.SPEAK
        if (control not in (tokenizer.SPEAK, tokenizer.SILENT) or spoke != bool(flags & _SPOKE)
                or n_text > shape.text_in or max(ids, default=0) >= shape.vocab_size
                or max(caption, default=0) > tokenizer.PAD
                or (not spoke and caption.count(tokenizer.PAD) != len(caption))):
            raise ValueError(f"context record {index}: inconsistent fields")
        if not payload:
            return cls(index, text_slots, new_text, None, _NO_BINS, control, caption, None)
        packed = np.frombuffer(data, dtype=np.uint8, count=video_at - bins_at, offset=bins_at)
        bins = np.empty(2 * packed.size, dtype=np.int64)
        bins[0::2], bins[1::2] = packed & 0x0F, packed >> 4
        video = mel = None
        if flags & _VIDEO:
            video = torch.from_numpy(np.frombuffer(data, dtype="<f2", count=shape.video_slots * shape.d_model,
                                                   offset=video_at).astype(np.float16)
                                     .reshape(shape.video_slots, shape.d_model))
        if flags & _SPOKE:
            mel = torch.from_numpy(np.frombuffer(data, dtype="<f2", count=shape.frames * shape.n_mels,
                                                 offset=mel_at).astype(np.float16).reshape(shape.frames, shape.n_mels))
        if any(t is not None and not bool(torch.isfinite(t).all()) for t in (video, mel)):
            raise ValueError(f"context record {index}: non-finite features")
        return cls(index, text_slots, new_text, video, torch.from_numpy(bins).reshape(shape.frames, shape.n_mels),
                   control, caption, mel)
