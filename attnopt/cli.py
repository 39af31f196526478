"""The ``attnopt`` command line: ``demo``, ``plan``, ``report``, ``inspect``.

User mistakes (a missing file, a bad budget, a model spec that does not import) end with one
clear line on stderr and exit status 2, never a traceback. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import pathlib
import sys
from typing import Any

__all__ = ["main", "load_model_spec", "load_calib_file", "CliError"]


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def load_model_spec(spec: str) -> Any:
    """``package.module:factory`` (called with no arguments) or a local Hugging Face folder."""
    path = pathlib.Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CliError(f"model folder {spec} has no config.json; expected a Hugging Face model folder")
        import json

        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        cls = AutoModelForCausalLM if any("CausalLM" in a for a in archs) else AutoModel
        return cls.from_pretrained(str(path), dtype=torch.float32).eval()
    if ":" not in spec:
        raise CliError(f"model {spec!r} is neither a folder nor 'package.module:factory'")
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise CliError(f"cannot import {mod_name!r} from model spec {spec!r}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise CliError(f"module {mod_name!r} has no attribute {attr!r} (model spec {spec!r})")
    model = factory() if callable(factory) and not hasattr(factory, "forward") else factory
    if isinstance(model, tuple):
        model = model[0]
    return model.eval()


def load_calib_file(path_str: str, seq: int, n: int) -> list[Any]:
    """Calibration calls from a text file (bytes as token ids) or a ``.pt`` / ``.safetensors`` file.

    A ``.pt`` file holds one call (a tensor or a dict of keyword tensors) or a list of calls; a
    ``.safetensors`` file holds the keyword tensors of one call. A text file is cut into ``n``
    calls of ``seq`` bytes (byte-level models such as codelm).
    """
    import torch

    path = pathlib.Path(path_str)
    if not path.is_file():
        raise CliError(f"calibration file {path_str} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return [load_file(str(path))]
    if path.suffix == ".pt":
        obj = torch.load(str(path), weights_only=True)
        return obj if isinstance(obj, list) else [obj]
    data = path.read_bytes()
    if len(data) < 2:
        raise CliError(f"calibration file {path_str} is empty")
    calls = []
    for i in range(n):
        chunk = data[i * seq : (i + 1) * seq] or data[:seq]
        calls.append({"input_ids": torch.tensor(list(chunk), dtype=torch.long)[None], "use_cache": False})
    return calls


def _cmd_demo(args: argparse.Namespace) -> int:
    from attnopt.demo import run_demo

    run_demo(budget=args.budget, seq=args.seq, n_calib=args.calib_batches, quiet=args.quiet)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import attnopt

    attnopt.parse_budget(args.budget)  # fail fast on a bad budget
    model = load_model_spec(args.model)
    calib = load_calib_file(args.calib, args.seq, args.calib_batches)
    plan = attnopt.plan(model, budget=args.budget, calib=calib, target=args.target, progress=not args.quiet)
    out = plan.save(args.out, stats=getattr(plan, "_stats", None))
    if not args.quiet:
        print(plan.summary())
        print(f"\nplan written to {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import attnopt

    if not pathlib.Path(args.dir).exists():
        raise CliError(f"plan folder {args.dir} does not exist")
    print(attnopt.load_plan(args.dir).summary())
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    import attnopt

    model = load_model_spec(args.model)
    ids = torch.randint(0, 100, (1, args.seq))
    kwargs = {"input_ids": ids}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    for s in attnopt.find_sites(model, **kwargs):
        print(s)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnopt", description="Make attention fast within an accuracy budget.")
    p.add_argument("--quiet", action="store_true", help="print only results")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser(
        "demo", help="optimise codelm (or a small built-in model) and show the measured result"
    )
    d.add_argument("--budget", default="2x")
    d.add_argument("--seq", type=int, default=2048)
    d.add_argument("--calib-batches", type=int, default=4)
    pl = sub.add_parser("plan", help="plan a model and write the plan folder")
    pl.add_argument("model", help="package.module:factory or a local Hugging Face model folder")
    pl.add_argument("--budget", default="2x")
    pl.add_argument("--calib", required=True, help="text file, .pt or .safetensors batch file")
    pl.add_argument("--out", required=True)
    pl.add_argument("--target", default=None, help="device profile to plan for, e.g. h100")
    pl.add_argument("--seq", type=int, default=512)
    pl.add_argument("--calib-batches", type=int, default=4)
    r = sub.add_parser("report", help="print a saved plan's table")
    r.add_argument("dir")
    i = sub.add_parser("inspect", help="list the attention sites of a model")
    i.add_argument("model")
    i.add_argument("--seq", type=int, default=16)
    return p


_COMMANDS = {"demo": _cmd_demo, "plan": _cmd_plan, "report": _cmd_report, "inspect": _cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``attnopt`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return _COMMANDS[args.cmd](args)
    except (CliError, ValueError, FileNotFoundError, TypeError) as e:
        if args.debug:
            raise
        print(f"attnopt {args.cmd}: error: {e}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
