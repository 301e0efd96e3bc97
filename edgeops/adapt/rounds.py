"""`edgeops adapt`: federated rounds. Each round asks some devices to train the head on their own samples
(the agent's ``adapt-train``), aggregates the clipped updates they send back, and, when the new head is better
on the repository's evaluation data by ``adapt.min_improvement``, rolls it out as a release through the same
plan, executor, waves and on-device verification as any apply. Every round is a ledger record of kind
``adapt`` (outcome released, kept, rejected, void or stopped) with its devices, counts, clipping, noise, the
privacy spent and the accuracy before and after; the last released one is what git's artifact runs with.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeops.adapt.aggregate import Update, aggregate, clip, personal_choices, sample_devices
from edgeops.adapt.artifact import Adaptation, Head, accuracy_of, features_of, head_tensors, load_tensors
from edgeops.adapt.privacy import epsilon
from edgeops.compress.data import load_dataset
from edgeops.compress.request import BuildRequest
from edgeops.connections import Connections
from edgeops.desired import Desired, desired_state
from edgeops.errors import EdgeopsError
from edgeops.gitinfo import head_info
from edgeops.manifest.models import AdaptSpec, Deployment
from edgeops.manifest.workspace import Document
from edgeops.operations import (
    Repo,
    apply_deployment,
    current_adaptation,
    fetch_learned,
    keep_learned,
    require_key_files,
)
from edgeops.pull.fleet import device_topic, is_pull, pull_settings, repository
from edgeops.rollout import Reporter, device_for, observe_targets, orders_for
from edgeops.signing import SignedOrder, training_bindings
from edgeops.targets import TargetDevice, target_devices
from edgeops.types import DeviceStatus

Progress = Callable[[str], None]
TRAIN_SCHEMA = "edgeops.train/v1"  # the request a pull device's daemon answers on <deployment>/update
# on a release it committed, no trial (rolled_back: a halted rollout put it back on its committed release)
TRAINING_STATUSES = (DeviceStatus.COMMITTED, DeviceStatus.INCONCLUSIVE, DeviceStatus.ROLLED_BACK)


@dataclass(frozen=True)
class RoundResult:
    number: int
    outcome: str                    # released | kept | rejected | void | stopped
    message: str
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Fleet:
    """What the rounds work from: the artifact the fleet runs, its head and the evaluation features."""

    desired: Desired
    head: Head
    bases: dict[str, str]
    released: dict[str, np.ndarray]
    features: np.ndarray
    labels: np.ndarray


def _fleet(repo: Repo, doc: Document[Deployment], progress: Progress,
           adaptation: Adaptation | None) -> _Fleet:
    desired = desired_state(repo.ws, doc, repo.cache, progress, adaptation=adaptation)
    accelerator = sorted(desired.artifacts)[0]
    artifact = desired.artifacts[accelerator]
    head = Head(**artifact.report["adapt"]["head"])
    evaluation = load_dataset(BuildRequest.of(doc, accelerator), "evaluation")
    if evaluation.labels is None:
        raise doc.error(("spec", "data", "evaluation"), "adapt: needs labelled evaluation data (a 'labels' array) "
                                                          "to judge a learned head")
    return _Fleet(desired, head, {a: x.report["adapt"]["base_key"] for a, x in desired.artifacts.items()},
                  head_tensors(artifact.model, head), features_of(artifact.model, head, evaluation.inputs),
                  evaluation.labels)


def _flatten(head: Head, tensors: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([tensors[head.weight].reshape(-1), tensors[head.bias].reshape(-1)]).astype(np.float64)


def _unflatten(head: Head, like: dict[str, np.ndarray], vector: np.ndarray) -> dict[str, np.ndarray]:
    size = like[head.weight].size
    return {head.weight: vector[:size].reshape(like[head.weight].shape).astype(np.float32),
            head.bias: vector[size:].reshape(like[head.bias].shape).astype(np.float32)}


def _decode(head: Head, like: dict[str, np.ndarray], update: dict[str, str]) -> np.ndarray:
    """A device's update as a vector, refused unless it is exactly the trained tensors' size."""
    import base64

    parts = []
    for name in (head.weight, head.bias):
        data = base64.b64decode(update.get(name) or "", validate=True)
        if len(data) != like[name].size * 4:
            raise ValueError(f"{name}: {len(data)} bytes, not {like[name].size * 4}")
        array = np.frombuffer(data, dtype="<f4").astype(np.float64)
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name}: not finite")
        parts.append(array)
    return np.concatenate(parts)


def _eligible(doc: Document[Deployment], fleet: _Fleet, connections: Connections) -> tuple[list[TargetDevice],
                                                                                              dict[str, str]]:
    """Devices that can train now: reached (over SSH, or reporting through their broker), running the release
    git (and the ledger) asks for, committed, undamaged. The others are named with why."""
    skipped: dict[str, str] = {}
    targets = list(fleet.desired.targets)
    observed = observe_targets(doc.name, targets, connections)
    ready = []
    for target in targets:
        o = observed[target.key]
        want = fleet.desired.releases[target.key].id
        if not o.reachable:
            skipped[target.name] = f"unreachable: {o.error}"
        elif o.current != want or o.current != o.committed or o.status not in TRAINING_STATUSES or o.damaged:
            skipped[target.name] = f"runs {o.current or 'nothing'} ({o.status or 'no status'}), not {want} committed"
        else:
            ready.append(target)
    return ready, skipped


def _train_pulled(deployment: str, targets: list[TargetDevice], connections: Connections, tensors: Path,
                  spec: Callable[[TargetDevice], dict[str, Any]], deadline: float, round_id: str,
                  order: Callable[[TargetDevice, float], SignedOrder | None],
                  ) -> dict[str, dict[str, Any] | EdgeopsError]:
    """The local step on pull devices: the round's tensors go to their registry by digest, a training request
    (with its signed order, on enrolled devices) to each device's ``<deployment>/train`` topic, and each answer
    comes back on ``<deployment>/update`` by the deadline (a device that does not answer in time is dropped, the
    round goes on)."""
    if not targets:
        return {}
    data = tensors.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    wall_deadline = time.time() + (deadline - time.monotonic())
    answers: dict[str, dict[str, Any] | EdgeopsError] = {}
    asked = []
    for target in targets:
        try:
            connections.pull.registry(target).push_blob(digest, data)
            broker = connections.pull.broker(target)
            broker.subscribe([device_topic(target, deployment, "update")])
            signed = order(target, wall_deadline)
            broker.publish(device_topic(target, deployment, "train"),
                           {"schema": TRAIN_SCHEMA, "deployment": deployment, "round": round_id,
                            "tensors": {"sha256": digest, "size": len(data)}, "spec": spec(target),
                            "registry": {"url": pull_settings(target).registry, "repository": repository(target)},
                            "deadline": wall_deadline, **({"order": signed.as_json()} if signed else {})})
            asked.append((target, broker))
        except EdgeopsError as exc:
            answers[target.key] = exc
    for target, broker in asked:
        found = broker.wait_for(device_topic(target, deployment, "update"),
                                lambda m: m.get("round") == round_id, deadline)
        if found is None:
            answers[target.key] = EdgeopsError(f"{target.name}: no update by the round's deadline")
        elif not found.get("ok"):
            answers[target.key] = EdgeopsError(f"{target.name}: {found.get('error')}: {found.get('message')}")
        else:
            answers[target.key] = found
        try:
            broker.publish(device_topic(target, deployment, "train"), None, timeout_s=5)  # the request is spent
        except EdgeopsError:
            pass
    return answers


def _spec_for(adapt: AdaptSpec, doc: Document[Deployment], head: Head, release: str, seed: int) -> dict[str, Any]:
    return {"release": release, "features": head.features, "weight": head.weight, "bias": head.bias,
            "transposed": head.transposed, "data": adapt.data_dir(doc.name), "epochs": adapt.local_epochs,
            "learning_rate": adapt.learning_rate, "batch_size": adapt.batch_size, "clip_norm": adapt.clip_norm,
            "proximal_mu": adapt.proximal_mu if adapt.aggregation == "fedprox" else 0.0,
            "validation_fraction": adapt.validation_fraction, "seed": seed}


def adapt_deployment(repo: Repo, doc: Document[Deployment], connections: Connections, rounds: int | None = None,
                     progress: Progress = lambda m: None, reporter: Reporter | None = None) -> list[RoundResult]:
    """Run ``rounds`` federated rounds (default ``adapt.rounds``); see the module's docstring."""
    adapt = doc.obj.spec.adapt
    if adapt is None:
        raise doc.error(("spec",), "this deployment declares no adapt: section: nothing to learn")
    require_key_files(target_devices(repo.ws, doc.name), signing=True, signing_key=repo.signing_key, will_sign=True)
    adaptation = current_adaptation(repo, doc)
    fleet = _fleet(repo, doc, progress, adaptation)
    before = [r for r in repo.ledger.summaries(doc.name, "adapt") if r["summary"].get("bases") == fleet.bases]
    trained = [r["summary"] for r in before if r["summary"].get("global_sha256")]
    if trained:
        fetch_learned(repo, trained[-1]["global_sha256"])
    global_ = load_tensors(repo.cache, trained[-1]["global_sha256"]) if trained else dict(fleet.released)
    noisy_rounds = sum(1 for s in trained if s.get("noise_multiplier"))
    results = []
    for index in range(rounds or adapt.rounds):
        number = len(before) + index + 1
        rollout_id = repo.ledger.start_rollout(doc.name, "adapt", repo.actor, head_info(repo.ws.root),
                                               {a: x.model_sha256 for a, x in fleet.desired.artifacts.items()})
        try:
            result, global_, fleet, noisy_rounds = _round(repo, doc, connections, adapt, fleet, global_, number,
                                                          noisy_rounds, progress, reporter)
        except BaseException as exc:
            repo.ledger.finish_rollout(rollout_id, "failed", {"round": number, "bases": fleet.bases,
                                                              "error": str(exc)[:300]})
            raise
        repo.ledger.finish_rollout(rollout_id, result.outcome, result.summary)
        results.append(result)
        progress(f"round {number}: {result.message}")
        if result.outcome == "stopped":
            break
    return results


