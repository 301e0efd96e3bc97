"""What can be known without a device: the model file against its declaration, recipes against the
model, fleets against each other. Each check returns located problems; the loader decides what to report.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeops.errors import Problem
from edgeops.hints import did_you_mean
from edgeops.manifest.models import Deployment, Fleet, RecipeStep
from edgeops.manifest.secrets import SecretNameError, secret_path
from edgeops.manifest.yamlload import Loc

if TYPE_CHECKING:
    from edgeops.manifest.workspace import Document, Workspace

ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}
HOST_PATTERN = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                          r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")
USER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


def _did_you_mean(value: str, known: list[str]) -> str:
    return did_you_mean(value, known, f"; the model has: {', '.join(known) or 'none'}")


def host_problem(host: str) -> str | None:
    """Why ``host`` is not a host name or IP address an SSH client can connect to (None: fine)."""
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        pass
    if "@" in host:
        return f"'{host}' is not a host name; put the user in ssh.user"
    if host.count(":") == 1 and host.split(":")[1].isdigit():
        return f"'{host}' is not a host name; put the port in port"
    if not HOST_PATTERN.match(host):
        return f"'{host}' is not a valid host name or IP address"
    return None


def user_problem(user: str) -> str | None:
    return None if USER_PATTERN.match(user) else f"'{user}' is not a valid user name"


def jump_host_problem(spec: str) -> str | None:
    """``[user@]host[:port]`` with each part valid."""
    user, at, rest = spec.rpartition("@")
    host, colon, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    if at and (problem := user_problem(user)):
        return f"{problem} (jump_host is [user@]host[:port])"
    if colon and not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"port '{port}' is not a number from 1 to 65535 (jump_host is [user@]host[:port])"
    if problem := host_problem(host):
        return f"{problem} (jump_host is [user@]host[:port])"
    return None


def _secret(secrets_dir: Path, name: str) -> Path | None:
    try:
        return secret_path(secrets_dir, name)
    except SecretNameError:
        return None  # an error of its own (credential_problems); nothing to look at


def missing_identity_file(fleet: Document[Fleet], secrets_dir: Path) -> Path | None:
    """Where the fleet's ssh.identity_file lies in the secrets directory, when it is not there."""
    name = fleet.obj.spec.ssh.identity_file
    path = _secret(secrets_dir, name) if name else None
    return path if path is not None and not path.is_file() else None


def missing_trust_files(fleet: Document[Fleet], secrets_dir: Path) -> list[tuple[tuple[str, ...], str, Path]]:
    """(field, as written, resolved) of the fleet's trust files (allowed signers in the repository, signing key
    in the secrets directory) that are missing."""
    trust = fleet.obj.spec.trust
    if trust is None:
        return []
    resolved: list[tuple[tuple[str, ...], str, Path | None]] = [
        (("spec", "trust", "allowed_signers"), trust.allowed_signers, fleet.resolve(trust.allowed_signers))]
    if trust.signing_key:
        resolved.append((("spec", "trust", "signing_key"), trust.signing_key, _secret(secrets_dir, trust.signing_key)))
    return [(loc, name, path) for loc, name, path in resolved if path is not None and not path.is_file()]


