"""The ``edgeops`` command line: parse, call the service layer, print, map errors to exit codes.

No decisions here: every command's work is a function of ``edgeops.service``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from edgeops import __version__, service
from edgeops.errors import EdgeopsError, ExitCode, InputError
from edgeops.settings import Settings
from edgeops.types import Decision, Health

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
                      show_default=True, help="table for people, json for machines")
SELECTOR = click.option("-l", "--selector", help="only target devices whose labels match, as kubectl -l writes it: "
                                                 "ring=canary,site!=lab,hw in (x86,arm)")
ALLOW_EMPTY = click.option("--allow-empty", is_flag=True,
                           help="a target selector, a wave or -l that takes no device is a warning, not an error")
ROOT_OPTION = click.option("--root", type=click.Path(file_okay=False, path_type=Path),
                           help="repository root (default: found)")


def library_prints_to_stderr() -> contextlib.AbstractContextManager[object]:
    """What libraries print while edgeops builds (onnxruntime's calibration progress) goes to stderr:
    stdout carries only the command's output (JSON, markdown, tables)."""
    return contextlib.redirect_stdout(sys.stderr)


def settings(root: Path | None, **options: Any) -> Settings:
    """The run's settings: the environment is read here, once, and nowhere in the library."""
    return dataclasses.replace(Settings.from_environment(os.environ, root), warn=warning, **options)


def warning(text: str) -> None:
    """What is wrong but not in the way (a broken file this command does not use), on stderr."""
    click.echo(f"warning: {text}", err=True)


def notice(text: str) -> None:
    """What the user must hear even in -o json runs (on stderr): a host key trusted on first use."""
    click.echo(f"notice: {text}", err=True)


def _fail(exc: EdgeopsError, as_json: bool) -> None:
    if as_json:
        problems = [p.as_dict() for p in exc.problems] if isinstance(exc, InputError) else []
        click.echo(json.dumps({"ok": False, "error": type(exc).__name__, "message": exc.message,
                               "problems": problems}, indent=2))
    for line in exc.lines():
        click.echo(f"error: {line}", err=True)
    sys.exit(exc.exit_code)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn EdgeopsError into its message and exit code; anything else stays a bug with a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EdgeopsError as exc:
            _fail(exc, kwargs.get("output") == "json")
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(ExitCode.INTERRUPTED)

    return wrapper


class InvalidUsage(click.UsageError):
    exit_code = ExitCode.INVALID


class EdgeopsGroup(click.Group):
    """click's usage errors exit 3 (invalid input) here: 2 belongs to `plan` for "changes pending"."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise InvalidUsage(exc.message, exc.ctx) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise InvalidUsage(exc.message, exc.ctx) from None


@click.group(cls=EdgeopsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeops")
def main() -> None:
    """GitOps for ML models on edge fleets."""
    # errors reach the user as named exceptions; libraries' log records (onnxruntime's quantizer warns per
    # tensor, paramiko logs every failed dial) would only repeat them
    logging.basicConfig(level=logging.CRITICAL)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@ALLOW_EMPTY
@ROOT_OPTION
@OUTPUT
@handle_errors
def validate(paths: tuple[Path, ...], allow_empty: bool, root: Path | None, output: str) -> None:
    """Check files (or directories) and what they refer to, without touching a device.

    Reports on the files given and the fleets and profiles they use: schema, references, the ONNX model
    against its declared inputs and outputs, recipe options against the model, fleet addresses.
    With no PATH: the whole repository.
    """
    checked = service.validate(paths, settings(root, allow_empty=allow_empty))
    if output == "json":
        click.echo(json.dumps({"ok": True, "documents": [
            {"file": d.display, "kind": d.obj.kind, "name": d.name} for d in checked.documents],
            "warnings": [w.as_dict() for w in checked.warnings]}, indent=2))
        return
    for doc in checked.documents:
        click.echo(f"ok  {doc.display}  {doc.obj.kind}/{doc.name}")
    for warning in checked.warnings:
        click.echo(f"warning: {warning}", err=True)
    kinds = [d.obj.kind for d in checked.documents]
    click.echo(f"valid: {kinds.count('Deployment')} deployment(s), {kinds.count('Fleet')} fleet(s), "
               f"{kinds.count('DeviceProfile')} device profile(s)")


@main.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="write to a file instead of stdout")
def schema(out: Path | None) -> None:
    """Print the JSON Schema of every edgeops kind (for editors' YAML language servers)."""
    text = json.dumps(service.json_schema(), indent=2, sort_keys=True) + "\n"
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(text, nl=False)


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--accelerator", type=click.Choice(["cpu", "gpu", "tpu"]), multiple=True,
              help="build only for this accelerator class (default: every class among the targets)")
@click.option("--force", is_flag=True, help="rebuild even when the cache has the artifact")
@click.option("--explain", is_flag=True, help="say which inputs changed since the last build")
@ROOT_OPTION
@OUTPUT
@handle_errors
def build(manifest: Path, accelerator: tuple[str, ...], force: bool, explain: bool, root: Path | None,
          output: str) -> None:
    """Build, evaluate and cache the compressed artifact(s) of a deployment."""
    from edgeops.ui import build_notes, build_table, console, err_console, finalist_lines

    doc, accelerators, cache = service.build_targets(manifest, accelerator, settings(root))
    results = []
    for acc in accelerators:
        started = time.monotonic()
        with err_console.status(f"building {doc.name} for {acc}") as status, library_prints_to_stderr():
            result = service.build(doc, acc, cache, force=force, progress=lambda message: status.update(
                f"{doc.name} ({acc}), {time.monotonic() - started:.0f} s: {message}"))
        with err_console.status(f"building the finalists of {doc.name} for {acc}"), library_prints_to_stderr():
            finalists = service.build_finalists(doc, acc, cache, settings(root))
        results.append((result, finalists))
        if output == "table":
            console.print(build_table(result.report))
            for line in build_notes(result.report):
                console.print(line, soft_wrap=True)
            state = "cache hit" if result.artifact.hit else "built"
            console.print(f"{state}: {result.artifact.model}")
            for line in finalist_lines(finalists):
                console.print(line, soft_wrap=True)
            if explain:
                for line in result.why:
                    console.print(f"  why: {line}")
    if output == "json":
        click.echo(json.dumps([{**r.report, "cache_hit": r.artifact.hit, "path": str(r.artifact.model),
                                "why": r.why, **({"decide_on_device": f} if f else {})} for r, f in results],
                              indent=2))


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--device", "device_name", help="render only this device (name or fleet/name)")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="write <fleet>/<device>.json files here instead of printing")
@ROOT_OPTION
@handle_errors
def render(manifest: Path, device_name: str | None, out_dir: Path | None, root: Path | None) -> None:
    """Render the runtime config (JSON) of each target device; builds first (cache hits are free)."""
    with library_prints_to_stderr():
        configs = service.render(manifest, device_name, settings(root))
    for target, config in configs:
        if out_dir is None:
            if len(configs) > 1:
                click.echo(f"# {target.key} ({target.profile.name}, {config.digest[:12]})")
            click.echo(config.text, nl=False)
        else:
            path = out_dir / target.fleet.name / f"{target.name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(config.text)
            click.echo(f"wrote {path}")


@main.command()
@click.argument("fleet")
@click.option("--signed-by", type=click.Path(dir_okay=False, path_type=Path),
              help="the key that signs the new trust root (rotation: a key the devices trust now); "
                   "default: the fleet's release key")
@ROOT_OPTION
@handle_errors
def enroll(fleet: str, signed_by: Path | None, root: Path | None) -> None:
    """Install FLEET's trust.allowed_signers on its devices, or rotate it (signed by a key they trust now)."""
    name, results = service.enroll(fleet, settings(root), signed_by, notify=notice)
    for r in results:
        what = f"failed: {r.error}" if r.error else "rotated" if r.rotated else "enrolled" if r.changed else \
            "already enrolled"
        click.echo(f"{name}/{r.device}: {what}")
    sys.exit(ExitCode.FAILED if any(r.error for r in results) else ExitCode.OK)


@main.group(cls=EdgeopsGroup)
def state() -> None:
    """Where history and locks live (EDGEOPS_STATE): SQLite in the repository, or PostgreSQL for a team."""


@state.command("show")
@ROOT_OPTION
@handle_errors
def state_show(root: Path | None) -> None:
    """Say which ledger this repository's commands use (the password never shown)."""
    click.echo(service.state_location(settings(root)))


@state.command("migrate")
@click.option("--to", "target", required=True, help="the ledger to copy into, as a URL: postgresql://user@host:port/db")
@click.option("--from", "source", help="the ledger to copy from (default: the one this repository uses now, "
                                       "EDGEOPS_STATE or .edgeops/ledger.sqlite)")
@ROOT_OPTION
@handle_errors
def state_migrate(target: str, source: str | None, root: Path | None) -> None:
    """Copy every rollout, decision, release and learned head of one ledger into another that is still empty (one
    transaction). Then set EDGEOPS_STATE to the new one."""
    copied = service.state_migrate(source, target, settings(root))
    learned = f" and {copied['learned']} learned head(s)" if copied.get("learned") else ""
    click.echo(f"copied {copied['rollouts']} rollout(s), {copied['device_events']} device decision(s) and "
               f"{copied['releases']} release(s){learned} into {copied['to']}")


@main.group(cls=EdgeopsGroup)
def lab() -> None:
    """A local fleet of real sshd devices on 127.0.0.1 (quick start, tests, benchmarks)."""


@lab.command("up")
@click.argument("fleet", default="lab")
@click.option("--login-home", type=click.Path(file_okay=False, path_type=Path), envvar="EDGEOPS_LAB_LOGIN_HOME",
              help="HOME of the devices' SSH sessions (their shell startup files) instead of the user's; "
                   "for testing devices whose login environment differs [env: EDGEOPS_LAB_LOGIN_HOME]")
@click.option("--port-base", type=int, metavar="PORT",
              help="devices listen on PORT, PORT+1, ... (recorded in .edgeops/lab/, used by every command of this "
                   "clone); without it, a lab whose fleet-file ports are taken moves to free ones by itself")
@ROOT_OPTION
@handle_errors
def lab_up_command(fleet: str, login_home: Path | None, port_base: int | None, root: Path | None) -> None:
    """Provision the device runtime and start one sshd per device of FLEET (name or file; default: lab). Idempotent."""
    name, devices = service.lab_up(fleet, settings(root), login_home, port_base,
                                   report=lambda message: click.echo(message, err=True))
    for device in devices:
        click.echo(f"up  {name}/{device.name}  {_lab_address(device)}  pid {device.pid}"
                   + (f"  {device.budget}" if device.budget else "") + (f"  link {device.link}" if device.link else ""))


def _lab_address(device: Any) -> str:
    if device.service:
        return str(device.service)
    return f"{device.host}:{device.port}" if device.port else "pulls (agent daemon)"


@lab.command("status")
@click.argument("fleet", required=False)
@ROOT_OPTION
@handle_errors
def lab_status_command(fleet: str | None, root: Path | None) -> None:
    """Show which lab devices of FLEET (default: every lab fleet) are running."""
    for name, devices in service.lab_status(fleet, settings(root)):
        for device in devices:
            state = f"running (pid {device.pid})" if device.running else "stopped"
            click.echo(f"{name}/{device.name}  {_lab_address(device)}  {state}"
                       + (f"  {device.budget}" if device.budget else "")
                       + (f"  link {device.link}" if device.link else ""))


@lab.command("link")
@click.argument("device")
@click.argument("state", type=click.Choice(["down", "up"]))
@ROOT_OPTION
@handle_errors
def lab_link_command(device: str, state: str, root: Path | None) -> None:
    """Cut (down) or heal (up) the own link of lab DEVICE (or FLEET/DEVICE): a partition, for testing."""
    name, found = service.lab_link(device, state == "up", settings(root))
    click.echo(f"{name}/{found.name}  link {found.link}")


@lab.command("down")
@click.argument("fleet", required=False)
@click.option("--wipe", is_flag=True, help="also delete the devices' lab state (keys, logs)")
@ROOT_OPTION
@handle_errors
def lab_down_command(fleet: str | None, wipe: bool, root: Path | None) -> None:
    """Stop exactly the sshd processes `lab up` started (by pid), for FLEET (default: every lab fleet)."""
    for name, stopped in service.lab_down(fleet, settings(root), wipe):
        click.echo(f"stopped {len(stopped)} lab device(s) of {name}")


LOCK_TIMEOUT = click.option("--lock-timeout", default="0s", show_default=True, metavar="DURATION",
                            help="wait this long (30s, 5m) for another apply or rollback on the same fleet "
                                 "to finish; 0s: refuse at once (exit 5)")
ACCEPT_QUALITY_DROP = click.option(
    "--accept-quality-drop", is_flag=True,
    help="go on with a release whose quality on the evaluation data is lower than what the fleet runs by more "
         "than regression.quality_drop (refused otherwise, exit 4)")
CHANGED_SINCE = click.option("--changed-since", metavar="REV",
                             help="also every deployment a change since REV touches (manifests, models, data, "
                                  "fleets, profiles, templates)")


@main.command()
@click.argument("manifests", nargs=-1)
@CHANGED_SINCE
@click.option("-o", "--output", type=click.Choice(["table", "json", "markdown"]), default="table", show_default=True)
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="save the plan (JSON) for apply --plan (one deployment)")
@click.option("--untrusted", is_flag=True,
              help="a pull request's plan: contact only devices whose endpoints and credentials are as in the base "
                   "revision (--base, default the --changed-since REV); code-running fields stay refused")
