"""The pure decision, on pods shaped like those a ReplicaSet creates."""

from __future__ import annotations

import json
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.node_decoders import NODES, kubelet_accepts
from tests.pods import container, replicaset_pod
from webhook.mutate import (
    NOTHING_TO_DO,
    RECOVERY_ANNOTATION,
    Decision,
    Settings,
    _Mutation,
    _Refused,
    may_concern,
    mutate,
)

SEED = Settings()
HEX = Settings(dialect="hex")
STORE = "nix:0/nix/store/0123456789abcdfghijklmnpqrsvwxyz-redis-image.tar"


def apply(pod: dict[str, Any], decision: Decision) -> dict[str, Any]:
    assert decision.allowed, decision.refusal
    result: dict[str, Any] = jsonpatch.apply_patch(pod, list(decision.patch))
    return result


def converge(pod: dict[str, Any], settings: Settings = SEED) -> tuple[dict[str, Any], Decision]:
    """Mutate, apply, and check that a second pass (reinvocation) changes nothing."""
    decision = mutate(pod, settings)
    after = apply(pod, decision)
    again = mutate(after, settings)
    assert again.allowed and again.patch == (), again
    return after, decision


def test_pod_annotation_fills_empty_image() -> None:
    pod = replicaset_pod([container("redis", "")], {"nix-snapshotter/flake": "github:user/redis"})
    after, decision = converge(pod)
    assert decision.patch == (
        {"op": "replace", "path": "/spec/containers/0/image", "value": "flake-github:0/user/redis"},
    )
    assert after["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert NODES["seed"](after["spec"]["containers"][0]["image"]) == "github:user/redis"
    assert [c.action for c in decision.containers] == ["rewritten"]


def test_missing_image_key_is_added() -> None:
    pod = replicaset_pod([container("redis", None)], {"nix-snapshotter/flake": "github:user/redis"})
    _, decision = converge(pod)
    assert decision.patch[0]["op"] == "add"


def test_per_container_annotation_wins_and_init_containers_count() -> None:
    pod = replicaset_pod(
        [container("app", ""), container("sidecar", "docker.io/envoyproxy/envoy:v1.30.1")],
        {
            "nix-snapshotter/flake": "github:user/app",
            "nix-snapshotter/flake.migrate": "github:user/app?dir=migrations",
        },
        init_containers=[container("migrate", "")],
    )
    after, decision = converge(pod)
    assert after["spec"]["initContainers"][0]["image"] == "flake-github:0/user/app--q--dir--eq--migrations"
    assert after["spec"]["containers"][0]["image"] == "flake-github:0/user/app"
    assert after["spec"]["containers"][1]["image"] == "docker.io/envoyproxy/envoy:v1.30.1"
    assert {c.name: c.action for c in decision.containers} == {
        "migrate": "rewritten",
        "app": "rewritten",
        "sidecar": "untouched",
    }
    assert decision.warnings == ()


def test_flake_ref_in_image_needs_no_annotation() -> None:
    pod = replicaset_pod([container("redis", "git+ssh://git@github.com/user/redis?ref=main")])
    after, _ = converge(pod)
    image = after["spec"]["containers"][0]["image"]
    assert image == "flake-git-ssh:0/git--at--github.com/user/redis--q--ref--eq--main"
    assert kubelet_accepts(image)


def test_nix_store_image_gets_recovery_annotation() -> None:
    pod = replicaset_pod([container("redis", STORE)])
    pod["metadata"]["annotations"] = {"nix-snapshotter/flake.redis": "github:user/redis"}
    after, decision = converge(pod)
    assert after["spec"]["containers"][0]["image"] == STORE
    recovery = json.loads(after["metadata"]["annotations"][RECOVERY_ANNOTATION])
    assert recovery == {
        "redis": {
            "storePath": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-redis-image.tar",
            "flake": "github:user/redis",
            "image": "flake-github:0/user/redis",
        }
    }
    assert decision.patch[0]["path"] == "/metadata/annotations/nix-snapshotter~1recovery"


def test_stale_recovery_annotation_is_replaced_and_pod_wide_ref_reaches_nix_images() -> None:
    pod = replicaset_pod(
        [container("redis", STORE)],
        {"nix-snapshotter/flake": "github:user/redis", RECOVERY_ANNOTATION: '{"old": {}}'},
    )
    after, decision = converge(pod)
    assert decision.patch[0]["op"] == "replace"
    assert set(json.loads(after["metadata"]["annotations"][RECOVERY_ANNOTATION])) == {"redis"}
    assert decision.warnings == ()


def test_existing_good_flake_image_is_kept() -> None:
    pod = replicaset_pod(
        [container("redis", "flake-github:0/user/redis")], {"nix-snapshotter/flake": "github:user/redis"}
    )
    decision = mutate(pod, SEED)
    assert decision.allowed and decision.patch == () and decision.warnings == ()
    assert decision.containers[0].action == "kept"


@pytest.mark.parametrize(
    ("image", "phrase"),
    [
        ("flake-github:0/user/Redis", "must be lowercase"),
        ("flake-github:0/user/redis:v1", "only strips ':latest'"),
        ("flake-git-ssh:0/github.com/user/redis", "--at--"),
        ("flake-github:0/user/redis--q--foo--eq--1", "'foo'"),
        ("flake-github:0/user", "no repository"),
    ],
)
def test_broken_flake_image_is_refused(image: str, phrase: str) -> None:
    decision = mutate(replicaset_pod([container("redis", image)]), SEED)
    assert decision.refusal is not None
    assert decision.refusal.reason == "undecodable-image"
    assert phrase in decision.refusal.message
    assert "container 'redis'" in decision.refusal.message


def test_per_container_annotation_on_registry_image_is_a_conflict() -> None:
    pod = replicaset_pod([container("redis", "redis:7")], {"nix-snapshotter/flake.redis": "github:user/redis"})
    refusal = mutate(pod, SEED).refusal
    assert refusal is not None and refusal.reason == "conflict"
    assert "nix-snapshotter/flake.redis" in refusal.message and "'redis:7'" in refusal.message


def test_annotation_for_unknown_container_is_refused() -> None:
    pod = replicaset_pod([container("redis", "")], {"nix-snapshotter/flake.reddis": "github:user/redis"})
    refusal = mutate(pod, SEED).refusal
    assert refusal is not None and "names no container" in refusal.message and "redis" in refusal.message


def test_image_and_annotation_disagree() -> None:
    pod = replicaset_pod(
        [container("redis", "github:user/redis")], {"nix-snapshotter/flake.redis": "github:user/other"}
    )
    refusal = mutate(pod, SEED).refusal
    assert refusal is not None and refusal.reason == "conflict"


def test_unused_pod_annotation_warns() -> None:
    pod = replicaset_pod([container("web", "nginx:1.27")], {"nix-snapshotter/flake": "github:user/redis"})
    decision = mutate(pod, SEED)
    assert decision.allowed and decision.patch == ()
    assert len(decision.warnings) == 1 and "reaches no container" in decision.warnings[0]


def test_nothing_to_do() -> None:
    pod = replicaset_pod([container("web", "nginx:1.27")], {"other/annotation": "x"})
    assert mutate(pod, SEED) is NOTHING_TO_DO


def test_bad_ref_is_refused_with_container_and_fix() -> None:
    pod = replicaset_pod([container("redis", "")], {"nix-snapshotter/flake": "github:user/redis/Main"})
    refusal = mutate(pod, SEED).refusal
    assert refusal is not None and refusal.reason == "unencodable" and refusal.code == 400
    assert "container 'redis' (spec.containers[0])" in refusal.message
    assert "use the hex dialect or lowercase the branch" in refusal.message
    hex_decision = mutate(pod, HEX)
    assert hex_decision.refusal is not None  # '--x4d--ain' would start a component with '-'


def test_all_problems_are_reported_together() -> None:
    pod = replicaset_pod(
        [container("a", ""), container("b", "")],
        {"nix-snapshotter/flake.a": "gitlab:x/y", "nix-snapshotter/flake.b": "github:x"},
    )
    refusal = mutate(pod, SEED).refusal
    assert refusal is not None
    assert "container 'a'" in refusal.message and "container 'b'" in refusal.message


def test_allow_list() -> None:
    settings = Settings(allow_sources=("github:myorg/*",))
    ok = replicaset_pod([container("a", "")], {"nix-snapshotter/flake": "github:MyOrg/app"})
    decision = mutate(ok, settings)
    assert decision.allowed and any("lowercased" in w for w in decision.warnings)
    bad = replicaset_pod([container("a", "")], {"nix-snapshotter/flake": "github:evil/app"})
    refusal = mutate(bad, settings).refusal
    assert refusal is not None and refusal.code == 403 and "github:myorg/*" in refusal.message
    smuggled = replicaset_pod([container("a", "flake-github:0/evil/app")])
    refusal = mutate(smuggled, settings).refusal
    assert refusal is not None and refusal.reason == "not-allowed"


def test_pull_policy_setting() -> None:
    settings = Settings(image_pull_policy="Always")
    pod = replicaset_pod([container("a", "")], {"nix-snapshotter/flake": "github:user/app"})
    after, decision = converge(pod, settings)
    assert after["spec"]["containers"][0]["imagePullPolicy"] == "Always"
    assert len(decision.patch) == 2


def test_hex_dialect_with_fragment() -> None:
    pod = replicaset_pod([container("a", "")], {"nix-snapshotter/flake": "github:user/app#redisWithShell"})
    after, _ = converge(pod, HEX)
    assert NODES["hex"](after["spec"]["containers"][0]["image"]) == "github:user/app#redisWithShell"


def test_whitespace_image_counts_as_empty() -> None:
    pod = replicaset_pod([container("a", "  ")], {"nix-snapshotter/flake": "github:user/app"})
    after, _ = converge(pod)
    assert after["spec"]["containers"][0]["image"] == "flake-github:0/user/app"


@pytest.mark.parametrize(
    ("mangle", "phrase"),
    [
        (lambda p: p["metadata"].__setitem__("annotations", ["x"]), "metadata.annotations must be a map"),
        (lambda p: p["metadata"]["annotations"].__setitem__("nix-snapshotter/flake", 5), "must be a string"),
        (lambda p: p["spec"]["containers"][0].__setitem__("image", 5), "image must be a string"),
        (lambda p: p["spec"].__setitem__("containers", {"a": 1}), "spec.containers must be a list"),
        (lambda p: p["spec"]["containers"].__setitem__(0, "redis"), "must be a container map"),
        (lambda p: p["spec"]["containers"][0].pop("name"), "has no name"),
        (lambda p: p.__setitem__("spec", "x"), "spec must be a PodSpec map"),
        (lambda p: p.__setitem__("metadata", 3), "metadata must be a map"),
    ],
)
def test_malformed_objects_are_refused(mangle: Any, phrase: str) -> None:
    pod = replicaset_pod([container("a", "")], {"nix-snapshotter/flake": "github:user/app"})
    mangle(pod)
    refusal = mutate(pod, SEED).refusal
    assert refusal is not None and refusal.reason == "malformed"
    assert phrase in refusal.message


def test_not_a_pod_at_all() -> None:
    things: list[Any] = [None, [], "pod", 3]
    for thing in things:
        refusal = mutate(thing, SEED).refusal
        assert refusal is not None and "must be a Pod object" in refusal.message


def _arbitrary_pods() -> st.SearchStrategy[Any]:
    images = st.one_of(
        st.sampled_from(["", " ", "nginx:1.27", "nix:0/nix/store/a-b.tar", " github:u/r", "GitHub:u/r", "x+y:z", "s3://b/k",
                         "flake-github:0/u/r", "localhost:5000/a", "gitlab:16.0", "https:x"]),
        st.text(max_size=20),
        st.integers(),
        st.none(),
    )  # fmt: skip
    containers = st.lists(
        st.fixed_dictionaries({"name": st.sampled_from(["a", "b"])}, optional={"image": images}), max_size=3
    )
    annotations = st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(["nix-snapshotter/flake", "nix-snapshotter/flake.a", "other/x", "nix-snapshotter/other"]),
            st.one_of(st.sampled_from(["github:u/r", "bad"]), st.integers()),
            max_size=3,
        ),
        st.lists(st.text(max_size=3), max_size=2),
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "metadata": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"annotations": annotations})),
            "spec": st.one_of(
                st.none(), st.fixed_dictionaries({}, optional={"containers": containers, "initContainers": containers})
            ),
        },
    )


@settings(max_examples=1500, deadline=None)
@given(_arbitrary_pods(), st.sampled_from([SEED, HEX]))
def test_the_cheap_precheck_never_skips_work(pod: Any, config: Settings) -> None:
    """may_concern() lets mutate() skip a pod only when the full decision would do nothing at all."""
    if not may_concern(pod):
        try:
            full = _Mutation(pod, config).run()
        except _Refused as refused:
            raise AssertionError(f"skipped a pod the full decision refuses: {refused.refusal}") from None
        assert full.allowed and full.patch == () and full.warnings == ()
