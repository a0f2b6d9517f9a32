"""The `dit-serve` command.

  dit-serve make-tiny-model --family flux [--out DIR] [--seed N]
      Write a tiny diffusers-format checkpoint (random weights, local tokenizers). Without --out it
      goes where `builtin:tiny-<family>` resolves, so a later `serve run` starts without building.
  dit-serve validate-config configs/local.yaml
      Check a Serve config file without starting anything: Serve's keys, each application's
      import_path, `args` (the typed config), model.path and `deployments:` block. Prints
      `<app>: ok` per application (stdout) or one line per problem (stderr). Exit status: 0 ok,
      1 problems found, 2 the file cannot be read (missing, a folder).
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
    from serve_app.config_check import UnreadableFile, check_config_file

    try:
        report = check_config_file(Path(ns.config))
    except UnreadableFile as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in report.ok:
        print(line)
    for line in report.problems:
        print(line, file=sys.stderr)
    return 1 if report.problems else 0


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
    check = sub.add_parser("validate-config", help="check a Serve config file offline")
    check.add_argument("config")
    check.set_defaults(func=_validate_config)
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