@click.option("--base", metavar="REV", help="with --untrusted: the reviewed revision endpoints are taken from")
@click.option("--rollback", "rollback_of", metavar="DEPLOYMENT",
              help="show what `edgeops rollback DEPLOYMENT` would do instead (read from the devices and the ledger)")
@click.option("--to", "to_release", metavar="RELEASE", help="with --rollback: the release `rollback --to` names")
@ACCEPT_QUALITY_DROP
@SELECTOR
@ALLOW_EMPTY
@ROOT_OPTION
@handle_errors
def plan(manifests: tuple[str, ...], changed_since: str | None, output: str, out_file: Path | None,
         untrusted: bool, base: str | None, rollback_of: str | None, to_release: str | None,
         accept_quality_drop: bool, selector: str | None, allow_empty: bool, root: Path | None) -> None:
    """Show what apply (or, with --rollback, rollback) would do, with each device's facts and preflight.

    Exit code 0: no changes; 2: changes pending (and nothing else wrong); 4: a device was refused by the
    preflight; 1: a failure; 3: invalid input. See docs/exit-codes.md.
    """
    from edgeops.ui import console, err_console, plan_comment, plan_summary, plan_table

    if rollback_of:
        if manifests or changed_since or untrusted or out_file:
            raise click.UsageError("--rollback DEPLOYMENT plans one rollback: no MANIFEST, --changed-since, "
                                   "--untrusted or --out with it")
        with err_console.status("planning the rollback"), library_prints_to_stderr():
            back = service.plan_rollback(rollback_of, to_release, settings(root), notify=notice, selector=selector)
        if output == "json":
            click.echo(back.to_json(), nl=False)
        else:
            console.print(plan_table(back))
            for line in plan_summary(back):
                console.print(line, soft_wrap=True)
        sys.exit(ExitCode.REFUSED if back.refused else ExitCode.CHANGES if back.has_changes else ExitCode.OK)
    if to_release:
        raise click.UsageError("--to goes with --rollback")
    if not manifests and not changed_since:
        raise click.UsageError("give MANIFEST(s) or --changed-since REV")
    if base and not untrusted:
        raise click.UsageError("--base goes with --untrusted")
    if untrusted and not (base or changed_since):
        raise click.UsageError("--untrusted needs the base revision: --base REV or --changed-since REV")
    with err_console.status("planning") as status, library_prints_to_stderr():
        found = service.plan(manifests, changed_since, settings(root, allow_empty=allow_empty),
                             progress=status.update, notify=notice,
                             selector=selector, untrusted_base=(base or changed_since) if untrusted else None,
                             accept_quality_drop=accept_quality_drop)
    if out_file:
        if len(found) != 1:
            raise click.UsageError("--out saves the plan of exactly one deployment")
        out_file.write_text(found[0].plan.to_json())
        err_console.print(f"saved plan to {out_file}")
    if output == "json":
        click.echo(json.dumps([json.loads(e.plan.to_json()) for e in found], indent=2, sort_keys=True))
    elif output == "markdown":
        click.echo(plan_comment(found), nl=False)
    else:
        for entry in found:
            console.print(plan_table(entry.plan))
            for line in plan_summary(entry.plan) + entry.changes + entry.compared + \
                    [f"warning: {w}" for w in entry.warnings]:
                console.print(line, soft_wrap=True)
        if not found:
            console.print("no deployment is touched")
    plans = [e.plan for e in found]
    if any(p.refused for p in plans):
        sys.exit(ExitCode.REFUSED)
    blind = [e.plan.deployment for e in found if e.checked_nothing]
    if blind:
        click.echo(f"error: every device of {', '.join(blind)} was unreachable: the plan checked nothing", err=True)
        sys.exit(ExitCode.FAILED)
    sys.exit(ExitCode.CHANGES if any(p.has_changes for p in plans) else ExitCode.OK)


