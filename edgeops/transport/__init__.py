"""Talking to devices: a small interface, a local implementation for tests, an SSH one for real."""

from edgeops.transport.base import CommandResult, Transport

__all__ = ["CommandResult", "Transport"]
