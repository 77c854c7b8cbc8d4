"""`refgen <command>`: each command maps onto one plain function; argparse only translates flags."""

from __future__ import annotations

import argparse
import sys


def _doctor(args) -> int:
    from refgen.runtime import doctor_json

    print(doctor_json())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refgen", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("doctor", help="JSON report: torch, CUDA runtime, driver, GPUs, bf16 support")
    d.set_defaults(func=_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
