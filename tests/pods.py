"""Pods shaped like those kube-apiserver hands to a webhook (admission-contract.md, "Request")."""

from __future__ import annotations

import copy
from typing import Any


def container(name: str, image: str | None = "", **extra: Any) -> dict[str, Any]:
    """A container as the API server has defaulted it (policy from the image as it was)."""
    item: dict[str, Any] = {
        "name": name,
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": default_pull_policy(image or ""),
        "volumeMounts": [
            {
                "name": "kube-api-access-abcde",
                "readOnly": True,
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
            }
        ],
    }
    if image is not None:
        item["image"] = image
    item.update(extra)
    return item


def default_pull_policy(image: str) -> str:
    """SetDefaults_Container: Always for a ':latest' or untagged parseable image, else IfNotPresent."""
    from webhook.errors import ImageRefError
    from webhook.imageref import parse_image

    try:
        ref = parse_image(image)
    except ImageRefError:
        return "IfNotPresent"
    return "Always" if ref.digest is None and ref.tag in (None, "latest") else "IfNotPresent"


def replicaset_pod(
    containers: list[dict[str, Any]],
    annotations: dict[str, str] | None = None,
    init_containers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A pod as a ReplicaSet creates it: generateName, no name, defaulted spec, managedFields."""
    metadata: dict[str, Any] = {
        "generateName": "redis-6d4cf56db6-",
        "namespace": "default",
        "creationTimestamp": None,
        "labels": {"app": "redis", "pod-template-hash": "6d4cf56db6"},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "redis-6d4cf56db6",
                "uid": "7b0c2a55-8d3e-4a4e-9a53-1c2d3e4f5a6b",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
        "managedFields": [
            {
                "manager": "kube-controller-manager",
                "operation": "Update",
                "apiVersion": "v1",
                "time": "2026-12-04T10:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:generateName": {}}},
            }
        ],
    }
    if annotations is not None:
        metadata["annotations"] = dict(annotations)
    spec: dict[str, Any] = {
        "volumes": [
            {
                "name": "kube-api-access-abcde",
                "projected": {
                    "sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}],
                    "defaultMode": 420,
                },
            }
        ],
        "containers": copy.deepcopy(containers),
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "serviceAccount": "default",
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "tolerations": [
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
        ],
        "priority": 0,
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
    }
    if init_containers is not None:
        spec["initContainers"] = copy.deepcopy(init_containers)
    return {"kind": "Pod", "apiVersion": "v1", "metadata": metadata, "spec": spec, "status": {}}
