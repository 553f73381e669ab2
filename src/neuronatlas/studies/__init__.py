"""Studies: one module per paper experiment, each built on :mod:`neuronatlas.studies.framework`.

    >>> from neuronatlas.studies import run
    >>> from neuronatlas.studies.relations import RelationStudyConfig
    >>> result = run(lm, RelationStudyConfig(), "out/relations")     # doctest: +SKIP
    >>> result.findings                                               # doctest: +SKIP

``run(lm, config, out)`` is the one entry point: the config's class names the study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["run", "STUDIES"]

STUDIES = ("relations", "languages", "clamp", "culture", "emotions", "neurofeedback", "self-report")


def run(lm: Any, config: Any, out: str | Path, **kwargs: Any) -> Any:
    """Run (or resume) the study that ``config`` belongs to; see :func:`neuronatlas.studies.framework.run`."""
    from neuronatlas.studies import (  # noqa: F401  (registers the studies)
        clamp, culture, emotions, languages, neurofeedback, relations, self_report,
    )
    from neuronatlas.studies.framework import run as _run

    return _run(lm, config, out, **kwargs)