@main.command()
@click.argument("manifests", nargs=-1)
@CHANGED_SINCE
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False, path_type=Path),
              help="execute exactly this saved plan (refused if the devices or the repo moved since)")
@LOCK_TIMEOUT
@click.option("--max-parallel", type=click.IntRange(min=1), default=None,
              help="at most N devices at once, below the rollout's parallelism (a slow or shared link)")
@ACCEPT_QUALITY_DROP
@SELECTOR
@OUTPUT
@ROOT_OPTION
@handle_errors
def apply(manifests: tuple[str, ...], changed_since: str | None, plan_file: Path | None, lock_timeout: str,
          accept_quality_drop: bool, max_parallel: int | None,
          selector: str | None, output: str, root: Path | None) -> None:
    """Build, render, plan and roll out wave by wave with on-device verification and rollback.

    Several deployments go one after the other, by name; the first that does not succeed stops the rest.
    """
    from edgeops.ui import LiveReporter, console, err_console, result_table

    if not manifests and not changed_since:
        raise click.UsageError("give MANIFEST(s) or --changed-since REV")

    def show(result: service.RolloutResult) -> None:
        if output != "table":
            return
        console.print(result_table(result))
        s = service.summarize(result)
        console.print(f"{result.outcome}: {s['passed']} updated, {s['inconclusive']} kept inconclusive, "
                      f"{s['unchanged']} unchanged, {s['rolledback'] + s['failed']} rolled back or failed, "
                      f"{s['unreachable']} unreachable, {s['refused']} refused, {s['skipped']} not started; "
                      f"{s['bytes_moved']:,} bytes moved")
        for device in result.devices:
            if device.decision == Decision.REFUSED:
                console.print(f"refused: {device.reason}", soft_wrap=True)

    machine_output = library_prints_to_stderr() if output == "json" else contextlib.nullcontext()
    with LiveReporter() as reporter, machine_output:
        applied = service.apply(manifests, changed_since, plan_file, settings(root), reporter,
                                progress=lambda m: err_console.print(m), lock_timeout_s=_duration(lock_timeout),
                                on_result=show, notify=notice, selector=selector,
                                accept_quality_drop=accept_quality_drop, max_parallel=max_parallel)
    results = applied.results
    if applied.not_applied:
        err_console.print(f"stopping: {results[-1].deployment} {results[-1].outcome}; not applied: "
                          f"{', '.join(applied.not_applied)}")
    if output == "json":
        click.echo(json.dumps([{"deployment": r.deployment, "outcome": r.outcome, "message": r.message,
                                "rollout": r.number, "summary": service.summarize(r),
                                "devices": [d.__dict__ for d in r.devices]} for r in results], indent=2, default=str))
    elif not applied.selected:
        console.print("no deployment is touched")
    if lost := next((r for r in results if r.lock_lost), None):
        err_console.print(f"error: {lost.message}", soft_wrap=True)
        sys.exit(ExitCode.LOCKED)
    if any(r.count(Decision.REFUSED) for r in results):
        sys.exit(ExitCode.REFUSED)
    sys.exit(ExitCode.OK if all(r.ok for r in results) else ExitCode.FAILED)


