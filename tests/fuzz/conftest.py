"""Fuzz profiles: how many examples each fuzz test runs.

CI runs the short profile (``VIRTNET_FUZZ_EXAMPLES`` unset: 300 per test). The long
run (docs/conformance.md, "Fuzzing") sets it to hundreds of thousands per test:

    VIRTNET_FUZZ_EXAMPLES=250000 nice -n 10 flock /tmp/virtnet-heavy.lock \\
        .venv/bin/python -m pytest tests/fuzz -q --timeout=3000 --hypothesis-show-statistics

(``--timeout``: a long run of one test outlasts the suite's 300 s per test.)
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

SHORT = 300


def fuzz_settings() -> settings:
    """One example budget for every fuzz test; no example database, no deadline."""
    examples = int(os.environ.get("VIRTNET_FUZZ_EXAMPLES", SHORT))
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        # The long run is about breadth: generate and shrink what fails, skip replay.
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
