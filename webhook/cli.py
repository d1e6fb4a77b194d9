"""The command line: a thin shell that parses arguments and calls the core."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence

from webhook.dialects import DIALECTS, decode, encode
from webhook.errors import WebhookError

ENV_PREFIX = "NIX_FLAKE_WEBHOOK_"


def env_default(name: str, default: str) -> str:
    """The value of NIX_FLAKE_WEBHOOK_<NAME>, or ``default``."""
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def env_list(name: str) -> list[str]:
    """A comma-separated NIX_FLAKE_WEBHOOK_<NAME> as a list (empty when unset)."""
    raw = env_default(name, "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_help(name: str, text: str) -> str:
    return f"{text} [env {ENV_PREFIX}{name.upper().replace('-', '_')}; default: %(default)s]"


def add_dialect_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dialect",
        choices=DIALECTS,
        default=env_default("dialect", "seed"),
        help=env_help(
            "dialect",
            "node decoder to encode for: 'seed' (nix-snapshotter flake fork: @?=& escapes, default package only) "
            "or 'hex' (nix-storage-plugin: --xHH-- escapes, #fragments allowed)",
        ),
    )


def _inputs(values: Sequence[str]) -> Iterable[str]:
    if values:
        yield from values
        return
    for line in sys.stdin:
        line = line.strip()
        if line:
            yield line


def _convert(values: Sequence[str], convert: Callable[[str], str]) -> int:
    status = 0
    for value in _inputs(values):
        try:
            print(convert(value), flush=True)
        except WebhookError as err:
            print(f"error: {err.message}", file=sys.stderr, flush=True)
            status = 1
    return status


def _encode_one(dialect: str) -> Callable[[str], str]:
    def run(ref: str) -> str:
        encoded = encode(ref, dialect)
        for warning in encoded.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return encoded.image

    return run


def cmd_encode(args: argparse.Namespace) -> int:
    return _convert(args.refs, _encode_one(args.dialect))


def cmd_decode(args: argparse.Namespace) -> int:
    return _convert(args.images, lambda image: decode(image, args.dialect))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nix-flake-webhook",
        description=(
            "Kubernetes mutating admission webhook for nix-snapshotter: turns flake references written in pod "
            "annotations or images into flake-*:0/... images a node can decode and build."
        ),
        epilog=f"Every option can also be set from the environment as {ENV_PREFIX}<OPTION> (shown per option).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    enc = sub.add_parser(
        "encode",
        help="encode flake references into node images",
        description="Print one image per flake reference (read from stdin, one per line, when none are given). "
        "Exit 1 when any reference is refused; the reason goes to stderr.",
    )
    add_dialect_option(enc)
    enc.add_argument("refs", nargs="*", metavar="REF", help="flake reference, e.g. github:user/redis")
    enc.set_defaults(func=cmd_encode)

    dec = sub.add_parser(
        "decode",
        help="decode node images back into the flake URL the node builds",
        description="Print the flake URL a node of the chosen dialect builds for each image "
        "(read from stdin when none are given). Exit 1 when a node would refuse an image.",
    )
    add_dialect_option(dec)
    dec.add_argument("images", nargs="*", metavar="IMAGE", help="image such as flake-github:0/user/redis")
    dec.set_defaults(func=cmd_decode)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Subcommands that live with their own concern register themselves here.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nix-flake-webhook``."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return result


def encode_flake_ref(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``encode-flake-ref``, the original helper's name and behaviour (seed dialect)."""
    parser = argparse.ArgumentParser(
        prog="encode-flake-ref",
        description="Encode flake references into nix-snapshotter flake-*:0 images (seed dialect), one per line.",
    )
    parser.add_argument("refs", nargs="+", metavar="REF", help="flake reference, e.g. github:user/repo")
    args = parser.parse_args(argv)
    return _convert(args.refs, _encode_one("seed"))


if __name__ == "__main__":
    sys.exit(main())