def _settle_paused_command(deployment: str, accept: bool | None, lock_timeout: str, root: Path | None) -> None:
    from edgeops.ui import LiveReporter, console, err_console, result_table

    with LiveReporter() as reporter:  # resume and promote continue the rollout from what git asks for
        done = service.settle_paused(deployment, accept, settings(root), reporter,
                                     progress=lambda m: err_console.print(m),
                                     lock_timeout_s=_duration(lock_timeout), notify=notice)
    if done.settled is not None:
        console.print(f"{done.settled.outcome}: {done.settled.message}")
    result = done.continued or done.settled
    assert result is not None
    if done.continued is not None:
        console.print(result_table(result))
        console.print(f"{result.outcome}: {result.message}", soft_wrap=True)
    sys.exit(ExitCode.OK if result.ok else ExitCode.FAILED)


@main.command()
@click.argument("deployment")
@LOCK_TIMEOUT
@ROOT_OPTION
@handle_errors
def resume(deployment: str, lock_timeout: str, root: Path | None) -> None:
    """Continue a paused rollout: measure the paused devices again, then go on wave by wave."""
    _settle_paused_command(deployment, None, lock_timeout, root)


@main.command()
@click.argument("deployment")
@LOCK_TIMEOUT
@ROOT_OPTION
@handle_errors
def promote(deployment: str, lock_timeout: str, root: Path | None) -> None:
    """Accept what the paused devices run as it was measured (recorded with who did it), then continue."""
    _settle_paused_command(deployment, True, lock_timeout, root)


