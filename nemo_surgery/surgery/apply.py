"""Apply a neuron set to a safetensors checkpoint: plan, patch byte-exactly, verify, publish with its report.

``run_apply`` is the one entry point (the CLI is a thin wrapper). Everything that
can be checked is checked before the first byte is written: the plan (keys,
shapes, rows), the neuron set's weights fingerprint against the checkpoint's
(``surgery.fingerprint``), the output path, and the locks.

Copies (the default). The output and its temps are locked for the whole run
(``surgery.locking``: one writer per output; the input is share-locked so no
``--in-place`` edit runs under us). A run first finishes an interrupted publish
of the same output and removes stale temps of dead runs. Patched files are
written into a temp beside the destination, verified as on disk, and published
together with their report by one journaled set of renames
(``surgery.journal.publish``): output and report appear together or not at all.
Folder outputs are assembled in a temp folder (unchanged files copied or
reflinked, never hard-linked: the output shares no inode with the input); the
report sits inside it. A failed verification publishes ``<out>.FAILED`` with a
report saying ``"ok": false`` and raises ``ApplyFailed``.

In place (``--in-place``). Not atomic, repairable: the checkpoint is locked, a
journal beside it is written before the first byte and removed after the report,
so an interrupted edit is detectable (``surgery.journal.pending_edit``) and the
next run of the same set finishes it (zeroing is idempotent).

Report locations: a folder output holds ``report.json``/``report.md`` inside it;
a single-file output gets ``<out>.report.json``/``<out>.report.md`` beside it.
Ctrl-C and SIGTERM raise ``ApplyInterrupted`` (exit 130) whose message says what
is on disk.

Size: over 350 lines because it is the one place that orders these steps; the
steps themselves live in the modules it imports.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nemo_surgery.atomic import current_umask
from nemo_surgery.errors import InputError, NemoError
from nemo_surgery.neuron_set import NeuronSet, load_neuron_set
from nemo_surgery.provenance import sha256_file
from nemo_surgery.surgery.copypass import copy_range
from nemo_surgery.surgery.discover import Source, discover
from nemo_surgery.surgery.fingerprint import source_fingerprints
from nemo_surgery.surgery.journal import Commit, begin_edit, end_edit, journal_path, pending_edit, publish, roll_forward
from nemo_surgery.surgery.locking import PathLock, signals_deferred, sweep, term_as_interrupt, tmp_path, writable_folder
from nemo_surgery.surgery.patch import (
    MODELSPEC_HASH,
    fsync_file,
    guard_write,
    plan_in_place,
    write_in_place,
    write_patched_copy,
)
from nemo_surgery.surgery.plan import FilePlan, PatchPlan, build_plan
from nemo_surgery.surgery.report import write_report_files, write_reports
from nemo_surgery.surgery.result import ApplyFailed, ApplyInterrupted, ApplyResult, FileResult
from nemo_surgery.surgery.testhooks import pause_at
from nemo_surgery.surgery.verify_struct import FileVerification, verify_in_place, verify_mirrored, verify_written

__all__ = ["ApplyFailed", "ApplyInterrupted", "ApplyResult", "FileResult", "default_output", "run_apply"]

REPORT_NAMES = ("report.json", "report.md")
FAILED_SUFFIX = ".FAILED"
_FICLONE = 0x40049409  # linux/fs.h: clone (reflink) a whole file


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


def _resolve_output(source: Source, out: str | Path | None, in_place: bool) -> Path:
    """The destination path; refuses outputs equal to or inside the input (existence is checked under the lock)."""
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
    return target


def _existing(source: Source, target: Path, force: bool) -> tuple[int, int, int] | None:
    """Identity of an existing output that --force may replace (None when absent); refuse otherwise."""
    if not (target.exists() or target.is_symlink()):
        return None
    if not force:
        raise InputError(f"{target}: output exists; pass --force to replace it")
    if target.is_dir() != source.is_folder:
        what = "a folder" if target.is_dir() else "a file"
        raise InputError(f"{target}: output exists and is {what}; remove it or choose another --out")
    st = target.lstat()
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _identity(target: Path) -> tuple[int, int, int] | None:
    try:
        st = target.lstat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _recheck(target: Path, seen: tuple[int, int, int] | None, lock: PathLock) -> None:
    """At publish time: our lock is still the lock, and the destination is as we found it."""
    if not lock.held():
        raise NemoError(f"{lock.file}: lock file removed while apply ran; {target} was not written; rerun")
    if _identity(target) != seen:
        raise NemoError(f"{target}: created or replaced by another program while apply ran; not overwritten; rerun")


def _report_paths(output: Path, is_folder: bool) -> tuple[Path, Path]:
    if is_folder:
        return output / REPORT_NAMES[0], output / REPORT_NAMES[1]
    return output.with_name(output.name + ".report.json"), output.with_name(output.name + ".report.md")


def _cp_mode(src: Path, dst: Path) -> None:
    """Give dst the mode ``cp`` would: src's permission bits less the umask."""
    with contextlib.suppress(OSError):
        os.chmod(dst, os.stat(src).st_mode & 0o777 & ~current_umask())