def _round(repo: Repo, doc: Document[Deployment], connections: Connections, adapt: AdaptSpec, fleet: _Fleet,
           global_: dict[str, np.ndarray], number: int, noisy_rounds: int, progress: Progress,
           reporter: Reporter | None) -> tuple[RoundResult, dict[str, np.ndarray], _Fleet, int]:
    head = fleet.head
    summary: dict[str, Any] = {"round": number, "bases": fleet.bases, "aggregation": adapt.aggregation,
                               "clip_norm": adapt.clip_norm, "noise_multiplier": adapt.privacy.noise_multiplier}
    ready, skipped = _eligible(doc, fleet, connections)
    rng = np.random.default_rng([adapt.seed, number])
    asked = sample_devices([t.name for t in ready], adapt.devices_per_round.fraction,
                           adapt.devices_per_round.min_devices, rng)
    summary.update(eligible=len(ready), asked=asked, skipped=skipped)
    sigma, delta = adapt.privacy.noise_multiplier, adapt.privacy.delta
    q = len(asked) / max(1, len(fleet.desired.targets))
    if sigma > 0:
        spent = epsilon(q, sigma, noisy_rounds + 1, delta)
        if adapt.privacy.max_epsilon is not None and spent > adapt.privacy.max_epsilon:
            summary.update(epsilon=epsilon(q, sigma, noisy_rounds, delta), delta=delta)
            return (RoundResult(number, "stopped", f"the next round would spend ε={spent:.3g} > max_epsilon "
                                                   f"{adapt.privacy.max_epsilon:g}: no round ran", summary),
                    global_, fleet, noisy_rounds)
    if len(asked) < adapt.devices_per_round.min_devices:
        summary["reason"] = f"{len(ready)} device(s) can train, min_devices is {adapt.devices_per_round.min_devices}"
        return RoundResult(number, "void", f"void: {summary['reason']}", summary), global_, fleet, noisy_rounds
    targets = [t for t in ready if t.name in asked]
    deadline = time.monotonic() + adapt.round_deadline_s
    progress(f"round {number}: {len(targets)} device(s) train on their own samples")
    with tempfile.TemporaryDirectory() as tmp:
        tensors = Path(tmp) / "global.npz"
        arrays: dict[str, Any] = dict(global_)
        np.savez(tensors, **arrays)

        def spec(target: TargetDevice) -> dict[str, Any]:
            return _spec_for(adapt, doc, head, fleet.desired.releases[target.key].id, adapt.seed * 1000 + number)

        sent = tensors.read_bytes()

        def order(target: TargetDevice, wall_deadline: float) -> SignedOrder | None:
            """The training order an enrolled device needs: for this release, tensors and spec, until the round's
            deadline."""
            return orders_for(target, repo.signing_key, doc.name)(
                "train", fleet.desired.releases[target.key].id, training_bindings(sent, spec(target), wall_deadline))

        def train(target: TargetDevice) -> dict[str, Any]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EdgeopsError("no time left before the round's deadline")
            return device_for(target, connections, doc.name).adapt_train(
                tensors, spec(target), timeout=left, order=order(target, time.time() + left))

        answers: dict[str, Any] = connections.map(train, [t for t in targets if not is_pull(t)])
        answers |= _train_pulled(doc.name, [t for t in targets if is_pull(t)], connections, tensors, spec, deadline,
                                 f"{doc.name}/{number}/{uuid.uuid4().hex[:8]}", order)
    updates, dropped, reports = [], {}, {}
    for target in targets:
        answer = answers[target.key]
        if isinstance(answer, EdgeopsError):
            connections.drop(target)
            dropped[target.name] = answer.message[:200]
            continue
        try:
            vector = _decode(head, global_, answer.get("update") or {})
            samples = int(answer["samples"])
        except (ValueError, KeyError, TypeError) as exc:
            dropped[target.name] = f"an update edgeops cannot use ({exc})"
            continue
        if samples <= 0:
            dropped[target.name] = "trained on no samples"
            continue
        updates.append(Update(target.name, vector, samples))
        reports[target.name] = {"samples": samples, "norm": answer.get("norm"), "clipped": answer.get("clipped"),
                                "validation": answer.get("validation")}
    summary.update(dropped=dropped, devices=reports, samples=sum(u.samples for u in updates))
    if len(updates) < adapt.devices_per_round.min_devices:
        summary["reason"] = f"{len(updates)} update(s) by the deadline, min_devices is " \
                            f"{adapt.devices_per_round.min_devices}"
        return RoundResult(number, "void", f"void: {summary['reason']}", summary), global_, fleet, noisy_rounds
    combined = aggregate(updates, adapt.aggregation, adapt.clip_norm, trim_fraction=adapt.trim_fraction,
                         max_norm_ratio=adapt.outliers.max_norm_ratio, min_cosine=adapt.outliers.min_cosine,
                         noise_multiplier=sigma, rng=rng)
    if not combined.used:
        summary.update(excluded=combined.excluded, reason="every update was excluded")
        return RoundResult(number, "void", "void: every update was excluded", summary), global_, fleet, noisy_rounds
    if sigma > 0:
        noisy_rounds += 1
        summary.update(epsilon=round(epsilon(q, sigma, noisy_rounds, delta), 4), delta=delta,
                       noise_std=combined.noise_std, sampling_rate=round(q, 4))
    candidate = _unflatten(head, global_, _flatten(head, global_) + combined.vector)
    before = accuracy_of(head, fleet.released, fleet.features, fleet.labels)
    start = accuracy_of(head, global_, fleet.features, fleet.labels)
    after = accuracy_of(head, candidate, fleet.features, fleet.labels)
    summary.update(used=list(combined.used), excluded=combined.excluded, clipped_here=list(combined.clipped),
                   trimmed_share=combined.trimmed_share, accuracy_released=round(before, 3),
                   accuracy_start=round(start, 3), accuracy_after=round(after, 3),
                   global_sha256=keep_learned(repo, candidate), evaluation_samples=len(fleet.labels))
    named = "; ".join(f"{d} excluded: {why}" for d, why in sorted(combined.excluded.items()))
    line = (f"{len(combined.used)} update(s) from {summary['samples']} samples, accuracy {start:.2f} -> {after:.2f} "
            f"(released {before:.2f})" + (f"; {named}" if named else ""))
    if after < before + adapt.min_improvement:
        summary["reason"] = f"below the released head by less than min_improvement {adapt.min_improvement:g}"
        return RoundResult(number, "kept", f"{line}; not released (gain < {adapt.min_improvement:g})", summary), \
            candidate, fleet, noisy_rounds
    personal: dict[str, str] = {}
    if adapt.personalize:
        chosen = personal_choices({u.device: reports[u.device]["validation"] for u in updates
                                   if u.device in combined.used}, adapt.min_improvement)
        start_vector = _flatten(head, global_)
        for update in updates:
            if update.device in chosen:
                own = _unflatten(head, global_, start_vector + clip(update.vector, adapt.clip_norm)[0])
                personal[update.device] = keep_learned(repo, own)
        summary["personal"], summary["personal_reasons"] = personal, chosen
    proposal = Adaptation(summary["global_sha256"], fleet.bases, personal)
    summary["tensors_sha256"] = proposal.tensors_sha256
    progress(f"round {number}: the learned head gains {after - before:.2f} points: rolling it out")
    _, rollout = apply_deployment(repo, doc, connections, reporter, progress=progress, adaptation=proposal)
    summary.update(rollout=rollout.number, rollout_outcome=str(rollout.outcome),
                   release=rollout.devices[0].release_id if rollout.devices else None)
    if not rollout.ok:
        summary["reason"] = rollout.message
        summary["refused"] = {d.key: d.reason for d in rollout.devices if d.reason}
        return RoundResult(number, "rejected", f"{line}; the rollout did not pass: {rollout.message}", summary), \
            candidate, fleet, noisy_rounds
    fleet = _fleet(repo, doc, progress, proposal)
    return RoundResult(number, "released", f"{line}; released and verified on the fleet", summary), candidate, \
        fleet, noisy_rounds
