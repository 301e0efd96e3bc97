"""The vocabulary of states, one enum each. Values are the strings users see and the ledger stores.

docs/states.md is generated from this module (``python -m edgeops.types > docs/states.md``); a test
regenerates it and compares, so the docs say what the code does.
"""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    """What a plan does to one device."""

    INSTALL = "install"
    UPDATE = "update"
    REPAIR = "repair"
    REVERIFY = "reverify"
    NO_CHANGE = "no-change"
    UNREACHABLE = "unreachable"
    REFUSED = "refused"
    ROLLBACK = "rollback"    # back to a release already on the device (edgeops rollback)
    PROMOTE = "promote"      # accept the paused release as it was measured (edgeops promote)
    ABORT = "abort"          # reject the paused release and revert (edgeops abort)


class Decision(StrEnum):
    """What happened to one device in a rollout (the ledger's device events)."""

    PASSED = "Passed"
    INCONCLUSIVE = "Inconclusive"
    FAILED = "Failed"
    ROLLED_BACK = "RolledBack"
    UNREACHABLE = "Unreachable"
    REFUSED = "Refused"
    PAUSED = "Paused"
    SKIPPED = "Skipped"
    UNCHANGED = "Unchanged"


KEPT = (Decision.PASSED, Decision.INCONCLUSIVE)  # the decisions that leave the new release committed


class Outcome(StrEnum):
    """How a whole rollout (apply, rollback, promote, abort) ended (the ledger's rollouts)."""

    NO_OP = "no-op"
    SUCCEEDED = "succeeded"
    HALTED = "halted"
    PAUSED = "paused"
    INTERRUPTED = "interrupted"


class Sync(StrEnum):
    """Whether a device runs the release git asks for (`edgeops status`)."""

    SYNCED = "Synced"
    OUT_OF_SYNC = "OutOfSync"
    UNKNOWN = "Unknown"


class Health(StrEnum):
    """How the release a device runs is doing (`edgeops status`), judged worst first."""

    HEALTHY = "Healthy"
    DEGRADED = "Degraded"
    DAMAGED = "Damaged"
    ROLLED_BACK = "RolledBack"
    UNREACHABLE = "Unreachable"
    MISSING = "Missing"
    INTERRUPTED = "Interrupted"


class DeviceStatus(StrEnum):
    """The status the agent keeps for the release that runs (state.json ``status``)."""

    VERIFYING = "verifying"
    COMMITTED = "committed"
    INCONCLUSIVE = "inconclusive"
    ROLLED_BACK = "rolled_back"
    PAUSED = "paused"
    REMOVED = "removed"


class ReleaseState(StrEnum):
    """The state of each release on a device (state.json ``releases[id].state``), owned by the agent."""

    STAGED = "staged"
    TRIAL = "trial"
    COMMITTED = "committed"
    REJECTED = "rejected"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