@main.command()
@click.argument("deployment")
@LOCK_TIMEOUT
@ROOT_OPTION
@handle_errors
def abort(deployment: str, lock_timeout: str, root: Path | None) -> None:
    """End a paused rollout: the paused devices reject their new release and go back to their committed one."""
    _settle_paused_command(deployment, False, lock_timeout, root)


@main.command()
@click.option("--base", required=True, metavar="REV", help="compare against this revision")
@click.option("--head", metavar="REV", help="default: the work tree")
@OUTPUT
@ROOT_OPTION
@handle_errors
def diff(base: str, head: str | None, output: str, root: Path | None) -> None:
    """Which deployments a git change touches (following models, data, fleets, profiles, templates)."""
    touched = service.diff(base, head, settings(root))
    if output == "json":
        click.echo(json.dumps([{"deployment": t.deployment, "manifest": t.manifest, "reasons": list(t.reasons)}
                               for t in touched], indent=2))
        return
    for t in touched:
        click.echo(f"{t.deployment}  {t.manifest}")
        for reason in t.reasons:
            click.echo(f"  {reason}")
    if not touched:
        click.echo("no deployment is touched")


@main.command()
@click.argument("manifests", nargs=-1)
@click.option("--drift-only", is_flag=True, help="only devices that are not on the release git asks for; "
                                                 "exit 1 when there are any (for a scheduled check)")
