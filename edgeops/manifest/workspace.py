"""Load manifests, fleets and profiles from a repository and check how they refer to each other.

A *workspace* is the repository root: the directory holding ``device_profiles/``
(found by walking up from the path a user gives). Every file is loaded with its
line map so any later stage can still say ``file:line`` for a field.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import importlib.util
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from edgeops.errors import InputError, Problem
from edgeops.hints import did_you_mean
from edgeops.manifest.checks import check_fleet_addresses, check_model, closure
from edgeops.manifest.locate import clean_loc, problems_from
from edgeops.manifest.models import (
    ACCELERATOR_PROVIDERS,
    KINDS,
    Deployment,
    DeviceProfile,
    Fleet,
    RecipeStep,
    plaintext_host,
)
from edgeops.manifest.placement import placed, read_placement
from edgeops.manifest.secrets import credential_problems, default_secrets_dir
from edgeops.manifest.yamlload import Loc, dotted, line_for, load_yaml

T = TypeVar("T", bound=BaseModel, covariant=True)
Check = Callable[["Workspace", Sequence["Document[Any]"]], list[Problem]]
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Document(Generic[T]):
    """A validated object and where each of its fields was written."""

    obj: T
    path: Path
    display: str
    lines: dict[Loc, int] = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        metadata = getattr(self.obj, "metadata", None)
        return str(metadata.name) if metadata else ""

    def problem(self, loc: Loc, message: str) -> Problem:
        return Problem(self.display, line_for(self.lines, loc), dotted(loc), message)

    def where(self, loc: Loc) -> str:
        """``file:line`` of a field (of its nearest written parent when the field is left at its default)."""
        return f"{self.display}:{line_for(self.lines, loc)}"

    def error(self, loc: Loc, message: str) -> InputError:
        """A located error for a field of this document."""
        return InputError([self.problem(loc, message)])

    def resolve(self, relative: str) -> Path:
        """A path written in this document, relative to the document's directory (an absolute one stays)."""
        return (self.path.parent / relative).resolve()


def find_root(start: Path) -> Path:
    """The nearest directory at or above ``start`` that holds ``device_profiles/``."""
    here = start.resolve()
    if here.is_file():
        here = here.parent
    for candidate in (here, *here.parents):
        if (candidate / "device_profiles").is_dir():
            return candidate
    raise InputError.at(str(start), None, "", "no device_profiles/ directory here or above; "
                        "run edgeops inside an edgeops repository or pass --root")


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path, Path.cwd())
    except ValueError:
        return str(path)


def load_document(path: Path) -> Document[BaseModel]:
    """Parse and validate one file of any kind. Raises InputError listing every problem."""
    doc, problems = parse_document(path)
    if problems or doc is None:
        raise InputError(problems)
    return doc


def parse_document(path: Path) -> tuple[Document[BaseModel] | None, list[Problem]]:
    """(document, problems) of one file. With schema problems, the document is what remains valid once the
    fields in error are left out (None when nothing does): enough to check its references in the same round."""
    display = _display(path)
    data, lines = load_yaml(path, display)
    if not isinstance(data, dict):
        raise InputError.at(display, 1, "", f"expected a mapping with apiVersion and kind (got {type(data).__name__})")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        if kind is None:
            raise InputError.at(display, 1, "kind", f"required field is missing; one of {', '.join(KINDS)}")
        hint = did_you_mean(str(kind), KINDS, f"; one of {', '.join(KINDS)}")
        raise InputError.at(display, line_for(lines, ("kind",)), "kind", f"unknown kind {kind!r}{hint}")
    model = KINDS[kind]
    try:
        return Document(model.model_validate(data), path.resolve(), display, lines), []
    except ValidationError as exc:
        problems = problems_from(exc, model, display, lines)
        partial = _without_errors(model, data, exc, lines)
        return (Document(partial, path.resolve(), display, lines) if partial else None), problems


