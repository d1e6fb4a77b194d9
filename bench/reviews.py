"""AdmissionReview bodies shaped like kube-apiserver's, for the benchmarks (pods from tests/pods.py)."""

from __future__ import annotations

import json

from tests.apiserver import ApiServerWebhookClient
from tests.pods import container, replicaset_pod


def admission_body(containers: int = 1, flake: bool = True) -> bytes:
    """A compact AdmissionReview v1 for a ReplicaSet pod CREATE with ``containers`` containers."""
    items = [container(f"c{i}", "" if flake else "nginx:1.27") for i in range(containers)]
    annotations = {"nix-snapshotter/flake": "github:user/redis?ref=main"} if flake else None
    review = ApiServerWebhookClient.review_for(replicaset_pod(items, annotations))
    return json.dumps(review, separators=(",", ":")).encode()