# what each state means, per enum (equal strings in two enums, like "RolledBack", mean different things)
MEANING: dict[type[StrEnum], dict[StrEnum, str]] = {
    Action: {
        Action.INSTALL: "the device runs no release of this deployment: send one, switch, verify",
        Action.UPDATE: "the device runs another release: send what it lacks, switch, verify",
        Action.REPAIR: "the running release's files are damaged: send them again, verify",
        Action.REVERIFY: "the release is there but not verified (unfinished, or the SLO changed): measure again",
        Action.NO_CHANGE: "the device runs, verified, the release git asks for",
        Action.UNREACHABLE: "the device could not be read; it counts against max_unreachable_devices",
        Action.REFUSED: "the device cannot run the release (preflight), cannot be trusted (host key, key refused), "
            "or rejected this release before: nothing is sent",
        Action.ROLLBACK: "`edgeops rollback`: back to a release the device holds (no transfer), measured there "
            "against the SLO",
        Action.PROMOTE: "`edgeops promote`: the paused release is committed as it was measured",
        Action.ABORT: "`edgeops abort`: the paused release is rejected; the device reverts to its committed release",
    },
    Decision: {
        Decision.PASSED: "verified on the device and committed",
        Decision.INCONCLUSIVE: "the measurement could not decide; committed under on_inconclusive: retry",
        Decision.FAILED: "verification failed or a step errored; the device went back to its committed release",
        Decision.ROLLED_BACK: "a release this rollout committed was taken back (halt, rollback, abort)",
        Decision.UNREACHABLE: "not reached; nothing changed on it",
        Decision.REFUSED: "refused by the plan; nothing was sent to it",
        Decision.PAUSED: "left on its trial release for the operator (edgeops resume, promote, abort)",
        Decision.SKIPPED: "not started: the rollout stopped before its wave",
        Decision.UNCHANGED: "already ran the release git asks for",
    },
    Outcome: {
        Outcome.NO_OP: "nothing to do; no device was touched",
        Outcome.SUCCEEDED: "every wave ran within its budgets",
        Outcome.HALTED: "a budget was exceeded (or a rollback failed somewhere); later waves did not start",
        Outcome.PAUSED: "a device was paused; later waves wait for the operator",
        Outcome.INTERRUPTED: "stopped by the user; devices in flight finished the step they were in",
    },
    Sync: {
        Sync.SYNCED: "runs the release git asks for",
        Sync.OUT_OF_SYNC: "runs another release, or none",
        Sync.UNKNOWN: "the release git asks for is not built (status never builds) or cannot be rendered",
    },
    Health: {
        Health.HEALTHY: "committed, files intact, last verification within the SLO",
        Health.DEGRADED: "over the SLO git asks for now, paused, not verified, or unable to run releases now",
        Health.DAMAGED: "a file of the running release is missing or changed: edgeops apply repairs it",
        Health.ROLLED_BACK: "back on an earlier release after a revert (failed, aborted, expired trial) or a rollback",
        Health.UNREACHABLE: "could not be read now",
        Health.MISSING: "runs no release of this deployment",
        Health.INTERRUPTED: "a step was left half done (a crash, a cut, a link changed by hand); a read only reports "
                            "it, the next apply or reconcile finishes it",
    },
    DeviceStatus: {
        DeviceStatus.VERIFYING: "a trial release, its timer armed: it reverts by itself unless committed in time",
        DeviceStatus.COMMITTED: "the release passed verification and stays",
        DeviceStatus.INCONCLUSIVE: "committed after an inconclusive verification",
        DeviceStatus.ROLLED_BACK: "back on the previous committed release after a rejection or an abort",
        DeviceStatus.PAUSED: "a trial release whose timer is disarmed, waiting for the operator",
        DeviceStatus.REMOVED: "a first install was taken back: no release runs",
    },
    ReleaseState: {
        ReleaseState.STAGED: "its files are on the device, hash-verified and read-only; it has never run",
        ReleaseState.TRIAL: "switched to and being verified; the device reverts it when its trial window ends",
        ReleaseState.COMMITTED: "verified (or promoted); may be a rollback target",
        ReleaseState.REJECTED: "failed verification on this device; never activated again without --allow-rejected",
        ReleaseState.ABORTED: "left because of an error or an expired trial, not a verdict: may be tried again",
        ReleaseState.ROLLED_BACK: "committed once, then taken back by a rollback",
    },
}

VOCABULARY = (Action, Decision, Outcome, Sync, Health, DeviceStatus, ReleaseState)


def vocabulary_markdown() -> str:
    """docs/states.md: every state edgeops shows or stores, with what it means."""
    lines = ["# States", "", "Generated from `edgeops/types.py` (`python -m edgeops.types > docs/states.md`): the",
             "values below are what the CLI shows, what `-o json` prints and what the ledger and the devices store.",
             ""]
    for enum in VOCABULARY:
        lines += [f"## {enum.__name__}", "", (enum.__doc__ or "").strip(), "", "| value | meaning |", "|---|---|"]
        lines += [f"| `{member.value}` | {MEANING[enum][member]} |" for member in enum]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(vocabulary_markdown(), end="")
