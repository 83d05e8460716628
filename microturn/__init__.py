"""microturn: a real-time, full-duplex, multimodal AI interaction service.

The path of one micro-turn (see DESIGN.md): browser media → ``webrtc_gateway`` (ingest, micro-turn clock) →
``inference`` (engine, model) → ``webrtc_gateway`` (playout, data channel) → browser. This package holds what the
parts share: the contracts between them (:mod:`microturn.contracts`), the settings (:mod:`microturn.config`) and the
command line (:mod:`microturn.cli`).
"""

__version__ = "0.1.0"
