"""Microseconds per admission decision, in process: parse review, decide, patch, response bytes.

Run with ``make bench``.  Targets (issue "fast and hard to break"): 1 container
with a flake annotation <= 30 µs, linear growth, nothing to do <= 10 µs.
"""

from __future__ import annotations

import platform
import timeit
from functools import partial

from bench.reviews import admission_body
from webhook.admission import review
from webhook.mutate import Settings


def main() -> None:
    settings = Settings()
    cases = [("nothing to do (1 registry image)", admission_body(1, flake=False))]
    cases += [(f"{n} container(s), flake annotation", admission_body(n)) for n in (1, 10, 100)]
    print(
        f"# admission decision on {platform.python_implementation()} {platform.python_version()}, {platform.machine()}"
    )
    print(f"{'case':<36} {'body bytes':>10} {'µs/review':>10} {'µs/container':>13}")
    for name, body in cases:
        assert review(body, settings).status == 200
        number = max(200, 20000 // max(1, body.count(b'"name":"c')))
        seconds = min(timeit.repeat(partial(review, body, settings), number=number, repeat=7)) / number
        containers = max(1, body.count(b'"name":"c'))
        print(f"{name:<36} {len(body):>10} {seconds * 1e6:>10.1f} {seconds * 1e6 / containers:>13.2f}")


if __name__ == "__main__":
    main()
