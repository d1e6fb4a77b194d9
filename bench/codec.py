"""Microseconds per encode+validate for typical flake references (prints a table).

Run with ``make bench``.  Measures the uncached path (parse, fold, escape,
grammar check, node round trip) and the cached path the webhook mostly takes.
"""

from __future__ import annotations

import platform
import timeit
from functools import partial

from webhook.dialects import encode
from webhook.flakeref import parse

REFS = [
    "github:user/redis",
    "github:NixOS/nixpkgs/nixos-24.05?dir=lib",
    "git+ssh://git@github.com/user/repo?ref=main&rev=0123456789abcdef0123456789abcdef01234567",
    "tarball+https://github.com/user/repo/archive/main.tar.gz",
]


def _uncached(ref: str, dialect: str) -> None:
    parse.cache_clear()
    encode.cache_clear()
    encode(ref, dialect)


def main() -> None:
    print(f"# codec benchmark on {platform.python_implementation()} {platform.python_version()}, {platform.machine()}")
    print(f"{'dialect':<7} {'uncached µs':>12} {'cached µs':>10}  ref")
    for dialect in ("seed", "hex"):
        for ref in REFS:
            try:
                encode(ref, dialect)
            except ValueError:
                continue
            number = 2000
            uncached = min(timeit.repeat(partial(_uncached, ref, dialect), number=number, repeat=5)) / number
            cached = min(timeit.repeat(partial(encode, ref, dialect), number=number * 10, repeat=5)) / (number * 10)
            print(f"{dialect:<7} {uncached * 1e6:>12.1f} {cached * 1e6:>10.2f}  {ref}")
    print("target: under 20 µs per encode+validate (uncached)")


if __name__ == "__main__":
    main()
