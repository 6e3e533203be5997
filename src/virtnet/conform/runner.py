"""Run conform cases one by one, each isolated: its own process (a case that hangs is
killed at its timeout, a SIGBUS in our own mapping stays in it), its own connection, and
after it a normal session on a fresh connection that proves the back-end still serves.

If nothing listens on the socket any more, the back-end died: that case fails and the
ones after it are "not run".
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from virtnet.conform.cases import Case, Context, normal_session
from virtnet.conform.guest import rx_seen
from virtnet.conform.session import BackendGone, CaseFailure, CaseNotOffered, CaseSkipped

PASSED, FAILED, SKIPPED, NOT_RUN = "passed", "failed", "skipped", "not run"
# SURVIVED: a case whose every check held, but that checks only that the back-end lives
# on (the spec defines no answer); NOT_OFFERED: a feature the case or its matrix cell
# needs is not offered. Neither is a failure.
SURVIVED, NOT_OFFERED = "survived", "not offered"
STATUSES = (PASSED, SURVIVED, FAILED, SKIPPED, NOT_OFFERED, NOT_RUN)
DEFAULT_TIMEOUT = 20.0
LIVENESS_ATTEMPTS = 10  # a back-end may need a moment to drop the last connection
LIVENESS_PAUSE = 0.3


@dataclass
class Result:
    name: str
    group: str
    status: str
    detail: str
    seconds: float = 0.0
    rule: str = ""
    echoed: bool | None = None  # None: no frame waited for; else whether one came back
    case: str = ""  # the case without its matrix cell ("data-mergeable")
    ring: str | None = None  # a matrix cell's ring kind, "split" or "packed"
    event_idx: bool | None = None  # a matrix cell's EVENT_IDX setting

    def as_dict(self) -> dict:
        return asdict(self)


def _child(fn: Callable[[str], str], path: str, conn) -> None:
    try:
        conn.send((PASSED, fn(path), rx_seen.echoed()))
    except CaseNotOffered as e:
        conn.send((NOT_OFFERED, str(e), rx_seen.echoed()))
    except CaseSkipped as e:
        conn.send((SKIPPED, str(e), rx_seen.echoed()))
    except CaseFailure as e:
        conn.send((FAILED, str(e), rx_seen.echoed()))
    except BackendGone as e:
        conn.send(("gone", str(e), rx_seen.echoed()))
    except Exception as e:  # noqa: BLE001 -- a bug on our side must not pass a case
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        conn.send((FAILED, f"conform error: {type(e).__name__}: {e} ({tb})", rx_seen.echoed()))
    finally:
        conn.close()


def _isolated(fn: Callable[[str], str], path: str,
              timeout: float) -> tuple[str, str, bool | None]:  # fmt: skip
    """(status, text, echoed) of ``fn(path)`` in a child process killed after ``timeout``;
    ``echoed`` as ``RxSeen.echoed`` says (None when the child gave no answer)."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, path, child), daemon=True)
    proc.start()
    child.close()
    try:
        if parent.poll(timeout):
            try:
                return parent.recv()
            except EOFError:
                pass
        else:
            return FAILED, f"no end within {timeout:g}s (the back-end hangs on it)", None
        proc.join(1.0)
        return FAILED, f"conform's case process died (exit {proc.exitcode})", None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5.0)
        parent.close()


def _run_case(case: Case, path: str) -> str:
    ctx = Context(path, case.cell)
    try:
        return case.run(ctx)
    finally:
        ctx.close()


def liveness(path: str, timeout: float) -> tuple[str, str]:
    """("alive" | "gone" | "broken", text): can the back-end serve a normal session?

    Several attempts (a back-end may still be dropping the last front-end), all within
    ``timeout``: a hung back-end costs one timeout here, not ten.
    """
    last = ""
    deadline = time.monotonic() + timeout
    for _ in range(LIVENESS_ATTEMPTS):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        status, text, _echoed = _isolated(normal_session, path, left)
        if status == PASSED:
            return "alive", text
        if status == "gone":
            return "gone", text
        last = text
        time.sleep(LIVENESS_PAUSE)
    return "broken", last


def run_cases(cases: Sequence[Case], path: str, *, timeout: float = DEFAULT_TIMEOUT,
              progress: Callable[[Result], None] | None = None) -> list[Result]:  # fmt: skip
    results: list[Result] = []
    dead = ""
    for case in cases:
        if dead:
            result = Result(case.name, case.group, NOT_RUN, dead, rule=case.rule)
            _name_cell(result, case)
            results.append(result)
            if progress:
                progress(result)
            continue
        started = time.monotonic()
        status, detail, echoed = _run_case_isolated(case, path, timeout)
        if status not in (SKIPPED, NOT_OFFERED):
            alive, text = liveness(path, timeout)
            if alive == "gone":
                status, detail = FAILED, f"the back-end died: {text} (case: {detail})"
                dead = f"the back-end died during {case.name}"
            elif alive == "broken":
                status = FAILED
                detail = f"afterwards the back-end did not serve a normal session: {text} " \
                         f"(case: {detail})"
        if status == PASSED and case.survive:
            status = SURVIVED
        result = Result(case.name, case.group, status, detail,
                        round(time.monotonic() - started, 3), case.rule, echoed)  # fmt: skip
        _name_cell(result, case)
        results.append(result)
        if progress:
            progress(result)
    return results


def _name_cell(result: Result, case: Case) -> None:
    result.case = case.family
    if case.cell is not None:
        result.ring, result.event_idx = case.cell.ring, case.cell.event_idx


def _run_case_isolated(case: Case, path: str, timeout: float) -> tuple[str, str, bool | None]:
    status, detail, echoed = _isolated(lambda p: _run_case(case, p), path, timeout)
    if status == "gone":
        return FAILED, detail, echoed
    return status, detail, echoed
