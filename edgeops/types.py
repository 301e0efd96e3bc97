"""The vocabulary of states, one enum each. Values are the strings users see and the ledger stores."""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    """What a plan does to one device."""

    INSTALL = "install"
    UPDATE = "update"
    REPAIR = "repair"          # the running release's files are damaged: restore them, verify again
    REVERIFY = "reverify"      # the release is there; measure it again (unfinished, or the SLO changed)
    NO_CHANGE = "no-change"
    UNREACHABLE = "unreachable"
    REFUSED = "refused"        # cannot run the release, cannot be trusted, or rejected it before


class Decision(StrEnum):
    """What happened to one device in a rollout."""

    PASSED = "Passed"
    INCONCLUSIVE = "Inconclusive"
    FAILED = "Failed"
    ROLLED_BACK = "RolledBack"
    UNREACHABLE = "Unreachable"
    REFUSED = "Refused"        # nothing was pushed to it
    PAUSED = "Paused"          # left on its trial release for the operator
    SKIPPED = "Skipped"
    UNCHANGED = "Unchanged"


KEPT = (Decision.PASSED, Decision.INCONCLUSIVE)  # the decisions that leave the new release committed


class Outcome(StrEnum):
    """How a whole rollout (apply, rollback, promote, abort) ended."""

    NO_OP = "no-op"
    SUCCEEDED = "succeeded"
    HALTED = "halted"
    PAUSED = "paused"
    INTERRUPTED = "interrupted"


class Sync(StrEnum):
    SYNCED = "Synced"
    OUT_OF_SYNC = "OutOfSync"
    UNKNOWN = "Unknown"


class Health(StrEnum):
    HEALTHY = "Healthy"
    DEGRADED = "Degraded"
    DAMAGED = "Damaged"
    ROLLED_BACK = "RolledBack"
    UNREACHABLE = "Unreachable"
    MISSING = "Missing"


class DeviceStatus(StrEnum):
    """The status the agent keeps for the release that runs (state.json ``status``)."""

    VERIFYING = "verifying"    # a trial release, its timer armed
    COMMITTED = "committed"
    INCONCLUSIVE = "inconclusive"  # committed after an inconclusive verification
    ROLLED_BACK = "rolled_back"
    PAUSED = "paused"
    REMOVED = "removed"
