"""What can go wrong in a handshake or on a sealed channel: one exception class per cause."""

from __future__ import annotations


class ChannelError(ValueError):
    """Base class of every handshake or channel failure."""


class HandshakeError(ChannelError):
    """The handshake failed (unknown client, wrong server, malformed message)."""


class MalformedError(ChannelError):
    """A sealed message cannot be parsed or its sizes are inconsistent."""


class SessionError(ChannelError):
    """A message belongs to another session, version or direction."""


class ReplayError(ChannelError):
    """A message was replayed, reordered or dropped (counter is not last received + 1)."""


class TamperError(ChannelError):
    """Authentication failed: the header or ciphertext was modified, or the key is wrong."""


class OversizeError(ChannelError):
    """The announced payload is larger than the receiver accepts."""


class RekeyRequired(ChannelError):
    """The session has sealed as many messages as it may; start a new handshake."""
