"""`dry-run` and `explain`: golden outputs over tests/corpus, offline and through the real running server.

Golden files are the reviewed output of the command.  After an intended
change, regenerate them with `UPDATE_GOLDEN=1 make test` and review the diff.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer
from tests.node_decoders import NODES, kubelet_accepts
from webhook.cli import main

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests" / "corpus").iterdir())
GOLDEN = ROOT / "tests" / "golden"
OUTPUTS = ("yaml", "json", "patch", "diff")


def run_cli(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """Run the CLI in-process from the repository root, capturing what a user would see."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(ROOT)
    stdin_stream = io.TextIOWrapper(io.BytesIO(stdin))
    old_stdin = sys.stdin
    sys.stdin = stdin_stream
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        sys.stdin = old_stdin
        os.chdir(previous)
    return code, out.getvalue(), err.getvalue()


def golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(actual)
    assert path.exists(), f"missing golden file {path}; run UPDATE_GOLDEN=1 make test"
    assert actual == path.read_text()


def transcript(code: int, out: str, err: str) -> str:
    return f"exit: {code}\n--- stdout\n{out}--- stderr\n{err}"


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("path", CORPUS)
def test_offline_matches_golden(path: str, output: str) -> None:
    code, out, err = run_cli("dry-run", "-o", output, path)
    assert "Traceback" not in err
    golden(f"{Path(path).name}.{output}", transcript(code, out, err))


@pytest.mark.parametrize("path", CORPUS)
def test_explain_matches_golden(path: str) -> None:
    code, out, err = run_cli("explain", path)
    golden(f"{Path(path).name}.explain", transcript(code, out, err))


@pytest.mark.parametrize("output", OUTPUTS)
def test_live_server_gives_identical_results(server: RunningServer, output: str) -> None:
    live = [
        "--server", f"https://127.0.0.1:{server.port}",
        "--ca", str(server.certs_dir / "ca.crt"),
        "--server-name", "nix-flake-webhook.nix-flake-webhook.svc",
    ]  # fmt: skip
    for path in CORPUS:
        assert run_cli("dry-run", "-o", output, *live, path) == run_cli("dry-run", "-o", output, path), path


def test_live_server_name_is_verified(server: RunningServer) -> None:
    code, _, err = run_cli(
        "dry-run", "--server", f"https://127.0.0.1:{server.port}", "--ca", str(server.certs_dir / "ca.crt"),
        "--server-name", "not-the-webhook.example.com", "tests/corpus/list.json",
    )  # fmt: skip
    assert code == 2 and "cannot call the webhook" in err and "certificate" in err


def _images(obj: Any) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(obj, dict):
        for key in ("containers", "initContainers"):
            for item in obj.get(key) or []:
                if isinstance(item, dict) and "image" in item:
                    found.append((item["image"], obj))
        for value in obj.values():
            found.extend(_images(value))
    elif isinstance(obj, list):
        for value in obj:
            found.extend(_images(value))
    return found


def test_every_written_image_runs_on_the_node() -> None:
    """Beyond the golden text: each flake image the dry run writes is one the kubelet and node accept."""
    written = 0
    for path in CORPUS:
        code, out, _ = run_cli("dry-run", path)
        if code == 2:
            continue
        for document in yaml.safe_load_all(out):
            for image, _ in _images(document):
                if image.startswith("flake-"):
                    assert kubelet_accepts(image), image
                    NODES["seed"](image)
                    written += 1
    assert written >= 8


def test_stdin_and_multiple_files() -> None:
    data = (ROOT / "tests/corpus/list.json").read_bytes()
    code, out, _ = run_cli("dry-run", "-o", "json", stdin=data)
    assert code == 0 and json.loads(out)["items"][0]["spec"]["containers"][0]["image"] == "flake-github:0/user/one"
    code, out, err = run_cli("dry-run", "tests/corpus/list.json", "tests/corpus/refused.yaml")
    assert code == 1 and len(list(yaml.safe_load_all(out))) == 4 and err.count("refused:") == 2


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        (b"apiVersion: v1\nkind: Pod\n  bad: [indent\n", "<stdin>:3:"),
        (b"\x00\x01\x02binary", "binary data"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b'{"kind": "Pod", ', "invalid YAML"),
    ],
)
def test_unreadable_input_exits_2(data: bytes, phrase: str) -> None:
    code, out, err = run_cli("dry-run", stdin=data)
    assert code == 2 and phrase in err and out == "" and "Traceback" not in err


def test_missing_file_and_bad_server_url() -> None:
    code, _, err = run_cli("dry-run", "tests/corpus/does-not-exist.yaml")
    assert code == 2 and "cannot read" in err
    code, _, err = run_cli("dry-run", "--server", "http://insecure:80", "tests/corpus/list.json")
    assert code == 2 and "https://" in err


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_garbage_never_tracebacks(data: bytes) -> None:
    code, _, err = run_cli("dry-run", stdin=data)
    assert code in (0, 1, 2) and "Traceback" not in err