@click.option("--verify", is_flag=True, help="hash every file of the running and committed releases on each device "
                                             "(default: sizes and modification times, every time)")
@SELECTOR
@click.option("-o", "--output", type=click.Choice(["table", "wide", "json", "prometheus"]), default="table",
              show_default=True, help="table: compact, for a terminal; wide: every column; json: for machines; "
                                      "prometheus: OpenMetrics text (the last rollout decision included)")
@ROOT_OPTION
@handle_errors
def status(manifests: tuple[str, ...], drift_only: bool, verify: bool, selector: str | None, output: str,
           root: Path | None) -> None:
    """Fleet health: one row per device, sync against git, last verification. Non-zero exit when unhealthy.

    With no MANIFEST: every deployment of the repository.
    """
    from edgeops.ui import broken_lines, console, err_console, status_summary, status_table

    if output == "prometheus":
        with err_console.status("reading devices"):
            click.echo(service.metrics(manifests, settings(root), notify=notice, selector=selector).decode(), nl=False)
        return
    with err_console.status("reading devices") as spinner:
        found = service.status(manifests, settings(root), verify=verify, progress=spinner.update, notify=notice,
                                selector=selector)
    everything = {name: [r for r in rows if r.drifted] if drift_only else rows for name, rows in found.rows.items()}
    if output == "json":
        click.echo(json.dumps([{"deployment": name, "devices": [r.as_dict() for r in rows]}
                               for name, rows in everything.items()]
                              + [{"deployment": name, "error": lines} for name, lines in found.broken.items()],
                              indent=2))
    else:
        for name, rows in everything.items():
            if drift_only and not rows:
                console.print(f"{name}: no drift, every device runs the release git asks for")
                continue
            console.print(status_table(name, rows, wide=output == "wide"))
            console.print(status_summary(rows))
        for name, lines in found.broken.items():
            err_console.print(broken_lines(name, lines))
    rows = [r for group in everything.values() for r in group]
    if drift_only:
        sys.exit(ExitCode.FAILED if rows or found.broken else ExitCode.OK)
    healthy = all(r.health == Health.HEALTHY for r in rows) and not found.broken
    sys.exit(ExitCode.OK if healthy else ExitCode.FAILED)


