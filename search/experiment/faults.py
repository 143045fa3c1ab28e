"""What a search says when its storage stops accepting writes part-way (a full disk, a
read-only mount, lost permissions): one line naming the folder and how to continue,
instead of the traceback of whichever writer failed first (Tune, Optuna, a checkpoint)."""

from __future__ import annotations

import errno
import re
import uuid
from collections.abc import Iterable

from search.experiment.folder import Experiment
from trainable.storage import Storage

# errors only writes meet (a denied permission may as well be the data's: the probe tells)
STORAGE_ERRNOS = {errno.ENOSPC: "no space left", errno.EROFS: "read-only file system",
                  errno.EDQUOT: "disk quota exceeded"}
_TEXT = re.compile(
    r"\[errno (28|30|122)\]|no space left on device|read-only file system|disk quota exceeded"
    r"|database or disk is full|attempt to write a readonly database",
    re.IGNORECASE,
)


def storage_failure(exp: Experiment, err: BaseException | None = None, trial_errors: Iterable[str] = ()) -> str | None:
    """One line when the search failed because its storage no longer takes writes (seen in
    `err`, its causes, the trials' error lines, or a write probe), else None."""
    reason = _probe(exp) or _reason_in(err) or next((_short(t) for t in trial_errors if _TEXT.search(t)), None)
    if reason is None:
        return None
    return (
        f"the storage of experiment {exp.path} stopped accepting writes ({reason}); what was written is kept: "
        f"free space or restore write access, then continue with: python -m search.run --storage-path "
        f"{exp.storage} --name {exp.name} --resume"
    )


def _probe(exp: Experiment) -> str | None:
    """Why a small file cannot be written into the experiment (and its local mirror), or None."""
    folders = [exp.path] if exp.store.is_local else [exp.path, exp.local]
    for folder in folders:
        store = Storage(folder)
        try:
            if not store.exists():  # not started yet: nothing to tell
                continue
        except Exception as err:  # the storage cannot even be listed
            return _short(str(err)) or type(err).__name__
        probe = store.fs_path(f".write-check-{uuid.uuid4().hex[:8]}")
        try:
            with store.fs.open_output_stream(probe) as f:
                f.write(b"ok" * 2048)
        except Exception as err:  # pyarrow raises OSError subclasses, botocore others
            return _short(str(err)) or type(err).__name__
        finally:
            try:
                store.fs.delete_file(probe)
            except Exception:  # never written
                pass
    return None


def _reason_in(err: BaseException | None) -> str | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        code = getattr(err, "errno", None)
        if code in STORAGE_ERRNOS:
            return f"{STORAGE_ERRNOS[code]}: {getattr(err, 'filename', None) or _short(str(err))}"
        if _TEXT.search(str(err)):
            return _short(str(err))
        err = err.__cause__ or err.__context__
    return None


def _short(text: str) -> str:
    """The line of `text` that names the storage error (or its last line), at most 200 characters."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return next((ln for ln in lines if _TEXT.search(ln)), lines[-1] if lines else "")[:200]
