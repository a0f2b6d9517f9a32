"""Offline check of a Serve config file for dit-serve (`dit-serve validate-config FILE`).

Starts nothing: it reads the YAML, checks the keys Ray Serve reads against Serve's own schemas
(`ray.serve.schema`; unknown keys are reported, where Serve would silently ignore them), each
application's `import_path` (imported and compared with `build_app`), its `args` (`AppConfig`), its
`model.path`, and its `deployments:` block (names of the deployments `build_app` binds, Serve's
option keys, `check_overrides`). Every problem is one line: file, application, field, what is
wrong. A file that cannot be read at all raises `UnreadableFile` (a usage error).
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from deployments.tiny.store import BUILTIN_PREFIX

APP_IMPORT_PATH = "serve_app.app:build_app"


class UnreadableFile(Exception):
    """The file is missing or cannot be read."""


@dataclass(frozen=True)
class Problem:
    app: Optional[int]  # index in `applications`, None for the file as a whole
    field: str  # dotted, e.g. deployments.Denoiser.autoscaling_config.min_replica
    message: str


@dataclass
class Report:
    ok: list[str] = field(default_factory=list)  # "<app>: ok" lines
    problems: list[str] = field(default_factory=list)  # one line each


def check_config_file(path: Path) -> Report:
    report = Report()
    document, problem = _load(path)
    if problem is None:
        problem = _not_a_serve_config(document, path)
    if problem is not None:
        report.problems.append(f"{path}: {problem}")
        return report
    apps = document["applications"]
    labels = [_app_label(app, i) for i, app in enumerate(apps)]
    problems: list[Problem] = []
    notes: dict[int, str] = {}
    problems += _schema_problems(document)
    for i, app in enumerate(apps):
        if isinstance(app, dict):
            problems += _app_problems(i, app, problems, notes)
    for p in problems:
        where = f"{labels[p.app]}: " if p.app is not None else ""
        what = f"{p.field}: " if p.field else ""
        report.problems.append(f"{path}: {where}{what}{' '.join(p.message.split())}")
    bad_apps = {p.app for p in problems}
    for i, label in enumerate(labels):
        if i not in bad_apps:
            report.ok.append(f"{label}: ok" + (f" ({notes[i]})" if i in notes else ""))
    return report


# --- the file --------------------------------------------------------------------------------


def _load(path: Path) -> tuple[Any, Optional[str]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UnreadableFile(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UnreadableFile(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        return None, "not a text file (a Serve config is YAML)"
    except OSError as exc:
        raise UnreadableFile(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        what = getattr(exc, "problem", None) or " ".join(str(exc).split())
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return None, f"not valid YAML ({at}{what})"
    if document is None:
        return None, "empty: a Serve config has an `applications:` list (see configs/local.yaml)"
    if not isinstance(document, dict):
        return None, (
            f"the top level is {_kind(document)}, not a mapping with an `applications:` list"
        )
    return document, None


def _not_a_serve_config(document: dict, path: Path) -> Optional[str]:
    apps = document.get("applications")
    if isinstance(apps, list) and apps:
        return None
    if apps is not None:
        return f"applications: must be a non-empty list of applications, got {_kind(apps)}"
    if "cluster_name" in document or "available_node_types" in document:
        return (
            f"a Ray cluster launcher file (cluster_name: {document.get('cluster_name')}), not a"
            f" Serve config: start the cluster with `ray up {path}`, then `serve deploy` a file"
            " with `applications:` (e.g. configs/flux-1gpu.yaml)"
        )
    if "kind" in document and "apiVersion" in document:
        return (
            f"a Kubernetes manifest (kind: {document['kind']}), not a Serve config; check the"
            " Serve config it embeds (spec.serveConfigV2) as a file of its own"
        )
    if "import_path" in document:
        return (
            "a single application at the top level: put it under `applications:`"
            " (see configs/local.yaml)"
        )
    keys = ", ".join(map(str, document))
    return f"no `applications:` list, so not a Serve config (top-level keys: {keys})"


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number"}
    names[bool] = "a boolean"
    return names.get(type(value), "empty" if value is None else type(value).__name__)


def _app_label(app: Any, index: int) -> str:
    name = app.get("name") if isinstance(app, dict) else None
    return name if isinstance(name, str) and name else f"applications[{index}]"


# --- Serve's own keys ------------------------------------------------------------------------


def _schema_problems(document: dict) -> list[Problem]:
    """Keys Serve does not know (anywhere its schema describes, `args` excepted) and values its
    schema refuses. `import_path` and `args` are left to `_app_problems`, which says more."""
    from ray.serve.schema import ServeDeploySchema

    problems, seen = [], set()
    for loc, message in _unknown_keys(ServeDeploySchema, document, ()):
        seen.add(loc)
        problems.append(_problem_at(document, loc, message))
    try:
        _validate(ServeDeploySchema, document)
    except Exception as exc:  # pydantic's ValidationError (v1 or v2), or a validator's own
        if not hasattr(exc, "errors"):
            return problems + [Problem(None, "", f"Serve's schema refuses it: {exc}")]
        for error in exc.errors():
            loc = tuple(error["loc"])
            if loc in seen or loc[2:3] in (("import_path",), ("args",)):
                continue
            seen.add(loc)
            problems.append(_problem_at(document, loc, _message(error)))
    return problems


def _unknown_keys(model: type, data: dict, loc: tuple) -> Iterator[tuple[tuple, str]]:
    fields = _fields(model)
    for key, value in data.items():
        if key not in fields:
            if _extra(model) != "allow":
                yield loc + (key,), _unknown("key", key, list(fields))
            continue
        models = _models_in(fields[key])
        if len(models) != 1:
            continue
        if isinstance(value, dict):
            yield from _unknown_keys(models[0], value, loc + (key,))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    yield from _unknown_keys(models[0], item, loc + (key, i))


def _fields(model: type) -> dict[str, Any]:
    """Field name (and alias) -> annotation, for pydantic v2 or v1 models."""
    out = {}
    if hasattr(model, "model_fields"):
        for name, info in model.model_fields.items():
            out[name] = info.annotation
            if info.alias:
                out[info.alias] = info.annotation
    else:
        for name, info in model.__fields__.items():
            out[name] = info.outer_type_
            out[info.alias] = info.outer_type_
    return out


def _extra(model: type) -> Optional[str]:
    config = getattr(model, "model_config", None)
    if isinstance(config, dict):
        return config.get("extra")
    return str(getattr(getattr(model, "Config", None), "extra", "")) or None


def _models_in(annotation: Any) -> list[type]:
    if isinstance(annotation, type):
        is_model = hasattr(annotation, "model_fields") or hasattr(annotation, "__fields__")
        return [annotation] if is_model else []
    found = []
    for arg in typing.get_args(annotation):
        found += [m for m in _models_in(arg) if m not in found]
    return found


def _validate(model: type, data: Any) -> None:
    (getattr(model, "model_validate", None) or model.parse_obj)(data)


def _message(error: dict) -> str:
    return " ".join(str(error["msg"]).removeprefix("Value error, ").split())


def _unknown(what: str, key: Any, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return f"unknown {what} {key!r} ({hint})"


def _problem_at(document: dict, loc: tuple, message: str) -> Problem:
    """A Problem for a pydantic-style location in the document: `applications[i]` becomes the
    app, `deployments[j]` the deployment's name where it has one."""
    if len(loc) < 2 or loc[0] != "applications" or not isinstance(loc[1], int):
        return Problem(None, _dotted(loc), message)
    app, rest = document["applications"][loc[1]], list(loc[2:])
    if len(rest) >= 2 and rest[0] == "deployments" and isinstance(rest[1], int):
        entries = app.get("deployments") if isinstance(app, dict) else None
        entry = entries[rest[1]] if isinstance(entries, list) and rest[1] < len(entries) else None
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            rest[1] = entry["name"]
    return Problem(loc[1], _dotted(tuple(rest)), message)


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# --- one application -------------------------------------------------------------------------


