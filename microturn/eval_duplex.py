"""``microturn eval duplex``: play held-out conversations to a model and score its full-duplex behaviour.

``--via offline`` steps the model directly (the engine's backend; output k placed at micro-turn k + 1, as the
gateway plays it); ``--via webrtc`` starts a gateway process with the checkpoint and plays each conversation through
a browser-like aiortc client in real time — the microphone carries the user's audio, the camera the conversation's
frames (nothing while the camera is off), the data channel the typed text at its micro-turn — and records the reply
time-aligned with the input. Background results come from the gateway's real background model there; offline, the
conversation's scripted results are given to the model at their micro-turns. Metrics: :mod:`inference.duplex_eval`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.conversation import Conversation, conversations
from inference.duplex_eval import Played, Recogniser, candidates, plot_timelines, score, summarise
from inference.models import load_backend
from microturn.client import ProbeClient
from microturn.contracts import MICRO_TURN_SAMPLES, MicroTurn
from microturn.local import free_port, serve, stop
from webrtc_gateway.ice import use_host_addresses
from webrtc_gateway.resample import Decimator, Interpolator

if TYPE_CHECKING:
    from inference.model import ReferenceNet


def _test_files(set_dir: Path) -> list[Path]:
    return conversations(set_dir / "test") if (set_dir / "test").is_dir() else conversations(set_dir)


def play_offline(conv: Conversation, model: Any, session_id: str = "eval", seed: int = 0) -> Played:
    """Step ``model`` (a :class:`~microturn.contracts.ModelBackend`) through the conversation, its session seeded
    ``seed`` (the gateway draws a random one)."""
    model.open(session_id, seed)
    audio = np.zeros(len(conv.user_audio) + MICRO_TURN_SAMPLES, np.float32)
    captions: dict[int, str] = {}
    try:
        for k in range(conv.turns):
            span = slice(k * MICRO_TURN_SAMPLES, (k + 1) * MICRO_TURN_SAMPLES)
            turn = MicroTurn(session_id, k, conv.user_audio[span].astype(np.float32),
                             conv.video[k] if conv.camera[k] else None, tuple(conv.meta["user_text"][k]),
                             background=tuple(conv.meta["background"][k]))
            out = model.step([turn])[0]
            start = (k + 1) * MICRO_TURN_SAMPLES
            audio[start:start + len(out.audio)] = out.audio
            if out.text:
                captions[k] = out.text
    finally:
        model.close(session_id)
    return Played(audio[: len(conv.user_audio)], captions)


async def play_webrtc(conv: Conversation, url: str, tail_s: float = 1.0) -> Played:
    """Play the conversation to the gateway at ``url`` like a browser, in real time."""
    seconds = len(conv.user_audio) / 16_000
    signal = Interpolator().process(np.concatenate([conv.user_audio, np.zeros(16_000, np.float32)]))
    client = ProbeClient(url, signal, camera=(conv.video, conv.camera))
    try:
        await client.connect()
        for k, texts in enumerate(conv.meta["user_text"]):
            for text in texts:
                await asyncio.sleep(max(0.0, k * 0.2 + 0.05 - client.now()))
                client.send({"type": "text", "text": text})
        await asyncio.sleep(max(0.0, seconds + tail_s - client.now()))
    finally:
        await client.close()
    out = Decimator().process(client.output(seconds)[: int(seconds * 48_000) // 3 * 3])
    captions: dict[int, str] = {}
    for c in client.captions():
        captions[int(c["turn"])] = captions.get(int(c["turn"]), "") + str(c["text"])
    return Played(out[: len(conv.user_audio)].astype(np.float32), captions)


def as_the_path_plays(played: Played) -> Played:
    """``played`` with its audio one micro-turn later, as the path plays a model's output ``k`` during micro-turn
    ``k + 1``: what the diagnostics that speak the targets' own micro-turns (``oracle``, ``oracle-gl``,
    ``teacher-forced``) would sound like from a model. Captions stay keyed by the micro-turn they were written for."""
    audio = np.zeros_like(played.audio)
    audio[MICRO_TURN_SAMPLES:] = played.audio[:-MICRO_TURN_SAMPLES]
    return Played(audio, played.captions)


def _target_captions(conv: Conversation) -> dict[int, str]:
    """The conversation's target captions, by micro-turn, as :class:`Played` holds a model's."""
    return {k: text for k, text in enumerate(conv.meta["model_text"]) if text}


def griffin_lim(audio: np.ndarray, iters: int) -> np.ndarray:
    """``audio`` → its log-mel, micro-turn by micro-turn (as the model's flow head makes it) → Griffin-Lim."""
    import torch

    from inference import dmel
    from inference.vocoder import GriffinLim

    turns = torch.from_numpy(audio.reshape(-1, MICRO_TURN_SAMPLES).copy())
    mel = dmel.micro_turn_log_mel(turns).reshape(1, -1, dmel.N_MELS)  # (1, frames, 80)
    out = GriffinLim(iters)(mel)[0].numpy().astype(np.float32)
    return np.pad(out, (0, max(0, len(audio) - len(out))))[: len(audio)]


def play_teacher_forced(conv: Conversation, net: ReferenceNet) -> Played:
    """The audio head's ceiling: the checkpoint's flow head speaks the conversation's target micro-turns, with the
    trunk and depth head teacher-forced on the targets (so every word and every turn is right), and its mel goes
    through the model's Griffin-Lim; the captions are the targets'."""
    import torch

    from inference import dmel, tokenizer
    from inference.conversation import examples
    from inference.layout import TurnLayout
    from inference.train import build_batch, teacher_forced
    from inference.vocoder import GriffinLim

    cfg, on = net.cfg, next(net.parameters()).device
    batch = build_batch(TurnLayout.of(cfg), [examples(conv, cfg)])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = teacher_forced(net, batch).cond
        noise = torch.randn(len(cond), cfg.frames_per_turn * cfg.n_mels, generator=generator).to(on)
        mel = net.flow.sample(cond, batch.flow_text(cfg.flow_text_turns).to(on), noise, cfg.flow_steps).cpu()
        silent = batch.text_targets[:, 0] != tokenizer.SPEAK
        mel[silent] = dmel.LOG_MIN
        audio = GriffinLim(cfg.griffin_lim_iters)(mel.reshape(1, -1, cfg.n_mels))[0].numpy()
    audio[np.repeat(silent.numpy(), MICRO_TURN_SAMPLES)] = 0.0
    return Played(audio[: len(conv.user_audio)].astype(np.float32), _target_captions(conv))


def eval_duplex(checkpoint: Path | None, set_dir: Path, via: str = "offline", limit: int | None = None,
                plot: Path | None = None, device: str = "cpu", model: str = "reference",
                seed: int = 0, scores: Path | None = None) -> dict[str, Any]:
    """Score the model on the test conversations of ``set_dir``; returns the JSON ``eval duplex`` prints.
    ``model`` ``echo`` (no checkpoint) is the diagnostic: its speech is the user's, one micro-turn later; ``oracle``
    scores the conversations' own targets as the path would play them (the best a model can get); ``teacher-forced``
    the checkpoint's audio head alone (:func:`play_teacher_forced`), played the same way. ``seed`` seeds every
    offline session's sampling. ``scores``: write each conversation's counts there too, a JSON line each (its id,
    scenario and :class:`ConversationScore`), to find which conversations a model loses turns or pauses in."""
    files = _test_files(set_dir)[:limit]
    convs = [Conversation.load(f) for f in files]
    recognise = Recogniser(candidates([c.meta for c in convs]))
    played: list[Played] = []
    if model == "oracle":  # the conversation's own target: what a perfect model would do (the metrics' ceiling)
        played = [as_the_path_plays(Played(c.model_audio, _target_captions(c))) for c in convs]
    elif model.startswith("oracle-gl"):  # the targets' mel through Griffin-Lim: a perfect model's ceiling with it
        iters = int(model.removeprefix("oracle-gl") or 4)
        played = [as_the_path_plays(Played(griffin_lim(c.model_audio, iters), _target_captions(c))) for c in convs]
    elif model == "teacher-forced":
        from inference.checkpoint import SHIPPED, load_checkpoint

        net = load_checkpoint(checkpoint or SHIPPED, device)
        played = [as_the_path_plays(play_teacher_forced(c, net)) for c in convs]
    elif via == "offline":
        backend = load_backend(model, checkpoint, device)
        for i, conv in enumerate(convs):
            played.append(play_offline(conv, backend, f"eval-{i}", seed))
            print(f"\reval: {i + 1}/{len(convs)} conversations", end="", file=sys.stderr, flush=True)
    elif via == "webrtc":
        use_host_addresses(["127.0.0.1"])
        port = free_port()
        extra = ["--checkpoint", str(checkpoint)] if checkpoint is not None else []
        proc = serve(port, "--model", model, "--device", device, *extra)
        try:
            for i, conv in enumerate(convs):
                played.append(asyncio.run(play_webrtc(conv, f"http://127.0.0.1:{port}")))
                print(f"\reval: {i + 1}/{len(convs)} conversations", end="", file=sys.stderr, flush=True)
        finally:
            stop(proc, kill=True)
    else:
        raise ValueError(f"--via must be offline or webrtc, not {via!r}")
    print(file=sys.stderr)
    each = [score(c.meta, p, recognise) for c, p in zip(convs, played, strict=True)]
    result = summarise(each)
    if scores is not None:
        scores.write_text("".join(json.dumps({"id": f.stem, "scenario": c.meta.get("scenario"), **asdict(s)}) + "\n"
                                  for f, c, s in zip(files, convs, each, strict=True)))
        result["scores"] = str(scores)
    result["via"], result["model"] = via, model
    if plot is not None:
        plot_timelines([(f.stem, c.meta, p) for f, c, p in zip(files, convs, played, strict=True)][:6], plot)
        result["timeline_png"] = str(plot)
    return result
