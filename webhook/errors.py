"""Error values shared by the codec and the mutation logic.

Every error carries a short machine-readable ``reason`` (used for metrics and
for the admission ``status.reason``) and a message written for the person who
has to change their manifest.
"""

from __future__ import annotations


class WebhookError(ValueError):
    """A refusal the user can act on: ``message`` says what, where and how to fix."""

    reason = "invalid"

    def __init__(self, message: str, *, position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: 1-based character position in the input the message points at.
        self.position = position


class FlakeRefError(WebhookError):
    """The text is not a flake reference Nix would accept."""

    reason = "invalid-ref"


class UnsupportedSchemeError(FlakeRefError):
    """A valid kind of flake reference for which no node protocol exists."""

    reason = "unsupported-scheme"


class EncodeError(WebhookError):
    """The reference is valid but cannot make the trip through the chosen dialect."""

    reason = "unencodable"


class ImageDecodeError(WebhookError):
    """A ``flake-*:0`` image that the node would refuse or misread."""

    reason = "undecodable-image"


class ImageRefError(WebhookError):
    """A string the kubelet's image-reference grammar refuses."""

    reason = "invalid-image"
