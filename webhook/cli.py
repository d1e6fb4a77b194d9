"""The command line: a thin shell that parses arguments and calls the core."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import ssl
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from webhook.defaults import DEFAULT_NAMESPACE, DEFAULT_SERVICE
from webhook.dialects import DIALECTS, decode, encode
from webhook.errors import WebhookError
from webhook.mutate import PULL_POLICIES, Settings

if TYPE_CHECKING:
    from webhook import dryrun

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


def env_option(
    parser: argparse.ArgumentParser, flag: str, default: str, text: str, env: str = "", **kwargs: Any
) -> None:
    """``--flag`` whose default comes from NIX_FLAKE_WEBHOOK_<FLAG> (or ``env``), saying so in --help."""
    name = env or flag.removeprefix("--")
    value: Any = env_default(name, default)
    if kwargs.get("type") is int:
        value = int(value)
    parser.add_argument(flag, default=value, help=env_help(name, text), **kwargs)


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


def settings_from(args: argparse.Namespace) -> Settings:
    policy = None if args.image_pull_policy == "keep" else args.image_pull_policy
    return Settings(dialect=args.dialect, allow_sources=tuple(args.allow_source), image_pull_policy=policy)


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    add_dialect_option(parser)
    parser.add_argument(
        "--allow-source",
        action="append",
        default=env_list("allow-source"),
        metavar="GLOB",
        help=env_help(
            "allow-source",
            "only admit flakes matching this glob, e.g. 'github:myorg/*' (repeatable, and added to the "
            "comma-separated list in the environment; none at all: every source is allowed)",
        ),
    )
    parser.add_argument(
        "--image-pull-policy",
        choices=("keep", *PULL_POLICIES),
        default=env_default("image-pull-policy", "keep"),
        help=env_help(
            "image-pull-policy",
            "imagePullPolicy for rewritten containers; 'keep' leaves what the API server defaulted "
            "(IfNotPresent for an empty or flake image: a node builds a flake once and reuses the image)",
        ),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from webhook.server import ServeOptions, serve

    cert, key = Path(args.cert), Path(args.key)
    if not cert.exists() and not key.exists():
        from webhook import certs  # only here: cryptography costs the server memory it never needs again

        if (cert.name, key.name) != (certs.TLS_CERT, certs.TLS_KEY) or cert.parent != key.parent:
            print(f"error: {cert} and {key} do not exist; create them with 'nix-flake-webhook certs'", file=sys.stderr)
            return 2
        result = certs.ensure(cert.parent, certs.CertSpec())
        for action in result.actions:
            print(
                f"certs: {action} (development certificates; use 'register' or cert-manager in a cluster)",
                file=sys.stderr,
            )
    elif not cert.exists() or not key.exists():
        missing = cert if not cert.exists() else key
        print(
            f"error: {missing} does not exist, but its pair does; restore it or remove both to regenerate",
            file=sys.stderr,
        )
        return 2
    try:
        serve(ServeOptions(args.bind, cert, key, workers=args.workers), settings_from(args))
    except (OSError, ssl.SSLError) as err:
        print(f"error: cannot serve with {cert} and {key}: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from webhook import certs

    out = Path(args.out)
    renew = dt.timedelta(days=args.renew_before)
    if args.action == "check":
        try:
            report = certs.check(out, renew)
        except (OSError, ValueError) as err:
            print(f"error: cannot read the certificate pair in {out}: {err}", file=sys.stderr)
            return 1
        print(f"subject:   {report.subject}")
        print(f"issuer:    {report.issuer}")
        print(f"DNS names: {', '.join(report.dns_names)}")
        print(f"IPs:       {', '.join(report.ip_addresses)}")
        print(f"expires:   in {report.days_left} days")
        for problem in report.problems:
            print(f"problem:   {problem}", file=sys.stderr)
        return 1 if report.problems else 0
    spec = certs.CertSpec(args.service, args.namespace, tuple(args.san), args.key_type, renew_before=renew)
    try:
        result = certs.ensure(out, spec)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for action in result.actions or (result.reason,):
        print(action)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from webhook import register

    try:
        objects = register.desired_objects(Path(args.certs_dir), args.service, args.namespace)
    except (OSError, ValueError) as err:
        print(f"error: cannot prepare certificates in {args.certs_dir}: {err}", file=sys.stderr)
        return 1
    if args.dry_run:
        sys.stdout.write(register.dump_yaml(objects))
        return 0
    try:
        registrar = register.Registrar(register.load_api_client(args.kubeconfig, args.context))
        results = [registrar.apply(obj) for obj in objects]
    except register.RegistrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for line in results:
        print(line)
    if all(line.endswith("unchanged") for line in results):
        print("nothing to do: the cluster already has this registration")
    return 0


def cmd_unregister(args: argparse.Namespace) -> int:
    from webhook import register

    config = register.webhook_configuration(b"", args.service, args.namespace)
    try:
        registrar = register.Registrar(register.load_api_client(args.kubeconfig, args.context))
        print(registrar.delete("MutatingWebhookConfiguration", config["metadata"]["name"]))
        if not args.keep_secret:
            print(registrar.delete("Secret", register.SECRET_NAME, args.namespace))
    except register.RegistrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _read_inputs(paths: Sequence[str]) -> list[tuple[bytes, str]]:
    from webhook import dryrun

    if not paths or paths == ["-"]:
        return [(sys.stdin.buffer.read(), "<stdin>")]
    inputs = []
    for path in paths:
        if path == "-":
            inputs.append((sys.stdin.buffer.read(), "<stdin>"))
            continue
        try:
            inputs.append((Path(path).read_bytes(), path))
        except OSError as err:
            raise dryrun.InputError(f"{path}: cannot read: {err.strerror or err}") from None
    return inputs


def _documents(args: argparse.Namespace, decide: dryrun.Decide) -> list[dryrun.Document]:
    from webhook import dryrun

    documents = []
    for data, source in _read_inputs(args.files):
        documents.extend(dryrun.load_documents(data, source))
    return [dryrun.process(document, decide) for document in documents]


def _exit_code(documents: list[dryrun.Document]) -> int:
    if any(d.error is not None for d in documents):
        return 2
    return 1 if any(d.refused for d in documents) else 0


def cmd_dry_run(args: argparse.Namespace) -> int:
    from webhook import dryrun

    live: dryrun.LiveWebhook | None = None
    try:
        if args.server:
            live = dryrun.LiveWebhook(args.server, args.ca, args.server_name)
        documents = _documents(args, live or dryrun.offline(settings_from(args)))
    except dryrun.InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if live is not None:
            live.close()
    sys.stdout.write(dryrun.render(documents, args.output))
    for line in dryrun.messages(documents):
        print(line, file=sys.stderr)
    return _exit_code(documents)


def cmd_explain(args: argparse.Namespace) -> int:
    from webhook import dryrun

    try:
        documents = _documents(args, dryrun.offline(settings_from(args)))
    except dryrun.InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in dryrun.explain(documents):
        print(line)
    return _exit_code(documents)


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig file [default: $KUBECONFIG, ~/.kube/config, or the in-cluster config]",
    )
    parser.add_argument("--context", default=None, help="kubeconfig context [default: the current one]")
    env_option(parser, "--namespace", DEFAULT_NAMESPACE, "namespace of the webhook's Service and Secret")
    env_option(parser, "--service", DEFAULT_SERVICE, "name of the webhook's Service")


Subparsers = argparse._SubParsersAction  # argparse's own type for add_subparsers()


def _command(
    sub: Subparsers[argparse.ArgumentParser],
    name: str,
    func: Callable[[argparse.Namespace], int],
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subcommand that runs ``func``; ``summary`` shows in the command list, ``description`` in its --help."""
    parser = sub.add_parser(name, help=summary, description=description)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nix-flake-webhook",
        description=(
            "Kubernetes mutating admission webhook for nix-snapshotter: turns flake references written in pod "
            "annotations or images into flake-*:0/... images a node can decode and build."
        ),
        epilog=f"Options whose help names an {ENV_PREFIX}... variable can also be set from the environment.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    enc = _command(
        sub,
        "encode",
        cmd_encode,
        "encode flake references into node images",
        "Print one image per flake reference (read from stdin, one per line, when none are given). "
        "Exit 1 when any reference is refused; the reason goes to stderr.",
    )
    add_dialect_option(enc)
    enc.add_argument("refs", nargs="*", metavar="REF", help="flake reference, e.g. github:user/redis")

    dec = _command(
        sub,
        "decode",
        cmd_decode,
        "decode node images back into the flake URL the node builds",
        "Print the flake URL a node of the chosen dialect builds for each image "
        "(read from stdin when none are given). Exit 1 when a node would refuse an image.",
    )
    add_dialect_option(dec)
    dec.add_argument("images", nargs="*", metavar="IMAGE", help="image such as flake-github:0/user/redis")

    srv = _command(
        sub,
        "serve",
        cmd_serve,
        "serve the admission webhook over TLS",
        "Serve POST /mutate, /healthz, /readyz and /metrics over TLS with gunicorn (gevent workers). "
        "When the default certs/tls.crt and certs/tls.key are both missing, development certificates are "
        "generated there first. A renewed certificate on disk is picked up without a restart.",
    )
    env_option(srv, "--bind", "0.0.0.0:8443", "address to listen on", metavar="HOST:PORT")
    env_option(srv, "--cert", "certs/tls.crt", "TLS certificate (PEM)", metavar="FILE")
    env_option(srv, "--key", "certs/tls.key", "TLS private key (PEM)", metavar="FILE")
    env_option(srv, "--workers", "2", "gunicorn worker processes (one per core)", type=int)
    add_policy_options(srv)

    crt = _command(
        sub,
        "certs",
        cmd_certs,
        "create or renew the CA and serving certificate; 'certs check' inspects them",
        "Without an action: create a CA (reused when present) and a serving certificate signed by it, "
        "renewing the latter only when it is missing, does not cover the requested names, or expires within "
        "--renew-before days. 'check': print subject, SANs, issuer and days to expiry; exit 1 when the pair "
        "does not match, the chain does not verify, or expiry is near.",
    )
    crt.add_argument("action", nargs="?", choices=("check",), help="check the existing pair instead of creating one")
    env_option(crt, "--out", "certs", "directory for ca.crt, ca.key, tls.crt, tls.key", env="certs-dir", metavar="DIR")
    env_option(crt, "--service", DEFAULT_SERVICE, "Service name the API server calls")
    env_option(crt, "--namespace", DEFAULT_NAMESPACE, "namespace of that Service")
    crt.add_argument(
        "--san", action="append", default=[], metavar="NAME", help="extra DNS name or IP address (repeatable)"
    )
    crt.add_argument(
        "--key-type",
        choices=("ecdsa", "rsa"),
        default="ecdsa",
        help="key algorithm: ECDSA P-256 (fast handshakes) or RSA 2048 [default: %(default)s]",
    )
    crt.add_argument(
        "--renew-before",
        type=int,
        default=30,
        metavar="DAYS",
        help="renew (or warn, with check) this many days before expiry [default: %(default)s]",
    )

    reg = _command(
        sub,
        "register",
        cmd_register,
        "create or update the TLS Secret and the MutatingWebhookConfiguration in a cluster",
        "Ensure certificates for the Service in --certs-dir (CA reused, serving certificate renewed "
        "when due), then server-side apply (field manager nix-flake-webhook) the kubernetes.io/tls Secret and "
        "the MutatingWebhookConfiguration from manifests/base with caBundle set. While the CA rolls over the "
        "bundle carries the old CA too. Objects already up to date are left alone. Apply manifests/base first.",
    )
    add_cluster_options(reg)
    env_option(reg, "--certs-dir", "certs", "where the CA and serving certificate live", metavar="DIR")
    reg.add_argument("--dry-run", action="store_true", help="print the objects as YAML instead of touching the cluster")

    unreg = _command(
        sub,
        "unregister",
        cmd_unregister,
        "delete the MutatingWebhookConfiguration (and the TLS Secret)",
        "Delete the webhook configuration first, so the API server stops calling the webhook, "
        "then the TLS Secret unless --keep-secret. Objects already gone are not an error.",
    )
    add_cluster_options(unreg)
    unreg.add_argument("--keep-secret", action="store_true", help="leave the TLS Secret in place")

    dry = _command(
        sub,
        "dry-run",
        cmd_dry_run,
        "show what the webhook will make of manifests, offline or through a live webhook",
        "Read YAML or JSON (files or stdin; several documents, kind: List) and apply to every Pod, "
        "and to the pod template of every Deployment, StatefulSet, DaemonSet, ReplicaSet, "
        "ReplicationController, Job, CronJob and PodTemplate, exactly what the webhook does to the pods "
        "created from them. Other kinds pass through unchanged. Warnings and refusals go to stderr. "
        "Exit 0 when everything would be admitted, 1 when anything would be refused, 2 on unreadable input.",
    )
    dry.add_argument("files", nargs="*", metavar="FILE", help="manifest files; '-' or none reads stdin")
    dry.add_argument(
        "-o",
        "--output",
        choices=("yaml", "json", "patch", "diff"),
        default="yaml",
        help="the documents as they will run (yaml, json), the JSON Patch per pod (patch), or a unified diff per document (diff) [default: %(default)s]",
    )
    dry.add_argument(
        "--server",
        metavar="https://HOST:PORT",
        help="ask a running webhook instead of deciding offline (AdmissionReview v1, as kube-apiserver sends it)",
    )
    dry.add_argument(
        "--ca", metavar="FILE", help="CA bundle that signed the webhook's certificate [default: system trust]"
    )
    dry.add_argument(
        "--server-name",
        metavar="NAME",
        help="TLS server name to present and verify, e.g. nix-flake-webhook.nix-flake-webhook.svc [default: the URL's host]",
    )
    add_policy_options(dry)

    exp = _command(
        sub,
        "explain",
        cmd_explain,
        "say, per container, what the webhook will do and why",
        "For every container of every pod and pod template in the files: rewritten, kept with a "
        "recovery annotation, left alone, or refused, and which annotation or image decided it. "
        "Exit codes as for dry-run.",
    )
    exp.add_argument("files", nargs="*", metavar="FILE", help="manifest files; '-' or none reads stdin")
    add_policy_options(exp)
    return parser


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
