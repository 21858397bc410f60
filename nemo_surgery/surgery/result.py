"""What apply did: per-file results, the run's result (the report document) and apply's error types."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_surgery.errors import NemoError
from nemo_surgery.provenance import envelope
from nemo_surgery.surgery.plan import FilePlan
from nemo_surgery.surgery.report import FORMAT, VERSION
from nemo_surgery.surgery.verify_struct import FileVerification

#: Exit code of an interrupted run (128 + SIGINT), as a shell reports Ctrl-C.
EXIT_INTERRUPTED = 130


@dataclass
class FileResult:
    """One patched safetensors file: plan, digests and checks."""

    plan: FilePlan
    output: Path
    verification: FileVerification | None = None
    metadata_updated: bool = True
    modelspec_updated: bool | None = None  # None: the file has no modelspec.hash_sha256
    sha256_before_edit: str | None = None  # in place, finishing an interrupted edit: the digest before it began

    def to_json(self) -> dict[str, Any]:
        """Summary for reports and --json."""
        v = self.verification
        return {
            "file": str(self.plan.rel),
            "input": str(self.plan.src),
            "output": str(self.output),
            "layout": self.plan.layout,
            "tensors": [t.to_json() for t in self.plan.tensors],
            "bytes_zeroed": self.plan.bytes_zeroed,
            "metadata_updated": self.metadata_updated,
            "modelspec_hash_updated": self.modelspec_updated,
            "sha256_in": v.sha256_in if v else None,
            "sha256_before_interrupted_edit": self.sha256_before_edit,
            "sha256_out": v.sha256_out if v else None,
            "checks": [c.to_json() for c in v.checks] if v else [],
            "ok": v.ok if v else None,
        }


@dataclass
class ApplyResult:
    """What apply did (or would do, for a dry run)."""

    ckpt: Path
    output: Path
    layout: str
    kind: str
    neuron_set: Path
    neuron_set_sha256: str
    in_place: bool
    dry_run: bool
    files: list[FileResult]
    mirrored: list[FileVerification] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report_json: Path | None = None
    report_md: Path | None = None
    fingerprint: str | None = None  # the checkpoint's weights fingerprint (surgery.fingerprint)
    input_sha256: bool = True  # whether the inputs' SHA-256 is taken (a copy skips it unless asked: --input-sha256)

    @property
    def ok(self) -> bool:
        """True when every structural check passed (always True for a dry run)."""
        if self.dry_run:
            return True
        return all(f.verification is not None and f.verification.ok for f in self.files) and all(
            m.ok for m in self.mirrored
        )

    @property
    def rows_zeroed(self) -> int:
        """Rows zeroed over all tensors and files."""
        return sum(len(t.rows) for f in self.files for t in f.plan.tensors)

    def first_failure(self) -> str:
        """``file: check`` of the first failed check, for the one-line error."""
        for v in [f.verification for f in self.files] + self.mirrored:
            for c in v.checks if v else []:
                if not c.ok:
                    return f"{v.rel}: {c.name}"
        return "unknown check"

    def to_json(self) -> dict[str, Any]:
        """The versioned report document (also the --json summary)."""
        return {
            **envelope(FORMAT, VERSION),
            "ok": self.ok,
            "dry_run": self.dry_run,
            "in_place": self.in_place,
            "input": str(self.ckpt),
            "output": str(self.output),
            "kind": self.kind,
            "layout": self.layout,
            "weights_fingerprint": self.fingerprint,
            "input_sha256": self.input_sha256,
            "neuron_set": {"path": str(self.neuron_set), "sha256": self.neuron_set_sha256},
            "rows_zeroed": self.rows_zeroed,
            "tensors_patched": sum(len(f.plan.tensors) for f in self.files),
            "bytes_zeroed": sum(f.plan.bytes_zeroed for f in self.files),
            "files": [f.to_json() for f in self.files],
            "mirrored_files": len(self.mirrored),
            "mirror_checks": [
                {"file": m.rel, "ok": m.ok, "detail": "; ".join(c.detail for c in m.checks)} for m in self.mirrored
            ],
            "notes": list(self.notes),
            "report": {"json": str(self.report_json) if self.report_json else None,
                       "md": str(self.report_md) if self.report_md else None},
        }


class ApplyFailed(NemoError):
    """Structural verification failed; the output is marked failed and a report was written."""

    def __init__(self, message: str, result: ApplyResult) -> None:
        super().__init__(message)
        self.result = result


class ApplyInterrupted(NemoError):
    """Ctrl-C or SIGTERM stopped apply; the message says exactly what is on disk and what to do."""

    exit_code = EXIT_INTERRUPTED