def _clone_or_copy(src: Path, dst: Path) -> None:
    """Copy src to a new dst: a reflink clone where the filesystem has them, else a kernel copy. Never a hard link."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        except OSError:
            copy_range(fin.fileno(), fout.fileno(), 0, 0, os.fstat(fin.fileno()).st_size)
        os.fsync(fout.fileno())
    _cp_mode(src, dst)


def _patch_and_verify(fp: FilePlan, dst: Path, rel: str, result: ApplyResult) -> FileVerification:
    """Write the patched copy (one pass: the output's SHA-256, the input's when asked, rows read back) and verify it.

    The fsync runs while the header is re-validated (and, for a modelspec hash,
    the output re-read and hashed); both finish before this returns, i.e. before
    any rename.
    """
    written = write_patched_copy(fp, dst, result.neuron_set_sha256, fsync=False, hash_input=result.input_sha256)
    _cp_mode(fp.src, dst)
    with ThreadPoolExecutor(max_workers=1) as pool:
        synced = pool.submit(fsync_file, dst)
        verification = verify_written(fp, dst, written, rel=rel)
        synced.result()
    return verification


def _failed_path(target: Path) -> Path:
    return target.with_name(target.name + FAILED_SUFFIX)


def _build_file(plan: PatchPlan, result: ApplyResult, target: Path, tmp: Path) -> Commit:
    fp = plan.files[0]
    fr = FileResult(plan=fp, output=target, verification=_patch_and_verify(fp, tmp, target.name, result))
    fr.modelspec_updated = True if MODELSPEC_HASH in (fp.header.metadata or {}) else None
    result.files.append(fr)
    final = target if result.ok else _failed_path(target)
    fr.output = result.output = final
    result.report_json, result.report_md = _report_paths(final, False)
    json_tmp, md_tmp = tmp_path(target, ".report.json"), tmp_path(target, ".report.md")
    write_report_files(result.to_json(), json_tmp, md_tmp)
    # an old report must never sit beside the new output: it goes before the output is renamed
    return Commit(payload=(tmp, final), extras=[(json_tmp, result.report_json), (md_tmp, result.report_md)],
                  stale=[result.report_json, result.report_md])


def _build_folder(plan: PatchPlan, result: ApplyResult, target: Path, tmp_root: Path) -> Commit:
    src_root = plan.source.path
    by_src = {fp.src: fp for fp in plan.files}
    _cp_mode(src_root, tmp_root)
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
                guard_write(dst, lambda s=src.resolve(), d=dst: _clone_or_copy(s, d))
                result.mirrored.append(verify_mirrored(str(rel), src, dst))
                continue
            fr = FileResult(plan=fp, output=target / rel, verification=_patch_and_verify(fp, dst, str(rel), result))
            fr.modelspec_updated = True if MODELSPEC_HASH in (fp.header.metadata or {}) else None
            result.files.append(fr)
    final = target if result.ok else _failed_path(target)
    result.output = final
    for fr in result.files:
        fr.output = final / fr.plan.rel
    result.report_json, result.report_md = _report_paths(final, True)
    write_report_files(result.to_json(), *_report_paths(tmp_root, True))
    aside = tmp_path(target, ".old") if final.exists() or final.is_symlink() else None
    return Commit(payload=(tmp_root, final), aside=aside, cleanup=[aside] if aside else [])


def _apply_copy(plan: PatchPlan, result: ApplyResult, target: Path, force: bool, stage: list[str]) -> None:
    source = plan.source
    with PathLock(source.path, shared=True, what="input"), PathLock(target) as lock:
        pending = pending_edit(source.path)
        if pending is not None:
            raise InputError(
                f"{source.path}: holds {pending.describe()} (journal {pending.journal}); finish it first with "
                f"`nemo-surgery apply {source.path} --in-place --neurons {pending.neuron_set or 'SET'}`"
            )
        if roll_forward(target):
            result.notes.append(f"finished publishing {target} and its report, left half-published by a killed run")
        swept = sweep(target)
        if swept:
            result.notes.append(f"removed {len(swept)} temp file(s) of an earlier interrupted run beside {target}")
        seen = _existing(source, target, force)
        pause_at("locked")
        tmp = tmp_path(target, "" if source.is_folder else ".tmp")
        stage[0] = f"interrupted: nothing was written to {target} (temp files removed); the input is unchanged"
        published = False
        try:
            if source.is_folder:
                tmp.mkdir()
                commit = _build_folder(plan, result, target, tmp)
            else:
                commit = _build_file(plan, result, target, tmp)
            pause_at("before-publish")
            _recheck(target, seen, lock)
            stage[0] = f"interrupted after {result.output} and its report were published; nothing to redo"
            with signals_deferred():
                published = True
                publish(target, commit)
        except BaseException:
            if not published:
                sweep(target)
            raise


def _apply_in_place(plan: PatchPlan, result: ApplyResult, stage: list[str]) -> None:
    ckpt = plan.source.path
    with PathLock(ckpt, what="checkpoint"):
        pending = pending_edit(ckpt)
        if pending is not None and pending.neuron_set_sha256 not in (None, result.neuron_set_sha256):
            raise InputError(
                f"{ckpt}: holds {pending.describe()}; finish that one first with "
                f"`nemo-surgery apply {ckpt} --in-place --neurons {pending.neuron_set}`"
            )
        for path in (ckpt, *_report_paths(ckpt, plan.source.is_folder)):
            sweep(path)  # temps of a killed in-place run: its journal and report temps
        stage[0] = f"interrupted before the in-place edit began: {ckpt} is unchanged"
        planned = [(fp, plan_in_place(fp, result.neuron_set_sha256)) for fp in plan.files]
        before = pending.sha256_before if pending else {str(fp.rel): p.before.sha256_in for fp, p in planned}
        if pending is not None:
            result.notes.append(f"finished {pending.describe()}; its journal {pending.journal} is removed")
        begin_edit(ckpt, result.neuron_set, result.neuron_set_sha256, before)
        stage[0] = (
            f"interrupted during the in-place edit of {ckpt}: some rows may still be unzeroed (--in-place is not "
            f"atomic); {journal_path(ckpt)} marks the edit as unfinished; rerun the same command to finish it"
        )
        for fp, p in planned:
            write_in_place(fp, p)
            fr = FileResult(plan=fp, output=fp.src, metadata_updated=p.metadata_updated, modelspec_updated=p.modelspec_updated)
            fr.sha256_before_edit = before.get(str(fp.rel)) if pending else None
            fr.verification = verify_in_place(fp, p.before, p.metadata)
            result.files.append(fr)
            result.notes += _in_place_notes(fp, p.metadata_updated, p.modelspec_updated)
        pause_at("in-place-before-report")
        result.report_json, result.report_md = _report_paths(ckpt, plan.source.is_folder)
        write_reports(result.to_json(), result.report_json, result.report_md)
        end_edit(ckpt)


def _in_place_notes(fp: FilePlan, metadata_updated: bool, modelspec_updated: bool | None) -> list[str]:
    notes = []
    if not metadata_updated:
        notes.append(f"{fp.rel}: provenance metadata not written (the new header does not fit the existing "
                     "header's padded length); rows were zeroed")
    if modelspec_updated is True and not metadata_updated:
        notes.append(f"{fp.rel}: modelspec.hash_sha256 rewritten in place (same length) with the new data digest")
    if modelspec_updated is False:
        notes.append(f"{fp.rel}: modelspec.hash_sha256 NOT updated: it is stale (the new value does not fit the "
                     "header); recompute it, or apply without --in-place")
    return notes


def _check_fingerprint(neuron_set: NeuronSet, neurons_path: Path, source: Source, result: ApplyResult) -> None:
    """Refuse a set scanned on other weights, before anything is written."""
    have = source_fingerprints(source)
    result.fingerprint = have[0] if have else None
    wanted = getattr(neuron_set, "weights_fingerprint", None)
    if not wanted:
        result.notes.append("the neuron set records no weights fingerprint; not checked against the checkpoint")
        return
    if wanted not in have:
        got = ", ".join(h[5:17] for h in have) or "none"
        raise InputError(
            f"{neurons_path}: the neuron set was found on other weights (weights fingerprint {wanted[5:17]}, "
            f"{source.path} has {got}); pass the checkpoint it was scanned on (an fp16 copy counts as other weights)"
        )


def run_apply(
    ckpt: str | Path,
    neurons_path: str | Path,
    out: str | Path | None = None,
    in_place: bool = False,
    dry_run: bool = False,
    force: bool = False,
    *,
    neuron_set: NeuronSet | None = None,
    input_sha256: bool = False,
) -> ApplyResult:
    """Zero the neuron set's rows in CKPT's safetensors weights; verify and report.

    ``neuron_set`` is the already-parsed set (the apply->verify workflow parses
    it once); ``neurons_path`` is still read for its SHA-256 and recorded.
    ``input_sha256`` also records each patched input file's SHA-256 when writing
    a copy (a second digest over the file: about 0.7 CPU-s per GB); in place,
    the input digest is always taken (the edit's journal needs it).
    Raises InputError for bad input (nothing written), NemoError for I/O
    failures and locked outputs (temp files removed), ApplyFailed when
    structural verification fails and ApplyInterrupted on Ctrl-C or SIGTERM.
    """
    neurons_path = Path(neurons_path)
    if neuron_set is None:
        neuron_set = load_neuron_set(neurons_path)
    source = discover(ckpt)
    plan = build_plan(source, neuron_set)
    if not plan.files:
        raise InputError(f"{neurons_path}: the neuron set holds no neurons; nothing to apply")
    target = _resolve_output(source, out, in_place)
    if not in_place:
        writable_folder(target)
    result = ApplyResult(
        ckpt=source.path, output=target, layout=plan.layout, kind=source.kind, neuron_set=neurons_path,
        neuron_set_sha256=sha256_file(neurons_path), in_place=in_place, dry_run=dry_run,
        files=[] if not dry_run else [FileResult(plan=fp, output=_planned_output(fp, source, target)) for fp in plan.files],
        notes=list(plan.notes), input_sha256=input_sha256 or in_place,
    )
    _check_fingerprint(neuron_set, neurons_path, source, result)
    if dry_run:
        if not in_place:
            _existing(source, target, force)
        return result
    stage = [f"interrupted: nothing was written; {source.path} is unchanged"]
    try:
        with term_as_interrupt():
            if in_place:
                _apply_in_place(plan, result, stage)
            else:
                _apply_copy(plan, result, target, force, stage)
    except KeyboardInterrupt:
        raise ApplyInterrupted(stage[0]) from None
    if not result.ok:
        where = "left in place" if in_place else f"published as {result.output}"
        raise ApplyFailed(
            f"structural verification failed ({result.first_failure()}); output {where}; see {result.report_md}", result
        )
    return result


def _planned_output(fp: FilePlan, source: Source, target: Path) -> Path:
    return target / fp.rel if source.is_folder else target

