"""The `dit-serve` command.

  dit-serve make-tiny-model --family flux [--out DIR] [--seed N]
      Write a tiny diffusers-format checkpoint (random weights, local tokenizers). Without --out it
      goes where `builtin:tiny-<family>` resolves, so a later `serve run` starts without building.
  dit-serve validate-config configs/local.yaml
      Check every application's `args` against the typed config, and its `deployments:`
      overrides against what the app needs, without starting anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _make_tiny_model(ns: argparse.Namespace) -> int:
    from deployments.tiny.store import build_tiny, ensure_builtin

    if ns.out is None:
        path = ensure_builtin(f"tiny-{ns.family}", seed=ns.seed)
    else:
        out = Path(ns.out)
        if out.exists() and any(out.iterdir()):
            print(f"error: {out} exists and is not empty", file=sys.stderr)
            return 2
        path = build_tiny(ns.family, out, seed=ns.seed)
    print(path)
    return 0


def _validate_config(ns: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from serve_app.app import check_overrides
    from serve_app.config import AppConfig

    document = yaml.safe_load(Path(ns.config).read_text())
    status = 0
    for app in document.get("applications", []):
        try:
            config = AppConfig.model_validate(app.get("args") or {})
            overrides = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []}
            check_overrides(config, overrides)
            print(f"{app.get('name')}: ok")
        except (ValidationError, ValueError) as exc:
            print(f"{app.get('name')}: invalid\n{exc}", file=sys.stderr)
            status = 1
    return status


def builtin_families() -> list[str]:
    from deployments.families.specs import builtin_models

    return [spec.name for spec in builtin_models().values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dit-serve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint")
    tiny.add_argument("--family", choices=sorted(builtin_families()), default="flux")
    tiny.add_argument("--out", default=None, help="folder to create (default: the builtin cache)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny_model)
    check = sub.add_parser("validate-config", help="check a Serve config file's args")
    check.add_argument("config")
    check.set_defaults(func=_validate_config)
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
