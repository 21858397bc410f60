"""Apply a neuron set to a safetensors checkpoint: plan, patch byte-exactly, verify, report.

``run_apply`` is the one entry point (the CLI is a thin wrapper). Outputs are
built beside their destination and renamed into place only after structural
verification passed; a failed verification leaves ``<out>.FAILED`` plus a report
with ``"ok": false`` and raises ``ApplyFailed``.

Order per patched file: copy with new header and zeroed rows into a temp path
in the destination folder; re-open and verify it (while fsync runs); rename.
Folder outputs are assembled in a temp sibling folder (unchanged files
hard-linked, else copied) and renamed as a whole; an existing output replaced
with ``force`` is removed only after the new one is in place.

Report locations: a folder output holds ``report.json``/``report.md`` inside it;
a single-file output gets ``<out>.report.json``/``<out>.report.md`` beside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_surgery.errors import InputError, NemoError
from nemo_surgery.neuron_set import load_neuron_set
from nemo_surgery.provenance import envelope, sha256_file
from nemo_surgery.surgery.discover import Source, discover
from nemo_surgery.surgery.patch import MODELSPEC_HASH, copy_range, fsync_file, guard_write, patch_in_place, write_patched_copy
from nemo_surgery.surgery.plan import FilePlan, PatchPlan, build_plan
from nemo_surgery.surgery.report import FORMAT, VERSION, write_reports
from nemo_surgery.surgery.verify_struct import FileVerification, verify_copy, verify_in_place, verify_mirrored

REPORT_NAMES = ("report.json", "report.md")
FAILED_SUFFIX = ".FAILED"


@dataclass
class FileResult:
    """One patched safetensors file: plan, digests and checks."""

    plan: FilePlan
    output: Path
    verification: FileVerification | None = None
    metadata_updated: bool = True

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
            "sha256_in": v.sha256_in if v else None,
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


def default_output(ckpt: Path) -> Path:
    """Sibling output path: ``<name>-nemo`` for folders, ``<stem>-nemo.safetensors`` for files."""
    if ckpt.is_dir():
        return ckpt.with_name(f"{ckpt.name}-nemo")
    return ckpt.with_name(f"{ckpt.stem}-nemo.safetensors")


def _same_path(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def _resolve_output(source: Source, out: str | Path | None, in_place: bool, force: bool) -> Path:
    ckpt = source.path
    if in_place:
        if out is not None and not _same_path(Path(out), ckpt):
            raise InputError("--in-place edits CKPT itself; drop --out or drop --in-place")
        return ckpt
    target = Path(out) if out is not None else default_output(ckpt)
    if target.exists() and _same_path(target, ckpt):
        raise InputError(f"{target}: output equals the input; pass --in-place to edit it, or choose another --out")
    if source.is_folder and target.resolve().is_relative_to(ckpt.resolve()):
        raise InputError(f"{target}: output lies inside the input folder; choose a path outside it")
    if target.exists() or target.is_symlink():
        if not force:
            raise InputError(f"{target}: output exists; pass --force to replace it")
        if target.is_dir() != source.is_folder:
            what = "a folder" if target.is_dir() else "a file"
            raise InputError(f"{target}: output exists and is {what}; remove it or choose another --out")
    return target


def _report_paths(output: Path, is_folder: bool) -> tuple[Path, Path]:
    if is_folder:
        return output / REPORT_NAMES[0], output / REPORT_NAMES[1]
    return output.with_name(output.name + ".report.json"), output.with_name(output.name + ".report.md")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link src to dst; copy (kernel copy, reflink where supported) when linking fails."""
    try:
        os.link(src, dst)
        return
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        copy_range(fin.fileno(), fout.fileno(), 0, 0, os.fstat(fin.fileno()).st_size)
        os.fsync(fout.fileno())
    shutil.copystat(src, dst)


def _copy_mode(src: Path, dst: Path) -> None:
    """Give dst the permission bits of src (temp files are created private)."""
    with contextlib.suppress(OSError):
        os.chmod(dst, os.stat(src).st_mode & 0o7777)


def _public_mode(*paths: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o666 & ~umask)


def _move_aside(path: Path) -> Path:
    failed = path.with_name(path.name + FAILED_SUFFIX)
    if failed.is_dir() and not failed.is_symlink():
        shutil.rmtree(failed)
    elif failed.exists() or failed.is_symlink():
        failed.unlink()
    return failed