def _app_problems(
    i: int, app: dict, earlier: list[Problem], notes: dict[int, str]
) -> list[Problem]:
    from pydantic import ValidationError

    from serve_app.config import AppConfig

    problems = []
    message = _import_path_problem(app.get("import_path"))
    if message:
        problems.append(Problem(i, "import_path", message))
    args = app.get("args")
    config = None
    if args is not None and not isinstance(args, dict):
        problems.append(Problem(i, "args", f"must be a mapping, got {_kind(args)}"))
    else:
        try:
            config = AppConfig.model_validate(args or {})
        except ValidationError as exc:
            for error in exc.errors():
                problems.append(Problem(i, _dotted(("args", *error["loc"])), _message(error)))
    for where, path in _model_paths(args):
        message, note = _model_path(path)
        if message:
            problems.append(Problem(i, where, message))
        if note:
            notes[i] = "; ".join(filter(None, (notes.get(i), note)))
    problems += _deployment_problems(i, app.get("deployments"), config)
    if config is not None and not any(
        p.app == i and p.field.startswith("deployments") for p in earlier + problems
    ):
        from serve_app.app import check_overrides

        entries = app.get("deployments") or []
        overrides = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in entries}
        try:
            check_overrides(config, overrides)
        except ValueError as exc:
            problems.append(Problem(i, "", str(exc)))
    return problems