def _serve_command(name: str, summary: str) -> None:
    @main.command(name, help=summary)
    @click.argument("manifests", nargs=-1)
    @click.option("--address", default="127.0.0.1", show_default=True,
                  help="listen on this address (the page has no login: keep it on 127.0.0.1 or behind a proxy)")
    @click.option("--port", type=int, default=9108, show_default=True, help="listen on this port (0: any free one)")
    @click.option("--interval", default="60s", show_default=True, help="how often to read the devices again: 30s, 5m")
    @SELECTOR
    @ROOT_OPTION
    @handle_errors
    def serve(manifests: tuple[str, ...], address: str, port: int, interval: str, selector: str | None,
              root: Path | None) -> None:
        from edgeops.ui import err_console

        service.serve(manifests, settings(root), address, port, _duration(interval),
                      log=lambda m: err_console.print(m), notify=notice, selector=selector)


_serve_command("serve", "Serve a read-only fleet page (deployments, fleets, devices, each rollout's report) and "
                        "/metrics for Prometheus, read from the devices every --interval.")
_serve_command("serve-metrics", "The same server as `edgeops serve` (its old name): /metrics for Prometheus, and "
                                "the fleet page.")


@main.command()
@click.argument("manifests", nargs=-1)
@click.option("--interval", default="5m", show_default=True, help="time between checks: 30s, 5m, 1h")
@click.option("--iterations", type=int, default=0, help="stop after this many checks (0: run until stopped)")
@click.option("--verify-every", type=int, default=12, show_default=True,
              help="hash every release file on the devices on the first check and every N-th after (0: never)")
@ROOT_OPTION
@handle_errors
def reconcile(manifests: tuple[str, ...], interval: str, iterations: int, verify_every: int, root: Path | None) -> None:
    """Opt-in loop: re-apply any deployment whose devices drifted from git, with the same budgets as apply."""
    from edgeops.ui import err_console

    failures = service.reconcile(manifests, _duration(interval), iterations, verify_every, settings(root),
                                 log=lambda m: err_console.print(m))
    sys.exit(ExitCode.FAILED if failures else ExitCode.OK)


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise click.BadParameter(f"{text!r}: use a number with s, m or h (30s, 5m, 1h)") from None


@main.command()
@click.argument("deployment")
@click.option("--limit", default=20, show_default=True)
@OUTPUT
@ROOT_OPTION
@handle_errors
def history(deployment: str, limit: int, output: str, root: Path | None) -> None:
    """Rollouts of a deployment: when, who, artifact, decisions and the measurements behind them."""
    from edgeops.ui import console, history_table

    name, rollouts = service.history(deployment, limit, settings(root))
    if output == "json":
        click.echo(json.dumps(rollouts, indent=2))
    elif not rollouts:
        console.print(f"no rollouts of {name} in the ledger yet")
    else:
        console.print(history_table(name, rollouts))


@main.command()
@click.argument("deployment")
@click.option("--rollout", "number", type=click.IntRange(min=1), help="the rollout's number in `edgeops history` (default: the newest "
                                                    "that measured devices)")
