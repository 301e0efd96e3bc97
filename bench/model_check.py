"""The lifecycle's model checker, run longer than CI does.

    python bench/model_check.py [--steps 50000]

Runs the rule-based state machine of tests/integration/test_lifecycle_model.py (the real agent on a real
directory, in this process) for about ``--steps`` random steps, randomly seeded (CI runs 2,000 derandomized), and prints the steps per rule and the wall time. A failure prints Hypothesis' shortest sequence that
breaks an invariant: make it a named regression test in that file (the "found" tests).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50_000)
    args = parser.parse_args()
    from hypothesis import HealthCheck, settings

    import tests.integration.test_lifecycle_model as model
    from edgeops.signing import generate_key
    from labkit.repo import copy_repo
    from tests.integration.test_device_local import releases

    base = Path(tempfile.mkdtemp(prefix="edgeops-model-"))
    generate_key(base / "release_key", "model release key")
    model.Lifecycle.releases = releases(copy_repo(base / "repo"), model.COUNT)
    model.Lifecycle.key, model.Lifecycle.base = base / "release_key", base
    per_run = 25
    runner = model.Lifecycle.TestCase
    runner.settings = settings(max_examples=max(1, args.steps * 3 // (per_run * 2)), stateful_step_count=per_run,
                               deadline=None, suppress_health_check=list(HealthCheck), derandomize=False,
                               database=None)
    started = time.monotonic()
    model.STEPS_RUN.clear()
    runner().runTest()
    steps = [name for name in model.STEPS_RUN if name != "repointed"]
    ran = {name: steps.count(name) for name in sorted(set(steps))}
    print(f"{len(steps)} steps in {time.monotonic() - started:.0f} s, every invariant held: {ran}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
