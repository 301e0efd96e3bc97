"""Render one runtime config per device from templates/ in a Jinja2 sandbox.

StrictUndefined turns a misspelt variable into an error; every error names
the template file and line. The output must be valid JSON (NaN and Infinity
included as errors) and must match ``RuntimeConfig``.
"""

from __future__ import annotations

import json
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment
from pydantic import ValidationError

from edgeops.errors import Problem, RenderError
from edgeops.generative.config import generation_section
from edgeops.manifest.models import Deployment
from edgeops.manifest.workspace import Document, Workspace
from edgeops.runtime_config import RuntimeConfig, canonical_json, digest
from edgeops.targets import TargetDevice, deep_substitute


@dataclass(frozen=True)
class RenderedConfig:
    device: TargetDevice
    text: str            # canonical JSON, what lands on the device as runtime.json
    digest: str
    generic_text: str = ""   # the same config with the device's own values as placeholders ({device}, {root}, ...)

    @property
    def generic_digest(self) -> str:
        """Equal for every device of a hardware class that renders the same config but for its own values."""
        return digest(self.generic_text or self.text)

    @property
    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.text)
        return data


def _strict_json(value: Any, **kwargs: Any) -> str:
    """``tojson`` that fails on undefined values instead of serialising them somehow."""

    def default(obj: Any) -> Any:
        if isinstance(obj, jinja2.Undefined):
            obj._fail_with_undefined_error()
        raise TypeError(f"{type(obj).__name__} cannot be written as JSON")

    return json.dumps(value, default=default, allow_nan=False, **kwargs)


def environment(templates: Path) -> SandboxedEnvironment:
    env = SandboxedEnvironment(loader=jinja2.FileSystemLoader(str(templates)), undefined=jinja2.StrictUndefined,
                               autoescape=False, keep_trailing_newline=True)
    env.policies["json.dumps_function"] = _strict_json
    return env


_GENERIC: weakref.WeakKeyDictionary[SandboxedEnvironment, dict[tuple[str, str], str]] = weakref.WeakKeyDictionary()
PLACEHOLDERS: dict[str, Any] = {"name": "{device}", "host": "{host}", "port": 0, "root": "{root}"}


def context(deployment: Document[Deployment], target: TargetDevice, artifact: dict[str, Any],
            placeholders: bool = False) -> dict[str, Any]:
    """What a template sees: plain data only (copies), never live objects.

    ``placeholders``: the device's own values (name, host, port, root) replaced by placeholders, for the
    config every device of its class shares (what names a fleet-wide release).
    """
    own = dict(PLACEHOLDERS) if placeholders else {"name": target.name, "host": target.device.host or "",
                                                    "port": target.device.port, "root": target.root}
    profile = deep_substitute(target.profile.obj.spec.model_dump(mode="json"), str(own["name"]), str(own["root"]))
    spec = deployment.obj.spec
    generation = None
    if spec.generation is not None:
        generation = generation_section(spec.generation, target.profile.obj.spec.generation, artifact["generation"])
    return {
        "deployment": {"name": deployment.name, "labels": dict(deployment.obj.metadata.labels)},
        "device": {**own, "labels": dict(target.device.labels), "fleet": target.fleet.name},
        "profile": profile,
        "model": spec.model.model_dump(mode="json", include={"inputs", "outputs"}),
        "quality": spec.quality.model_dump(mode="json"),
        "slo": spec.slo.model_dump(mode="json"),
        "artifact": {"sha256": artifact["sha256"], "golden_sha256": artifact["golden_sha256"],
                     "quality_output": artifact["quality_output"], "size_bytes": artifact["size_bytes"]},
        "generation": generation,
    }


def _template_line(exc: BaseException, name: str) -> int | None:
    """Jinja rewrites tracebacks so template frames carry the template's file name and line."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.endswith(".j2"):
            return frame.lineno
    return getattr(exc, "lineno", None)


def render_device(ws: Workspace, deployment: Document[Deployment], target: TargetDevice,
                  artifact: dict[str, Any], env: SandboxedEnvironment | None = None) -> RenderedConfig:
    """The runtime config of one device. Raises RenderError (located in the template).

    ``env``: one environment for many devices, so each template is compiled once (it reloads a template
    whose file changed)."""
    env = env or environment(ws.templates_dir)
    text = _render(env, target, context(deployment, target, artifact))
    shared = context(deployment, target, artifact, placeholders=True)
    key = (target.profile.obj.spec.template, json.dumps(shared, sort_keys=True))
    generic = _GENERIC.get(env, {}).get(key)  # devices of a class mostly share it: rendered once per environment
    if generic is None:
        try:
            generic = _render(env, target, shared)
        except RenderError:
            generic = text  # a template that needs the real values: this device's config is a variant of its own
        else:
            _GENERIC.setdefault(env, {})[key] = generic
    return RenderedConfig(target, text, digest(text), generic)


def _render(env: SandboxedEnvironment, target: TargetDevice, values: dict[str, Any]) -> str:
    """Canonical JSON of one rendering; raises RenderError located in the template."""
    name = target.profile.obj.spec.template
    display = f"templates/{name}"
    try:
        text = env.get_template(name).render(values)
    except jinja2.TemplateSyntaxError as exc:
        file = f"templates/{exc.name or name}"
        raise RenderError([Problem(file, exc.lineno, "", f"template syntax error: {exc.message}")]) from None
    except jinja2.TemplateNotFound as exc:
        raise RenderError([Problem(display, None, "", f"template not found: {exc.name}")]) from None
    except jinja2.UndefinedError as exc:
        raise RenderError([Problem(_frame_file(exc, display), _template_line(exc, name), "",
                                   f"{exc.message} (rendering for device {target.key})")]) from None
    except jinja2.exceptions.SecurityError as exc:
        raise RenderError([Problem(display, _template_line(exc, name), "", f"unsafe template operation: {exc}")]) from None
    except Exception as exc:  # noqa: BLE001 - any other template runtime error is the template's fault
        raise RenderError([Problem(_frame_file(exc, display), _template_line(exc, name), "",
                                   f"template failed: {type(exc).__name__}: {exc}")]) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        line = getattr(exc, "lineno", None)
        raise RenderError([Problem(display, None, "", f"rendered output is not valid JSON for device {target.key} "
                                   f"(output line {line}: {getattr(exc, 'msg', exc)}); use the tojson filter "
                                   "for every value")]) from None
    try:
        config = RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise RenderError([Problem(display, None, field, f"rendered config does not match edgeops.runtime/v1: "
                                   f"{first['msg']} (device {target.key})")]) from None
    return canonical_json(config.model_dump(mode="json", by_alias=True, exclude_none=True))


def _frame_file(exc: BaseException, default: str) -> str:
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.endswith(".j2"):
            return "templates/" + Path(frame.filename).name
    return default


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")