@click.option("-o", "--output", type=click.Choice(["html", "json"]), default="html", show_default=True)
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="write the report to this file (default: standard output)")
@ROOT_OPTION
@handle_errors
def report(deployment: str, number: int | None, output: str, out_file: Path | None, root: Path | None) -> None:
    """A rollout as a page to look at: per device the A/B latency distributions, the gate's intervals, energy;
    the build stages. HTML is self-contained (inline SVG plots, nothing loaded)."""
    if output == "html":
        text = service.report_html(deployment, number, settings(root))
    else:
        name, rollout, reports = service.report(deployment, number, settings(root))
        text = json.dumps({"deployment": name, "rollout": rollout, "builds": reports}, indent=2) + "\n"
    if out_file is None:
        click.echo(text, nl=False)
    else:
        out_file.write_text(text)
        click.echo(f"wrote {out_file}", err=True)


@main.command()
@click.argument("deployment")
@click.option("--rounds", type=click.IntRange(1, 1000), help="rounds to run (default: the deployment's adapt.rounds)")
@OUTPUT
@ROOT_OPTION
@handle_errors
def adapt(deployment: str, rounds: int | None, output: str, root: Path | None) -> None:
    """Federated rounds: devices train the head on their own samples, only clipped updates come back, and a
    head better on the evaluation data is rolled out like any release (waves, verification, rollback)."""
    from edgeops.ui import LiveReporter, adapt_table, console

    with LiveReporter() as reporter:
        results = service.adapt(deployment, rounds, settings(root), reporter, notify=notice)
    if output == "json":
        click.echo(json.dumps([{"round": r.number, "outcome": r.outcome, "message": r.message, **r.summary}
                               for r in results], indent=2, default=str))
    else:
        console.print(adapt_table(results))
    failed = any(r.outcome == "rejected" for r in results)
    sys.exit(ExitCode.FAILED if failed else ExitCode.OK)


@main.command()
@click.argument("deployment")
@LOCK_TIMEOUT
@OUTPUT
@ROOT_OPTION
@handle_errors
def decide(deployment: str, lock_timeout: str, output: str, root: Path | None) -> None:
    """Measure an auto build's finalists side by side on one device of each hardware class (quantize.decide_on:
    device) and record what each class runs from the next apply on; apply does this by itself when git's build
    has no decision yet. Nothing a device runs changes here."""
    from edgeops.ui import console, decide_table

    decided = service.decide(deployment, settings(root), _duration(lock_timeout), notify=notice)
    if output == "json":
        click.echo(json.dumps(decided, indent=2))
    else:
        console.print(decide_table(decided))
    sys.exit(ExitCode.OK if decided and all(d["label"] for d in decided.values()) else ExitCode.FAILED)


@main.command()
@click.argument("deployment")
@click.option("--to", "to_release", help="an earlier committed release still on the devices: a fleet-wide id "
                                        "(rel-..., or a prefix of it; each device goes to its own materialisation) or "
                                        "one device release (r-...); default: undo the last rollout, each device it "
                                        "changed back to its previous committed release")
@click.option("--allow-rejected", is_flag=True, help="with --to: run the named release even where a device rejected it")
@click.option("--devices", help="comma-separated device names (default: every target device)")
@LOCK_TIMEOUT
@SELECTOR
@OUTPUT
@ROOT_OPTION
@handle_errors
def rollback(deployment: str, to_release: str | None, allow_rejected: bool, devices: str | None, lock_timeout: str,
             selector: str | None, output: str, root: Path | None) -> None:
    """Undo the last rollout without any transfer, verify, record (a no-op when there is nothing to undo).

    Only committed releases are targets; a device the last rollout did not change, or already reverted by
    itself, is left alone. Takes the fleets' lock like apply.
    """
    if allow_rejected and not to_release:
        raise click.UsageError("--allow-rejected needs --to RELEASE: a rejected release runs only when named")
    from edgeops.ui import LiveReporter, console, result_table

    names = [d.strip() for d in devices.split(",")] if devices else None
    with LiveReporter() as reporter:
        result = service.rollback(deployment, to_release, names, settings(root), reporter, allow_rejected,
                                  lock_timeout_s=_duration(lock_timeout), notify=notice, selector=selector)
    if output == "json":
        click.echo(json.dumps({"outcome": result.outcome, "summary": service.summarize(result),
                               "devices": [d.__dict__ for d in result.devices]}, indent=2, default=str))
    else:
        console.print(result_table(result))
        console.print(f"{result.outcome}: {result.message}", soft_wrap=True)
    sys.exit(ExitCode.OK if result.ok else ExitCode.FAILED)
