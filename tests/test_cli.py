"""The installed console scripts, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_encode_flake_ref_is_the_original_helper() -> None:
    result = run("encode-flake-ref", "github:user/repo", "github:user/repo?ref=main")
    assert result.returncode == 0
    assert result.stdout == "flake-github:0/user/repo\nflake-github:0/user/repo--q--ref--eq--main\n"
    assert run("encode-flake-ref").returncode == 2


def test_encode_reports_each_refusal_and_keeps_going() -> None:
    result = run("nix-flake-webhook", "encode", "github:a/b", "gitlab:x/y", "github:c/d")
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["flake-github:0/a/b", "flake-github:0/c/d"]
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "gitlab" in line


def test_encode_and_decode_read_stdin() -> None:
    encoded = run("nix-flake-webhook", "encode", "--dialect", "hex", stdin="github:user/app#shell\n\ngithub:user/b\n")
    assert encoded.returncode == 0
    decoded = run("nix-flake-webhook", "decode", "--dialect", "hex", stdin=encoded.stdout)
    assert decoded.stdout.splitlines() == ["github:user/app#shell", "github:user/b#default"]


def test_decode_refusal_and_env_dialect() -> None:
    result = run("nix-flake-webhook", "decode", "flake-git-ssh:0/github.com/u/r")
    assert result.returncode == 1 and "--at--" in result.stderr
    result = run("nix-flake-webhook", "encode", "github:u/r#x", env={"NIX_FLAKE_WEBHOOK_DIALECT": "hex"})
    assert result.returncode == 0 and result.stdout == "flake-github:0/u/r--x23--x\n"


def test_folding_warning_goes_to_stderr() -> None:
    result = run("nix-flake-webhook", "encode", "github:NixOS/nixpkgs")
    assert result.stdout == "flake-github:0/nixos/nixpkgs\n" and result.stderr.startswith("warning: ")


@pytest.mark.parametrize("args", [["bogus"], ["encode", "--dialect", "klingon", "x"], []])
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert run("nix-flake-webhook", *args).returncode == 2


def test_serve_help_explains_environment() -> None:
    result = run("nix-flake-webhook", "serve", "--help")
    assert result.returncode == 0
    for needle in ("NIX_FLAKE_WEBHOOK_BIND", "NIX_FLAKE_WEBHOOK_ALLOW_SOURCE", "--image-pull-policy", "0.0.0.0:8443"):
        assert needle in result.stdout


def test_serve_refuses_half_a_pair(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_text("not really")
    result = run("nix-flake-webhook", "serve", "--cert", str(tmp_path / "tls.crt"), "--key", str(tmp_path / "tls.key"))
    assert result.returncode == 2 and "tls.key does not exist" in result.stderr


def test_serve_reports_a_broken_pair(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_text("not a certificate")
    (tmp_path / "tls.key").write_text("not a key")
    result = run("nix-flake-webhook", "serve", "--cert", str(tmp_path / "tls.crt"), "--key", str(tmp_path / "tls.key"))
    assert result.returncode == 1 and "cannot serve" in result.stderr and "Traceback" not in result.stderr
