"""One versioned-document envelope for every JSON file the tool writes, plus file hashes and library versions.

Statistics, neuron sets, apply reports and verify reports all start with the
same keys (``format``, ``version``, ``tool_version``, ``environment``), made
and checked here, so that a reader can tell what wrote a document and with
which libraries. Nothing here imports torch: apply must stay model-free.
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from nemo_surgery import __version__
from nemo_surgery.errors import InputError

#: Distributions whose versions decide the numbers in a document.
LIBRARIES = ("torch", "diffusers", "transformers", "safetensors", "scikit-image", "numpy")


def library_versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries that produced the numbers (no imports)."""
    out = {"nemo_surgery": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def envelope(format_name: str, version: int) -> dict[str, Any]:
    """The keys every document starts with: what it is, its schema version, who wrote it, with what."""
    return {"format": format_name, "version": version, "tool_version": __version__, "environment": library_versions()}


def check_envelope(doc: Any, format_name: str, version: int, path: str | Path, hint: str) -> dict[str, Any]:
    """Return ``doc`` if it is a JSON object of this format and version; else raise a one-line InputError.

    ``hint`` says how to produce a valid document (e.g. "compute it with `nemo-surgery stats`").
    A document without ``format`` (written before the envelope existed) is accepted when the version matches.
    """
    if not isinstance(doc, dict):
        raise InputError(f"{path}: not a {format_name} document (top level is not a JSON object); {hint}")
    found = doc.get("format", format_name)
    if found != format_name:
        raise InputError(f"{path}: is a {found!r} document, expected {format_name!r}; {hint}")
    if doc.get("version") != version:
        raise InputError(f"{path}: {format_name} version {doc.get('version')!r} is not supported (expected {version}); {hint}")
    return doc


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