def check_fleet_addresses(fleets: list[Document[Fleet]], secrets_dir: Path) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings): host and user names, jump hosts, identity files, duplicate host:port."""
    errors: list[Problem] = []
    warnings: list[Problem] = []
    seen: dict[tuple[str, int], str] = {}
    for fleet in sorted(fleets, key=lambda f: f.display):
        ssh = fleet.obj.spec.ssh
        if problem := user_problem(ssh.user):
            errors.append(fleet.problem(("spec", "ssh", "user"), problem))
        if ssh.jump_host and (problem := jump_host_problem(ssh.jump_host)):
            errors.append(fleet.problem(("spec", "ssh", "jump_host"), problem))
        if missing_identity_file(fleet, secrets_dir):
            warnings.append(fleet.problem(("spec", "ssh", "identity_file"),
                                          f"{ssh.identity_file} does not exist (yet): connecting will fail "
                                          "until it does (`edgeops lab up` creates the lab's)"))
        for loc, name, _ in missing_trust_files(fleet, secrets_dir):
            warnings.append(fleet.problem(loc, f"{name} does not exist (yet): signed releases cannot be made "
                                               "until it does (`edgeops lab up` creates the lab's)"))
        for index, device in enumerate(fleet.obj.spec.devices):
            if device.host is None:  # a pull fleet's device: nothing dials it
                continue
            if problem := host_problem(device.host):
                errors.append(fleet.problem(("spec", "devices", index, "host"), problem))
                continue
            address = (device.host.lower().strip("[]"), device.port)
            where = f"{fleet.display} device {device.name}"
            if address in seen:
                errors.append(fleet.problem(("spec", "devices", index, "port"),
                                            f"{device.host}:{device.port} is also {seen[address]}; one address "
                                            "is one device"))
            else:
                seen[address] = where
    return errors, warnings


def _load_onnx(path: Path):  # type: ignore[no-untyped-def]
    """The model (without external data), or why the file is not one."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several kinds for bytes that are not a model
        return f"is not an ONNX model ({type(exc).__name__}: {str(exc)[:120] or 'unreadable'})"
    if not model.graph.node and not model.graph.output:
        return "is not an ONNX model (no graph: a file of another kind, or empty)"
    return model


def check_model(dep: Document[Deployment]) -> list[Problem]:
    """Declared inputs and outputs against the ONNX file; the quality output and recipe op types against it."""
    spec = dep.obj.spec
    path = dep.resolve(spec.model.path)
    model = _load_onnx(path) if path.is_file() else None
    if model is None:
        return []
    if isinstance(model, str):
        return [dep.problem(("spec", "model", "path"), f"{spec.model.path} {model}")]
    external, leaks = external_data_files(model, path)
    if leaks:
        return [dep.problem(("spec", "model", "path"), f"{spec.model.path}: {leaks[0]}")]
    missing_data = [f.name for f in external if not f.is_file()]
    if missing_data:
        return [dep.problem(("spec", "model", "path"), f"{spec.model.path} keeps weights in "
                            f"{', '.join(missing_data)}, which is not beside it")]
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    actual = {"inputs": {v.name: v for v in graph.input if v.name not in initializers},
              "outputs": {v.name: v for v in graph.output}}
    problems: list[Problem] = []
    if spec.model.task == "text-generation":
        problems += _decoder_layout(dep, set(actual["inputs"]), set(actual["outputs"]))
    for side in ("inputs", "outputs"):
        declared = getattr(spec.model, side)
        if not declared and spec.model.task == "text-generation":
            continue
        names = list(actual[side])
        for index, tensor in enumerate(declared):
            loc = ("spec", "model", side, index)
            value = actual[side].get(tensor.name)
            if value is None:
                problems.append(dep.problem(loc + ("name",), f"the model has no {side[:-1]} '{tensor.name}'"
                                            + _did_you_mean(tensor.name, names)))
                continue
            kind = value.type.tensor_type
            dtype = ONNX_DTYPES.get(kind.elem_type, f"onnx type {kind.elem_type}")
            if dtype != tensor.dtype:
                problems.append(dep.problem(loc + ("dtype",), f"'{tensor.name}' is {dtype} in the model, "
                                            f"declared {tensor.dtype}"))
            if kind.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in kind.shape.dim]
                if len(dims) != len(tensor.shape):
                    problems.append(dep.problem(loc + ("shape",), f"'{tensor.name}' has rank {len(dims)} in the "
                                                f"model {dims}, declared rank {len(tensor.shape)} {tensor.shape}"))
                else:
                    for axis, (have, want) in enumerate(zip(dims, tensor.shape)):
                        if isinstance(have, int) and isinstance(want, int) and have != want:
                            problems.append(dep.problem(loc + ("shape",), f"'{tensor.name}' axis {axis} is {have} "
                                                        f"in the model, declared {want}"))
        missing = [n for n in names if n not in {t.name for t in declared}]
        misnamed = [t for t in declared if t.name not in actual[side]]
        if side == "inputs" and missing and not misnamed:
            problems.append(dep.problem(("spec", "model", "inputs"), f"the model also needs input(s) "
                                        f"{', '.join(missing)}; declare every input"))
    output = spec.quality.output
    if output and output not in actual["outputs"]:
        problems.append(dep.problem(("spec", "quality", "output"), f"the model has no output '{output}'"
                                    + _did_you_mean(output, list(actual["outputs"]))))
    op_types = sorted({node.op_type for node in graph.node})
    node_names = [node.name for node in graph.node if node.name]
    recipes: list[tuple[Loc, list[RecipeStep]]] = [(("spec", "recipe"), spec.recipe)]
    recipes += [(("spec", "recipe_for", acc), steps) for acc, steps in spec.recipe_for.items()]
    for recipe_loc, steps in recipes:
        for index, step in enumerate(steps):
            excluded = step.quantize.exclude_nodes if step.quantize else None
            for position, name in enumerate(excluded or []):
                if name not in node_names:
                    problems.append(dep.problem((*recipe_loc, index, "quantize", "exclude_nodes", position),
                                                f"the model has no node named '{name}'"
                                                + did_you_mean(name, node_names, f" ({len(node_names)} nodes; "
                                                               "`edgeops build` lists the sensitive ones)")))
            wanted = step.quantize.op_types if step.quantize else None
            for position, op in enumerate(wanted or []):
                if op not in op_types:
                    problems.append(dep.problem((*recipe_loc, index, "quantize", "op_types", position),
                                                f"the model has no {op} nodes" + _did_you_mean(op, op_types)))
    return problems