def _finish(result: ApplyResult, artifact_tmp: Path, target: Path, is_folder: bool) -> None:
    """Write reports and rename the verified (or failed) output into place."""
    final = target if result.ok else _move_aside(target)
    result.output = final
    if is_folder:
        json_tmp, md_tmp = _report_paths(artifact_tmp, True)
        result.report_json, result.report_md = _report_paths(final, True)
        write_reports(result.to_json(), json_tmp, md_tmp)
        _public_mode(json_tmp, md_tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(artifact_tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    else:
        result.report_json, result.report_md = _report_paths(final, False)
        os.replace(artifact_tmp, final)
        write_reports(result.to_json(), result.report_json, result.report_md)
        _public_mode(result.report_json, result.report_md)
    _fsync_dir(final.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _patch_and_verify(fp: FilePlan, dst: Path, rel: str, result: ApplyResult) -> FileVerification:
    """Write the patched copy (one pass, both SHA-256s on worker threads) and verify it as on disk.

    The fsync runs while the output is re-read and compared with the input (from
    the page cache); both finish before this returns, i.e. before any rename.
    """
    written = write_patched_copy(fp, dst, result.neuron_set_sha256, fsync=False)
    _copy_mode(fp.src, dst)
    with ThreadPoolExecutor(max_workers=1) as pool:
        synced = pool.submit(fsync_file, dst)
        verification = verify_copy(fp, dst, written, rel=rel)
        synced.result()
    return verification


def _apply_file_copy(plan: PatchPlan, result: ApplyResult, target: Path) -> None:
    fp = plan.files[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fr = FileResult(plan=fp, output=target, verification=_patch_and_verify(fp, tmp, target.name, result))
        result.files.append(fr)
        _finish(result, tmp, target, is_folder=False)
        fr.output = result.output
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _apply_folder_copy(plan: PatchPlan, result: ApplyResult, target: Path) -> None:
    src_root = plan.source.path
    by_src = {fp.src: fp for fp in plan.files}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _copy_mode(src_root, tmp_root)
        for dirpath, _dirs, names in os.walk(src_root, followlinks=True):
            here = Path(dirpath)
            rel_dir = here.relative_to(src_root)
            (tmp_root / rel_dir).mkdir(parents=True, exist_ok=True)
            for name in sorted(names):
                src, rel = here / name, rel_dir / name
                if rel_dir == Path(".") and name in REPORT_NAMES:
                    continue  # a report of an earlier run describes that output, not this one
                dst = tmp_root / rel
                fp = by_src.get(src)
                if fp is None:
                    guard_write(dst, lambda s=src.resolve(), d=dst: _link_or_copy(s, d))
                    result.mirrored.append(verify_mirrored(str(rel), src, dst))
                    continue
                fr = FileResult(plan=fp, output=target / rel, verification=_patch_and_verify(fp, dst, str(rel), result))
                result.files.append(fr)
        _finish(result, tmp_root, target, is_folder=True)
        for fr in result.files:
            fr.output = result.output / fr.plan.rel
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise


def _apply_in_place(plan: PatchPlan, result: ApplyResult) -> None:
    for fp in plan.files:
        done = patch_in_place(fp, result.neuron_set_sha256)
        fr = FileResult(plan=fp, output=fp.src, metadata_updated=done.metadata_updated)
        fr.verification = verify_in_place(fp, done.before, done.metadata)
        result.files.append(fr)
        if not done.metadata_updated:
            result.notes.append(
                f"{fp.rel}: provenance metadata not written (the new header does not fit the existing "
                "header's padded length; rows were zeroed, no other byte changed)"
            )
    result.report_json, result.report_md = _report_paths(plan.source.path, plan.source.is_folder)
    write_reports(result.to_json(), result.report_json, result.report_md)
    _public_mode(result.report_json, result.report_md)


def run_apply(
    ckpt: str | Path,
    neurons_path: str | Path,
    out: str | Path | None = None,
    in_place: bool = False,
    dry_run: bool = False,
    force: bool = False,
) -> ApplyResult:
    """Zero the neuron set's rows in CKPT's safetensors weights; verify and report.

    Raises InputError for bad input (nothing written), NemoError for I/O failures
    (temp files removed) and ApplyFailed when structural verification fails.
    """
    neurons_path = Path(neurons_path)
    neuron_set = load_neuron_set(neurons_path)
    source = discover(ckpt)
    plan = build_plan(source, neuron_set)
    if not plan.files:
        raise InputError(f"{neurons_path}: the neuron set holds no neurons; nothing to apply")
    target = _resolve_output(source, out, in_place, force)
    result = ApplyResult(
        ckpt=source.path,
        output=target,
        layout=plan.layout,
        kind=source.kind,
        neuron_set=neurons_path,
        neuron_set_sha256=sha256_file(neurons_path),
        in_place=in_place,
        dry_run=dry_run,
        files=[] if not dry_run else [FileResult(plan=fp, output=_planned_output(fp, source, target)) for fp in plan.files],
    )
    if any(MODELSPEC_HASH in (fp.header.metadata or {}) for fp in plan.files):
        result.notes.append(
            "modelspec.hash_sha256 is refreshed as the SHA-256 of the tensor data buffer (header excluded), "
            "as the SAI ModelSpec defines it"
        )
    if dry_run:
        return result
    if in_place:
        _apply_in_place(plan, result)
    elif source.is_folder:
        _apply_folder_copy(plan, result, target)
    else:
        _apply_file_copy(plan, result, target)
    if not result.ok:
        failing = next(
            (f"{v.rel}: {c.name}" for v in [f.verification for f in result.files] + result.mirrored if v
             for c in v.checks if not c.ok),
            "unknown check",
        )
        where = "left in place" if in_place else f"moved to {result.output}"
        raise ApplyFailed(
            f"structural verification failed ({failing}); output {where}; see {result.report_md}", result
        )
    return result


def _planned_output(fp: FilePlan, source: Source, target: Path) -> Path:
    return target / fp.rel if source.is_folder else target
