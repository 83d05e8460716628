"""Which model backs an engine: a name (and a checkpoint) to a :class:`~microturn.contracts.ModelBackend`."""

from __future__ import annotations

from pathlib import Path

from microturn.contracts import ModelBackend

MODELS = ("echo", "tally", "reference")


def load_backend(name: str, checkpoint: Path | None = None, device: str = "cpu", processes: int = 1
                 ) -> ModelBackend:
    """Build the named model; ``reference`` loads ``checkpoint`` (a checkpoint folder; default: the trained ``tiny``
    one that ships with the repository), on CPU with its share of the cores when ``processes`` gateway processes
    each run one."""
    if name == "echo":
        from inference.echo import EchoModel

        return EchoModel()
    if name == "tally":
        from inference.tally import TallyModel

        return TallyModel()
    if name == "reference":
        from inference.checkpoint import SHIPPED
        from inference.reference import ReferenceModel, cpu_threads

        if checkpoint is None and not SHIPPED.is_dir():
            raise ValueError(f"the shipped checkpoint {SHIPPED} is missing; give --checkpoint DIR")
        return ReferenceModel.from_checkpoint(checkpoint or SHIPPED, device=device, threads=cpu_threads(processes))
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