def external_data_files(model: Any, model_path: Path) -> tuple[list[Path], list[str]]:
    """(the files ``model``'s tensors keep their data in, problems): each must be a plain relative name beside
    the model (a location that leaves its directory would make a build read, and ship, any file)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    base = model_path.parent.resolve()
    files: list[Path] = []
    problems: list[str] = []
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        resolved = (base / location).resolve()
        if not location or Path(location).is_absolute() or ".." in Path(location).parts or \
                not resolved.is_relative_to(base):
            problems.append(f"tensor {tensor.name} keeps its data at {location!r}, outside the model's directory")
        elif resolved not in files:
            files.append(resolved)
    return files, problems


DECODER_INPUTS = ("input_ids", "attention_mask")  # position_ids too, unless the model derives them from the mask


def _decoder_layout(dep: Document[Deployment], inputs: set[str], outputs: set[str]) -> list[Problem]:
    """A text-generation model is one decoder step with a KV cache, named as onnxruntime-genai names it."""
    missing = [n for n in DECODER_INPUTS if n not in inputs]
    past = sorted(n for n in inputs if n.startswith("past_key_values."))
    present = {n.replace("past_key_values", "present") for n in past}
    if not past:
        missing.append("past_key_values.N.key/value")
    missing += [f"output {n}" for n in ["logits", *sorted(present)] if n not in outputs]
    if not missing:
        return []
    return [dep.problem(("spec", "model", "path"), f"{dep.obj.spec.model.path} is not a decoder step in onnxruntime-genai's "
                        f"layout: it lacks {', '.join(missing)} (input_ids, attention_mask, [position_ids,] "
                        "past_key_values.N.key/value -> logits, present.N.key/value)")]


def closure(ws: Workspace, files: list[Path]) -> set[str]:
    """Display names of the given files plus every fleet and profile file the given documents refer to."""
    wanted = {p.resolve() for p in files}
    displays: set[str] = set()
    fleets = set()
    for doc in (*ws.deployments.values(), *ws.fleets.values(), *ws.profiles.values()):
        if doc.path in wanted:
            displays.add(doc.display)
    for dep in ws.deployments.values():
        if dep.path in wanted:
            fleets |= {t.fleet for t in dep.obj.spec.targets}
    for fleet in ws.fleets.values():
        if fleet.path in wanted:
            fleets.add(fleet.name)
    profiles = set()
    for name in fleets:
        if name in ws.fleets:
            fleet = ws.fleets[name]
            displays.add(fleet.display)
            profiles |= {fleet.obj.spec.profile} | {d.profile for d in fleet.obj.spec.devices if d.profile}
        elif name in ws.broken_files:
            displays.add(ws.broken_files[name])
    for name in profiles:
        if name in ws.profiles:
            displays.add(ws.profiles[name].display)
        elif name in ws.broken_files:
            displays.add(ws.broken_files[name])
    return displays