def _model_paths(args: Any) -> Iterator[tuple[str, str]]:
    """(field, path) of every `model.path` in an app's args: `model`, or each of `models`."""
    if not isinstance(args, dict):
        return
    model = args.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        yield "args.model.path", model["path"]
    entries = args.get("models")
    for n, entry in enumerate(entries if isinstance(entries, list) else []):
        model = entry.get("model") if isinstance(entry, dict) else None
        if isinstance(model, dict) and isinstance(model.get("path"), str):
            yield f"args.models.{n}.model.path", model["path"]


def _import_path_problem(import_path: Any) -> Optional[str]:
    """None when `import_path` names dit-serve's `build_app` (imported and compared)."""
    if not isinstance(import_path, str) or not import_path:
        return f"missing; use {APP_IMPORT_PATH}"
    if import_path == APP_IMPORT_PATH:
        return None
    # Serve accepts `module:attribute` and `module.attribute`.
    split = import_path.partition(":") if ":" in import_path else import_path.rpartition(".")
    module_name, attribute = split[0], split[2]
    if not module_name or not attribute:
        return f"{import_path!r} is not an import path; use {APP_IMPORT_PATH}"
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as exc:  # whatever importing that module raises
        error = f"{type(exc).__name__}: {exc}"
        return f"{import_path!r} does not import ({error}); use {APP_IMPORT_PATH}"
    from serve_app.app import build_app

    if target is not build_app:
        return f"{import_path!r} is not dit-serve's app; use {APP_IMPORT_PATH}"
    return None


def _model_path(path: str) -> tuple[Optional[str], Optional[str]]:
    """(problem, note) for a `model.path`. `builtin:` names are AppConfig's to check."""
    if path.startswith(BUILTIN_PREFIX):
        return None, None
    if os.path.isabs(path):
        return _local_model_problem(Path(path)), None
    if path.startswith(("~", ".")):
        relative = f"{path!r} is a relative path: give the folder's absolute path"
        return f"{relative} (replicas do not share a working directory)", None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return f"{path!r} is neither an absolute folder nor a hub id (namespace/name)", None
    return None, f"model.path {path}: hub id, not checked offline"


def _local_model_problem(folder: Path) -> Optional[str]:
    if not folder.is_dir():
        return f"{folder} is not a folder on this host (a local model is a diffusers-format folder)"
    index = folder / "model_index.json"
    if not index.is_file():
        return f"{folder} holds no model_index.json: not a diffusers-format model folder"
    try:
        json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        return f"{index} is not readable JSON ({exc})"
    return None


def _deployment_problems(i: int, entries: Any, config: Any) -> list[Problem]:
    """Names in `deployments:` that the app does not have, and names given twice. (Keys and
    value types are `_schema_problems`'.)"""
    if not isinstance(entries, list):
        return []
    known = deployment_names(config)
    problems, named = [], set()
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        if name not in known:
            message = _unknown("deployment", name, known)
            message += f"; this app has {', '.join(known)}"
            problems.append(Problem(i, "deployments", message))
        elif name in named:
            problems.append(Problem(i, f"deployments.{name}", "listed twice"))
        named.add(name)
    return problems


def deployment_names(config: Any = None) -> list[str]:
    """The deployments `build_app` binds, ingress first, as Serve names them: the app's graph is
    built (nothing starts) and turned into deployments the way `serve run` does."""
    from ray.serve._private.build_app import build_app as build_deployments

    from serve_app.app import build_graph
    from serve_app.config import AppConfig

    built = build_deployments(build_graph(config or AppConfig()), name="validate-config")
    names = [d.name for d in built.deployments]
    return sorted(names, key=lambda name: name != built.ingress_deployment_name)
