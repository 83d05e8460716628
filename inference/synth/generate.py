"""``microturn data synth``: render conversations in a process pool until the requested hours are reached.

Conversation ``i`` is drawn from its own generator (seed, i): its split (:func:`~inference.synth.splits.split_of`),
its scenario (the scenarios in a seeded order every nine conversations), its user voice (from its split's voices, a
rate and a pitch), its noise and its script; the voices and templates its split may use are drawn from the split
seed. So its bytes depend on the two seeds and ``i`` only, never on the number of workers. The set is the shortest
prefix ``0 … n−1`` whose audio reaches the requested hours; workers render ahead, and the main process writes the
prefix, in order, and nothing beyond it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from inference.synth import store
from inference.synth.noise import Noise
from inference.synth.scenarios import SCENARIOS, Director
from inference.synth.splits import SPLITS, Assignment, cycled, split_of
from inference.synth.timeline import LATENCY_TURNS, STOP_TURNS, TEXT_BYTES_PER_TURN, Timeline
from inference.synth.voices import MODEL_VOICE, USER_PITCHES, USER_RATES, Voice, english_voices, espeak_version
from inference.synth.voices import variants as voice_variants
from microturn.contracts import MICRO_TURN_SAMPLES, SAMPLE_RATE

FORMAT_VERSION = 1
PROGRESS_EVERY_S = 2.0


@dataclass(frozen=True)
class Summary:
    """What the manifest says about one conversation."""

    id: str
    split: str
    scenario: str
    seconds: float


@dataclass(frozen=True)
class Rendered:
    """One conversation as a worker hands it back: its summary and its files' bytes."""

    summary: Summary
    npz: bytes
    json: bytes


def conversation_id(index: int) -> str:
    return f"c{index:06d}"


def render(seed: int, index: int, assignment: Assignment) -> Rendered:
    """Conversation ``index`` of the set drawn from ``seed`` (runs in a worker process)."""
    split = split_of(seed, index)
    scenario = cycled(seed, 2, SCENARIOS, index)
    rng = np.random.default_rng([seed, 3, index])
    name, variant = assignment.voices[split][int(rng.integers(len(assignment.voices[split])))]
    voice = Voice(name, variant, int(rng.integers(USER_RATES[0], USER_RATES[1] + 1)),
                  int(rng.integers(USER_PITCHES[0], USER_PITCHES[1] + 1)))
    director = Director(Timeline(rng, voice, Noise.draw(rng)), assignment.templates[split])
    director.run(scenario)
    episode = director.tl.finish(conversation_id(index), split, scenario, director.phrasing,
                                 tail=float(rng.uniform(0.4, 1.2)))
    npz, meta = store.encode(episode)
    return Rendered(Summary(episode.id, split, scenario, episode.seconds), npz, meta)


def synthesize(out: Path, hours: float, seed: int, workers: int | None = None,
               progress: TextIO = sys.stderr, split_seed: int = 0) -> dict[str, Any]:
    """Write a data set of about ``hours`` of conversations to the new or empty folder ``out``; returns the manifest
    (also written to ``out/manifest.json``). ``split_seed`` draws which voices and phrasings each split may use:
    keep it to keep the test split held out from a model trained on another seed's set."""
    if hours <= 0:
        raise ValueError("--hours must be positive")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; synth writes a data set into a new or empty folder")
    workers = workers or os.cpu_count() or 1
    assignment = Assignment.draw(split_seed, english_voices(), voice_variants())
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    target = hours * 3600
    produced: list[Summary] = []
    total = 0.0
    began = last_report = time.monotonic()
    with ProcessPoolExecutor(workers) as pool:
        pending: deque[Future[Rendered]] = deque()
        submitted = 0
        while total < target:
            while len(pending) < 4 * workers:
                pending.append(pool.submit(render, seed, submitted, assignment))
                submitted += 1
            done = pending.popleft().result()
            summary = done.summary
            (out / summary.split / f"{summary.id}.npz").write_bytes(done.npz)
            (out / summary.split / f"{summary.id}.json").write_bytes(done.json)
            produced.append(summary)
            total += summary.seconds
            now = time.monotonic()
            if now - last_report >= PROGRESS_EVERY_S or total >= target:
                last_report = now
                estimate = max(len(produced), round(len(produced) * target / total))
                print(f"synth: {len(produced)}/~{estimate} conversations, {total:.0f}/{target:.0f} s of audio, "
                      f"{now - began:.1f} s elapsed ({total / (now - began):.1f} s of audio a second)",
                      file=progress, flush=True)
        for future in pending:
            future.cancel()
    manifest = _manifest(seed, split_seed, hours, produced, assignment)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _manifest(seed: int, split_seed: int, hours: float, produced: list[Summary],
              assignment: Assignment) -> dict[str, Any]:
    seconds = sum(r.seconds for r in produced)
    splits = {}
    for split in SPLITS:
        mine = [r for r in produced if r.split == split]
        splits[split] = {
            "conversations": [r.id for r in mine],
            "seconds": round(sum(r.seconds for r in mine), 3),
            "scenarios": {s: sum(r.scenario == s for r in mine) for s in SCENARIOS},
            "voices": [f"{name}+{variant}" for name, variant in assignment.voices[split]],
            "phrasings": assignment.phrasings(split),
        }
    counts = Counter(r.scenario for r in produced)
    return {
        "version": FORMAT_VERSION, "seed": seed, "split_seed": split_seed, "hours_requested": hours,
        "hours_produced": round(seconds / 3600, 6), "seconds_produced": round(seconds, 3),
        "conversations": len(produced), "sample_rate": SAMPLE_RATE, "micro_turn_samples": MICRO_TURN_SAMPLES,
        "latency_turns": LATENCY_TURNS, "stop_turns": STOP_TURNS, "text_bytes_per_turn": TEXT_BYTES_PER_TURN,
        "espeak_ng": espeak_version(), "model_voice": asdict(MODEL_VOICE),
        "scenarios": {s: counts[s] for s in SCENARIOS}, "splits": splits,
    }
