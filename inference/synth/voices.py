"""The voices of synthetic conversations: espeak-ng English voices × variants for the user, one fixed model voice.

A voice's identity is its espeak-ng ``name`` (an English voice, e.g. ``en-gb-scotland``) and ``variant`` (e.g.
``klatt3``); ``rate`` (words per minute) and ``pitch`` (0–99) vary per conversation and are not part of it. The
inventory is read from the installed espeak-ng (``--voices=en``, ``--voices=variant``), sorted, so that the same
espeak-ng data gives the same voices; the manifest records what was used.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Voice:
    """One espeak-ng voice at one speaking rate and pitch."""

    name: str
    variant: str
    rate: int  # words per minute (espeak-ng -s)
    pitch: int  # 0–99 (espeak-ng -p)

    @property
    def identity(self) -> str:
        """``name+variant``: what the split assignment keeps apart (espeak-ng's own spelling of it)."""
        return f"{self.name}+{self.variant}"


MODEL_VOICE = Voice("en-us", "f2", rate=165, pitch=50)
"""The model's one voice; its variant is never given to a user. Of the female variants, pocketsphinx (the duplex
evaluation's recogniser) heard ``f2`` best: 33 of 37 isolated answer words, against 30 for ``f3``."""

USER_RATES = (130, 200)
USER_PITCHES = (20, 80)

_VARIANT = re.compile(r"!v/(\S+)\s*(?:\(\S+ \d+\)\s*)*$")  # the file column, then only "(language priority)"


def _listing(arg: str) -> list[str]:
    return subprocess.run(["espeak-ng", arg], check=True, capture_output=True, text=True).stdout.splitlines()[1:]


def english_voices() -> tuple[str, ...]:
    """The installed espeak-ng (not MBROLA) English voices, e.g. ``en-us``, ``en-gb-x-rp``."""
    names = {line.split()[1] for line in _listing("--voices=en") if "mb/" not in line}
    return tuple(sorted(n for n in names if n.startswith("en")))


def variants() -> tuple[str, ...]:
    """The installed espeak-ng voice variants a user may speak with (all but the model's; file names with spaces
    cannot be named on the command line and are left out)."""
    found = {m.group(1) for line in _listing("--voices=variant") if (m := _VARIANT.search(line))}
    return tuple(sorted(found - {MODEL_VOICE.variant}))


def espeak_version() -> str:
    """espeak-ng's version line, e.g. ``eSpeak NG text-to-speech: 1.51  Data at: …`` → ``1.51``."""
    out = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout
    return out.split(":")[1].split()[0]
