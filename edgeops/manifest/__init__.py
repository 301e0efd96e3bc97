"""The declarative layer: pydantic models of every kind and a loader that keeps line marks."""

from edgeops.manifest.models import Deployment, DeviceProfile, Fleet
from edgeops.manifest.workspace import Document, Workspace, find_root, load_document, load_workspace

__all__ = ["Deployment", "DeviceProfile", "Document", "Fleet", "Workspace", "find_root", "load_document",
           "load_workspace"]