def _without_errors(model: type[BaseModel], data: dict[str, Any], exc: ValidationError, lines: dict[Loc, int],
                    attempts: int = 4) -> BaseModel | None:
    """The document with every field in error left out (a list in error as a whole, so no index moves)."""
    data = copy.deepcopy(data)
    for _ in range(attempts):
        for error in exc.errors():
            loc = clean_loc(model, tuple(error["loc"]), lines)
            if any(isinstance(part, int) for part in loc):
                loc = loc[:next(i for i, part in enumerate(loc) if isinstance(part, int))]
            parent: Any = data
            for part in loc[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if not loc or not isinstance(parent, dict) or loc[-1] not in parent:
                return None  # a required field is missing or the error is the document's own: nothing to keep
            del parent[loc[-1]]
        try:
            return model.model_validate(data)
        except ValidationError as again:
            exc = again
    return None


def yaml_files(paths: list[Path]) -> list[Path]:
    """Files named directly plus every YAML file under named directories, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in YAML_SUFFIXES and p.is_file()))
        else:
            found.append(path)
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.resolve(), None)
    return list(unique)


@dataclass
class Workspace:
    """Every document of a repository, by kind and name."""

    root: Path
    secrets_dir: Path = field(default_factory=lambda: default_secrets_dir(Path.home()))
    deployments: dict[str, Document[Deployment]] = field(default_factory=dict)
    fleets: dict[str, Document[Fleet]] = field(default_factory=dict)
    profiles: dict[str, Document[DeviceProfile]] = field(default_factory=dict)
    broken_files: dict[str, str] = field(default_factory=dict, repr=False)  # name -> file of documents that failed
    warnings: list[Problem] = field(default_factory=list)   # worth saying, not blocking (a key not created yet)
    problems: list[Problem] = field(default_factory=list)   # what a tolerant load did not raise
    unrelated: list[Problem] = field(default_factory=list)  # problems outside the focus: worth a warning

    @property
    def broken(self) -> set[str]:
        return set(self.broken_files)

    @property
    def templates_dir(self) -> Path:
        return self.root / "templates"

    def deployment(self, name_or_path: str) -> Document[Deployment]:
        """A deployment by metadata.name or by its manifest path."""
        if name_or_path in self.deployments:
            return self.deployments[name_or_path]
        candidates = {Path(name_or_path).resolve(), (self.root / name_or_path).resolve()}
        for doc in self.deployments.values():
            if doc.path in candidates:
                return doc
        hint = did_you_mean(name_or_path, self.deployments, f"; known: {', '.join(sorted(self.deployments)) or 'none'}")
        raise InputError.at(name_or_path, None, "", f"no Deployment with this name or path{hint}")

    def fleet(self, name: str) -> Document[Fleet]:
        if name not in self.fleets:
            raise InputError.at(name, None, "", f"no Fleet named '{name}'; known: {', '.join(sorted(self.fleets))}")
        return self.fleets[name]

    def accelerators_of(self, deployment: Document[Deployment]) -> set[str]:
        found: set[str] = set()
        for target in deployment.obj.spec.targets:
            fleet = self.fleets.get(target.fleet)
            if fleet is None:
                continue
            for device in fleet.obj.spec.devices:
                profile = self.profiles.get(device.profile or fleet.obj.spec.profile)
                if profile is not None:
                    found.add(profile.obj.spec.accelerator)
        return found


def load_workspace(root: Path, extra: list[Path] | None = None, focus: list[Path] | None = None,
                   deep: bool = False, tolerant: bool = False, allow_code: bool = False,
                   secrets_dir: Path | None = None, checks: Sequence[Check] = ()) -> Workspace:
    """Load and cross-check the repository at ``root`` plus any extra files.

    Every problem is collected and raised together. With ``focus`` (files or directories), only problems
    in those files and in the fleets and profiles they refer to count: a broken manifest elsewhere in the
    repository does not stop work on this one. ``deep`` also opens the ONNX models (declared inputs and
    outputs, quality output, recipe op types). ``tolerant`` (read-only commands over the whole repository)
    keeps the problems in ``problems`` instead of raising, with every document that loaded. Fields that
    run code (a student factory, a power-sensor command) are errors unless ``allow_code``. Credential files
    are named inside ``secrets_dir`` (default ``~/.config/edgeops/secrets``). ``checks`` are more checks
    from layers above (how rollout waves select devices), so every problem is reported in one round.
    """
    files = yaml_files([p for p in (root / "manifests", root / "device_profiles") if p.is_dir()] + (extra or []))
    problems: list[Problem] = []
    workspace = Workspace(root.resolve())
    if secrets_dir is not None:
        workspace.secrets_dir = Path(os.path.abspath(secrets_dir))
    tables: dict[str, dict[str, Any]] = {"Deployment": workspace.deployments, "Fleet": workspace.fleets,
                                         "DeviceProfile": workspace.profiles}
    checked: list[Document[Any]] = []   # every document whose fields can be checked, shadowed or partial too
    partial: list[Document[Any]] = []   # documents with schema errors: checked, then left out of the tables
    for path in files:
        try:
            doc, found = parse_document(path)
        except InputError as exc:
            doc, found = None, exc.problems
        problems.extend(found)
        if found:
            workspace.broken_files[_declared_name(path)] = _display(path)
        if doc is None:
            continue
        checked.append(doc)
        table = tables[getattr(doc.obj, "kind")]
        if doc.name in table:  # a copied file: say so, and still check the copy (its own mistakes are real)
            problems.append(doc.problem(("metadata", "name"),
                                        f"{getattr(doc.obj, 'kind')} '{doc.name}' is also defined in "
                                        f"{table[doc.name].display}; names must be unique"))
            continue
        table[doc.name] = doc
        if found:
            partial.append(doc)
    for name, fleet in workspace.fleets.items():  # the lab devices this clone moved (edgeops lab up)
        workspace.fleets[name] = placed(fleet, read_placement(workspace.root, name))
    moved = {f.path: f for f in workspace.fleets.values()}
    checked = [moved.get(d.path, d) if isinstance(d.obj, Fleet) else d for d in checked]
    problems.extend(check_references(workspace, checked))
    if not allow_code:
        problems.extend(code_execution(workspace, checked))
    errors, warnings = check_fleet_addresses([d for d in checked if isinstance(d.obj, Fleet)], workspace.secrets_dir)
    workspace.warnings += warnings
    problems.extend(errors)
    if deep:
        for dep in checked:
            if isinstance(dep.obj, Deployment):
                problems.extend(check_model(dep))
    for check in checks:
        problems.extend(check(workspace, checked))
    for doc in partial:  # no command works from a document with errors
        del tables[getattr(doc.obj, "kind")][doc.name]
    problems = sorted(dict.fromkeys(problems), key=lambda p: (p.file, p.line or 0))
    if focus is not None:
        files = yaml_files(focus)
        keep = closure(workspace, files) | {_display(p) for p in files}
        workspace.unrelated = [p for p in problems if p.file not in keep]
        problems = [p for p in problems if p.file in keep]
        workspace.warnings = [w for w in workspace.warnings if w.file in keep]
    if problems and not tolerant:
        raise InputError(problems)
    workspace.problems = problems
    return workspace


def _declared_name(path: Path) -> str:
    """The metadata.name a broken file meant to declare, so references to it are not reported twice."""
    try:
        data, _ = load_yaml(path)
        return str(data["metadata"]["name"])
    except (InputError, TypeError, KeyError):
        return path.stem  # unparseable: by convention the file is named after the document


def _missing_file(doc: Document[BaseModel], loc: Loc, relative: str, what: str, root: Path) -> Problem | None:
    """A file the document names must exist and lie inside the repository (symlinks followed)."""
    path = doc.resolve(relative)
    if not path.is_relative_to(root):
        return doc.problem(loc, f"{what} {relative} resolves outside the repository (to {path}); keep it in the "
                                "repository: edgeops reads only files that are reviewed with the manifests")
    if not path.is_file():
        return doc.problem(loc, f"{what} not found: {relative} (resolved to {_display(path)}); "
                                "paths are relative to this file")
    return None


SIGNER_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-",
                    "ssh-dss")


def allowed_signers_problem(text: str) -> str | None:
    """Why ``text`` is not an OpenSSH allowed-signers file (principals [options] keytype base64-key)."""
    entries = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        return "has no signer (an allowed-signers line is: principals [options] key-type key)"
    for number, words in enumerate(entries, 1):
        key_at = next((i for i, w in enumerate(words) if w.startswith(SIGNER_KEY_TYPES)), None)
        if key_at is None or key_at == 0 or key_at + 1 >= len(words):
            return (f"entry {number} is not 'principals [options] key-type key' (an OpenSSH allowed-signers "
                    "line, e.g. release@edgeops ssh-ed25519 AAAA...)")
        try:
            base64.b64decode(words[key_at + 1], validate=True)
        except binascii.Error:
            return f"entry {number}: the key is not base64"
    return None


def _fleet_files(fleet: Document[Fleet], root: Path, warnings: list[Problem]) -> list[Problem]:
    """Files a fleet names in the repository, read for what they must be (offline). One that is missing is an
    error, except under .edgeops/, where `edgeops lab up` makes the lab's (a warning until it has)."""
    problems: list[Problem] = []
    spec = fleet.obj.spec
    if spec.trust:
        signers = fleet.resolve(spec.trust.allowed_signers)
        if signers.is_relative_to(root) and signers.exists():
            problem = "is not a file" if not signers.is_file() else \
                allowed_signers_problem(signers.read_text(errors="replace")[:1_000_000])
            if problem:
                problems.append(fleet.problem(("spec", "trust", "allowed_signers"),
                                              f"{spec.trust.allowed_signers} {problem}"))
    if spec.pull and spec.pull.ca_file:
        ca = fleet.resolve(spec.pull.ca_file)
        if ca.is_relative_to(root):
            problem = None
            if not ca.exists() and ca.is_relative_to(root / ".edgeops"):
                warnings.append(fleet.problem(("spec", "pull", "ca_file"), f"{spec.pull.ca_file} does not exist "
                                              "(yet): the controller cannot reach this fleet's broker and registry "
                                              "until it does (`edgeops lab up` creates the lab's)"))
            elif not ca.is_file():
                problem = "not found (paths are relative to this file)" if not ca.exists() else "is not a file"
            else:
                try:
                    ssl.create_default_context(cafile=str(ca))
                except (ssl.SSLError, ValueError, OSError):
                    problem = "holds no PEM certificate the controller could trust"
            if problem:
                problems.append(fleet.problem(("spec", "pull", "ca_file"), f"{spec.pull.ca_file} {problem}"))
    return problems


def _name_problem(doc: Document[BaseModel], loc: Loc, kind: str, name: str, known: Mapping[str, object]) -> Problem:
    hint = did_you_mean(name, known, f"; known: {', '.join(sorted(known)) or 'none'}")
    return doc.problem(loc, f"no {kind} named '{name}'{hint}")


ALLOW_CODE_HINT = ("it runs code; set EDGEOPS_ALLOW_CODE=1 where edgeops runs on trusted input (never for a pull "
                   "request's plan)")


def code_execution(ws: Workspace, docs: Sequence[Document[Any]]) -> list[Problem]:
    """The fields that would run code from the repository on the machine that runs edgeops.

    (A power-sensor command runs on devices only when a release is verified, i.e. by apply after review;
    reading facts, which plan and status do, never runs it.)
    """
    problems = []
    for dep in docs:
        if not isinstance(dep.obj, Deployment):
            continue
        spec = dep.obj.spec
        recipes: list[tuple[Loc, list[RecipeStep]]] = [(("spec", "recipe"), spec.recipe)]
        recipes += [(("spec", "recipe_for", acc), steps) for acc, steps in spec.recipe_for.items()]
        for loc, steps in recipes:
            for index, step in enumerate(steps):
                if step.distill and step.distill.student.factory:
                    problems.append(dep.problem((*loc, index, "distill", "student", "factory"),
                                                f"a student factory ({step.distill.student.factory}) is imported "
                                                f"and called on the build host: {ALLOW_CODE_HINT}"))
    return problems


def check_references(ws: Workspace, docs: Sequence[Document[Any]]) -> list[Problem]:
    """Problems with how documents refer to files and to each other."""
    problems: list[Problem] = []
    for profile in docs:
        if not isinstance(profile.obj, DeviceProfile):
            continue
        accelerator = profile.obj.spec.accelerator
        names = {p.name for p in profile.obj.spec.execution_providers}
        if accelerator in ACCELERATOR_PROVIDERS and not names & ACCELERATOR_PROVIDERS[accelerator]:
            wanted = ", ".join(sorted(ACCELERATOR_PROVIDERS[accelerator]))
            problems.append(profile.problem(("spec", "execution_providers"),
                                            f"a {accelerator} profile needs one of {wanted}"))
        template = (ws.templates_dir / profile.obj.spec.template).resolve()
        if not template.is_relative_to(ws.templates_dir.resolve()):
            problems.append(profile.problem(("spec", "template"), f"template {profile.obj.spec.template} resolves "
                                                                  f"outside templates/ (to {template})"))
        elif not template.is_file():
            problems.append(profile.problem(("spec", "template"),
                                            f"template not found: templates/{profile.obj.spec.template}"))
    for fleet in docs:
        if not isinstance(fleet.obj, Fleet):
            continue
        spec = fleet.obj.spec
        problems.extend(fleet.problem(loc, message) for loc, message in credential_problems(fleet.obj, ws.secrets_dir))
        problems.extend(_fleet_files(fleet, ws.root, ws.warnings))
        seen: dict[str, int] = {}
        for index, device in enumerate(spec.devices):
            if device.name in seen:
                problems.append(fleet.problem(("spec", "devices", index, "name"), f"device name '{device.name}' "
                                              f"appears twice (first as spec.devices[{seen[device.name]}])"))
            seen.setdefault(device.name, index)
        known_hosts = fleet.resolve(os.path.expanduser(spec.ssh.known_hosts)) if spec.ssh.known_hosts else None
        if known_hosts and not known_hosts.is_relative_to(ws.root):
            problems.append(fleet.problem(("spec", "ssh", "known_hosts"), f"{spec.ssh.known_hosts} resolves outside "
                                          f"the repository (to {known_hosts}); commit the fleet's known_hosts "
                                          "with it (edgeops may write to it on trust_on_first_use)"))
        if spec.trust:
            signers = fleet.resolve(spec.trust.allowed_signers)
            if not signers.is_relative_to(ws.root):
                problems.append(fleet.problem(("spec", "trust", "allowed_signers"),
                                              f"{spec.trust.allowed_signers} resolves outside the repository (to "
                                              f"{signers}); the trust root is reviewed with the fleet"))
        if spec.pull and spec.pull.ca_file and not fleet.resolve(spec.pull.ca_file).is_relative_to(ws.root):
            problems.append(fleet.problem(("spec", "pull", "ca_file"), f"{spec.pull.ca_file} resolves outside the "
                                          f"repository (to {fleet.resolve(spec.pull.ca_file)}); the CA the "
                                          "controller trusts is reviewed with the fleet"))
        if spec.pull and spec.pull.password_file and not spec.pull.insecure and plaintext_host(spec.pull.broker):
            problems.append(fleet.problem(("spec", "pull", "broker"), f"{spec.pull.broker} is plain MQTT to another "
                                          "host: the controller's password would cross the network in clear; use "
                                          "mqtts:// (with pull.ca_file), or say pull.insecure: true"))
        if spec.profile not in ws.profiles and spec.profile not in ws.broken:
            problems.append(_name_problem(fleet, ("spec", "profile"), "DeviceProfile", spec.profile, ws.profiles))
        for index, device in enumerate(spec.devices):
            if device.profile and device.profile not in ws.profiles and device.profile not in ws.broken:
                problems.append(_name_problem(fleet, ("spec", "devices", index, "profile"), "DeviceProfile",
                                              device.profile, ws.profiles))
    for dep in docs:
        if isinstance(dep.obj, Deployment):
            problems.extend(_check_deployment(ws, dep))
    return problems


def _check_deployment(ws: Workspace, dep: Document[Deployment]) -> list[Problem]:
    spec = dep.obj.spec
    problems = [p for p in (
        _missing_file(dep, ("spec", "model", "path"), spec.model.path, "model file", ws.root),
        _missing_file(dep, ("spec", "data", "calibration"), spec.data.calibration, "calibration data", ws.root),
        _missing_file(dep, ("spec", "data", "evaluation"), spec.data.evaluation, "evaluation data", ws.root),
    ) if p]
    if spec.data.training:
        problem = _missing_file(dep, ("spec", "data", "training"), spec.data.training, "training data", ws.root)
        if problem:
            problems.append(problem)
    model_path = dep.resolve(spec.model.path)
    if spec.model.sha256 and model_path.is_file():
        actual = hashlib.sha256(model_path.read_bytes()).hexdigest()
        if actual != spec.model.sha256:
            problems.append(dep.problem(("spec", "model", "sha256"),
                                        f"model bytes do not match the pinned digest (file has {actual}); "
                                        "update the pin if the model change is intended"))
    for index, target in enumerate(spec.targets):
        if target.fleet not in ws.fleets and target.fleet not in ws.broken:
            problems.append(_name_problem(dep, ("spec", "targets", index, "fleet"), "Fleet", target.fleet, ws.fleets))
    for accelerator in sorted(ws.accelerators_of(dep) | set(spec.recipe_for)):
        loc: Loc = ("spec", "recipe_for", accelerator) if accelerator in spec.recipe_for else ("spec", "recipe")
        problems.extend(_check_recipe(dep, loc, spec.recipe_for_accelerator(accelerator), accelerator, ws.root))
    return problems


def _check_recipe(dep: Document[Deployment], loc: Loc, recipe: list[RecipeStep], accelerator: str,
                  root: Path) -> list[Problem]:
    problems: list[Problem] = []
    quantize_modes = []
    for index, step in enumerate(recipe):
        where = loc + (index, step.kind)
        if step.kind == "distill":
            if importlib.util.find_spec("torch") is None:
                problems.append(dep.problem(where, "distillation needs PyTorch, which is not installed; "
                                                   "run: pip install 'edgeops[distill]' (torch==2.13.0)"))
            student = step.distill.student  # type: ignore[union-attr]
            if student.onnx:
                problem = _missing_file(dep, where + ("student", "onnx"), student.onnx, "student model", root)
                if problem:
                    problems.append(problem)
        if step.kind == "quantize":
            mode = step.quantize.mode  # type: ignore[union-attr]
            quantize_modes.append(mode)
            if mode == "fp16" and accelerator != "gpu":
                problems.append(dep.problem(where + ("mode",), f"fp16 targets GPUs, but this recipe also builds "
                                            f"for {accelerator} devices; put it under recipe_for.gpu"))
    kinds = [step.kind for step in recipe]
    if "cluster" in kinds and "quantize" in kinds:
        index = kinds.index("cluster")
        problems.append(dep.problem(loc + (index, "cluster"), "cluster and quantize do not combine in one recipe: "
                                    "a quantizer finds no constant weight behind the codebooks, and clustering "
                                    "finds no float weight in an int8 model; pick one (cluster combines with "
                                    "prune and distill)"))
    if accelerator == "tpu" and not any(m in ("static", "auto") for m in quantize_modes):
        problems.append(dep.problem(loc, "a tpu target needs a fully integer model: add "
                                         "'- quantize: {mode: static}' (or auto) to this recipe"))
    return problems
