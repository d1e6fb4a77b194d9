"""Names the deployment shares across certificates, registration and manifests (manifests/base)."""

DEFAULT_SERVICE = "nix-flake-webhook"
DEFAULT_NAMESPACE = "nix-flake-webhook"
