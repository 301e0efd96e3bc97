"""A local device whose agent runs in this process: the real agent code on a real directory, milliseconds a
step, for model-based tests that take thousands of steps (tests/integration/test_lifecycle_model.py)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from edgeops.transport.base import CommandResult
from edgeops.transport.local import LocalTransport


class InProcessAgent(LocalTransport):
    """Runs ``python <agent> ARGS`` (or ``python -c <source> ARGS``) as the agent module's ``main(ARGS)``;
    the trial timer it would start is recorded, not spawned (the test expires trials itself)."""

    def __init__(self, device: str, agent: Any) -> None:
        super().__init__(device)
        self.agent = agent
        self.timers: list[tuple[str, float]] = []
        agent._spawn_timer = lambda args, release, deadline: self.timers.append((release, deadline)) or 0

    def run(self, argv: list[str], timeout: float | None = None, check: bool = True) -> CommandResult:
        if len(argv) < 2 or not (argv[1] == "-c" or argv[1].endswith(".py") or argv[1] == "agent"):
            return super().run(argv, timeout, check)  # not the agent (mkdir -p ...)
        args = argv[3:] if argv[1] == "-c" else argv[2:]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = self.agent.main(args)
            except SystemExit as exc:
                code = int(exc.code or 0)
        return CommandResult(argv, int(code or 0), out.getvalue(), err.getvalue())
