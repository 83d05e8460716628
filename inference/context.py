"""Context records: what one micro-turn of the reference model leaves behind so a session can be rebuilt.

Each :class:`~microturn.contracts.MicroTurnOutput` carries the record of its micro-turn in ``context``; a worker
given all of a session's records (``ReferenceModel.restore``) rebuilds exactly the state the original worker had.
A record holds model features and tokens only, never raw audio or video:

- the text slots the micro-turn consumed and the text that joined the session's queue in it (ids);
- the video slots' patch features, after the patch stem (fp16; the live path rounds them the same way);
- the dMel bins of its input audio (4 bits each);
- the model's decision, caption ids and, when it spoke, its output mel (fp16, as generated).

Layout (little-endian): magic ``MTC1``, then ``index:i64 control:u16 n_text:u16 n_new:u16 flags:u8``, the text
slot ids and new ids (u16), the caption ids (u16), the packed bins, then the video features and the mel when
their flag is set. About 2 KB a micro-turn with camera and speech, 0.4 KB without.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"MTC1"
_HEADER = struct.Struct("<4sqHHHB")
_VIDEO, _SPOKE = 1, 2


@dataclass
class TurnRecord:
    """One micro-turn, as a session needs it to be rebuilt."""

    index: int
    text_slots: list[int]  # the ids the user side's text slots carried (without padding)
    new_text: list[int]  # ids that joined the session's text queue in this micro-turn
    video: torch.Tensor | None  # (video_slots, d_model) fp16 patch features, None without a camera
    audio_bins: torch.Tensor  # (frames, n_mels) dMel bins of the input
    control: int
    caption: list[int]
    mel: torch.Tensor | None  # (frames, n_mels) fp16 output log-mel when the model spoke

    def encode(self) -> bytes:
        flags = (_VIDEO if self.video is not None else 0) | (_SPOKE if self.mel is not None else 0)
        parts = [_HEADER.pack(MAGIC, self.index, self.control, len(self.text_slots), len(self.new_text), flags),
                 np.asarray(self.text_slots + self.new_text + self.caption, dtype="<u2").tobytes()]
        bins = self.audio_bins.to(torch.uint8).numpy().reshape(-1)
        parts.append((bins[0::2] | (bins[1::2] << 4)).astype(np.uint8).tobytes())
        if self.video is not None:
            parts.append(self.video.to(torch.float16).numpy().astype("<f2").tobytes())
        if self.mel is not None:
            parts.append(self.mel.to(torch.float16).numpy().astype("<f2").tobytes())
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, text_out: int, frames: int, n_mels: int, video_slots: int, d_model: int
               ) -> TurnRecord:
        magic, index, control, n_text, n_new, flags = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError("not a reference-model context record")
        at = _HEADER.size
        ids = np.frombuffer(data, dtype="<u2", count=n_text + n_new + text_out, offset=at).tolist()
        at += 2 * len(ids)
        packed = np.frombuffer(data, dtype=np.uint8, count=frames * n_mels // 2, offset=at)
        at += packed.size
        bins = np.empty(frames * n_mels, dtype=np.uint8)
        bins[0::2], bins[1::2] = packed & 0x0F, packed >> 4
        video = mel = None
        if flags & _VIDEO:
            video = torch.from_numpy(np.frombuffer(data, dtype="<f2", count=video_slots * d_model, offset=at)
                                     .astype(np.float16).reshape(video_slots, d_model).copy())
            at += 2 * video_slots * d_model
        if flags & _SPOKE:
            mel = torch.from_numpy(np.frombuffer(data, dtype="<f2", count=frames * n_mels, offset=at)
                                   .astype(np.float16).reshape(frames, n_mels).copy())
            at += 2 * frames * n_mels
        if at != len(data):
            raise ValueError(f"context record of {len(data)} bytes, expected {at}")
        return cls(index, ids[:n_text], ids[n_text:n_text + n_new],
                   video, torch.from_numpy(bins.astype(np.int64)).reshape(frames, n_mels), control,
                   ids[n_text + n_new:], mel)
