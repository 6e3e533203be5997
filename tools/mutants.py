"""Plant one-line mutants in a copy of the tree; see whether the unit files notice.

    nice -n 19 .venv/bin/python tools/mutants.py                  # all, a table at the end
    nice -n 19 .venv/bin/python tools/mutants.py --only split-used-jump-x2 --tests tests/fuzz
    .venv/bin/python tools/mutants.py --list

The tree (tracked and untracked files git does not ignore) is copied once to a temporary
directory. Each mutant is one edit of one file there: an exact string, or a regular
expression for code that is still moving (``scope`` limits it to one class). The unit
files run against the copy in pure mode (``VIRTNET_PURE=1``, the copy first on
``PYTHONPATH``) with ``-x``, the short fuzz profile, and the file is restored.
``caught``: a test failed (the first one is named); ``missed``: every test passed;
``n/a``: the code the mutant targets is not in the tree as written (update the mutant,
or the change it anticipates has not landed). The worktree's files are never written.
Exit 1 if any mutant is missed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNIT = ("tests/virtio", "tests/fuzz", "tests/net", "tests/ports")
NET_FIRST = ("tests/net", "tests/virtio", "tests/fuzz", "tests/ports")  # -x: fail fast
SPLIT = "src/virtnet/virtio/ring/split.py"
PACKED = "src/virtnet/virtio/ring/packed.py"
RX = "src/virtnet/net/rx/base.py"  # the shared error paths
RX_SEED = "src/virtnet/net/rx/deferred.py"  # receive_mergeable
RX_XDP = "src/virtnet/net/rx/xdp.py"
SINK = "src/virtnet/ports/synthetic.py"
TIMEOUT = 1800  # seconds for one mutant's whole run; pytest-timeout names a hang sooner


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    why: str
    regex: bool = False
    scope: str | None = None  # a class whose body alone is searched
    tests: tuple[str, ...] = UNIT


MUTANTS = [
    # -- the set of issue 18's review ---------------------------------------------------------
    Mutant("split-used-jump-x2", SPLIT,
           "self.last_used_idx) & 0xFFFF\n        if n > self.num:",
           "self.last_used_idx) & 0xFFFF\n        if n > 2 * self.num:",
           "split driver: a used index up to 2 num ahead is read as entries"),
    Mutant("split-pop-burst-head-eq-num", SPLIT,
           "                if head >= num:\n                    raise DescriptorError",
           "                if head > num:\n                    raise DescriptorError",
           "split pop_burst: an avail entry naming head == num is walked"),
    Mutant("rx-num-buffers-limit+1", RX,
           "        if num_buf > out:",
           "        if num_buf > out + 1:",
           "rx: num_buffers one more than the buffers out is believed", tests=NET_FIRST),
    Mutant("rx-xdp-before-num-buffers", RX_XDP,
           "num_buf == 0 or num_buf > rx._bufs_out():",
           "num_buf == 0:",
           "rx XDP: the buffers are taken before num_buffers is checked", tests=NET_FIRST),
    Mutant("rx-mergeable-short-not-named", RX_SEED,
           "        rx._name_short(length)\n        rx.free_unused_buf(buf)\n        return",
           "        rx.free_unused_buf(buf)\n        return",
           "receive_mergeable: a short packet counted but not named (fault_short)",
           tests=NET_FIRST),
    # The sink's length check (the frame carries its own length since issue 18.4): the
    # test in FrameSink of the bytes received against the length the frame says.
    Mutant("sink-ignores-truncation", SINK,
           r"(?m)^(\s+)if (\w+ != length|len\(data\) != \w+):$",
           r"\1if False and (\2):",
           "FrameSink: a frame shorter or longer than it says counts as intact",
           regex=True, scope="FrameSink", tests=("tests/ports",)),
    # -- split ring -------------------------------------------------------------------------
    Mutant("split-avail-jump+1", SPLIT,
           "self.last_avail_idx) & 0xFFFF\n        if n > self.num:",
           "self.last_avail_idx) & 0xFFFF\n        if n > self.num + 1:",
           "split device: an avail index num + 1 ahead is walked"),
    Mutant("split-pop-burst-no-jump-check", SPLIT,
           "        if n > self.num:\n            self.avail_pending()",
           "        if n > 2 * self.num:\n            self.avail_pending()",
           "split pop_burst: an avail index jump walked as a burst"),
    Mutant("split-pop-head-eq-num", SPLIT,
           "        if head >= self.num:\n            raise DescriptorError",
           "        if head > self.num:\n            raise DescriptorError",
           "split pop: an avail entry naming head == num is walked"),
    Mutant("split-direct-len+16", SPLIT,
           "            if 0 <= off and off + length <= rsize:\n"
           "                seg = rbuf[off : off + length]\n            else:",
           "            if 0 <= off and off + length <= rsize + 16:\n"
           "                seg = rbuf[off : off + length]\n            else:",
           "split walk, one descriptor: a length 16 bytes past the region is sliced short"),
    Mutant("split-ttl+1", SPLIT,
           "        ttl = size  #",
           "        ttl = size + 1  #",
           "split walk: a loop walks one descriptor more than the table"),
    Mutant("split-next-eq-size", SPLIT,
           "            if i >= size:",
           "            if i > size:",
           "split walk: next == table size is followed"),
    Mutant("split-indirect-len-0", SPLIT,
           "                if length == 0 or length % DESC_SIZE:",
           "                if length % DESC_SIZE:",
           "split walk: a zero-length indirect table is taken"),
    Mutant("split-readable-after-writable", SPLIT,
           "                if chain.writable:",
           "                if chain.writable and False:",
           "split walk: device-readable after device-writable accepted (2.7.4.2)"),
    Mutant("split-get-bufs-len+1", SPLIT,
           "tokens[head] is None or length > in_len[head]:",
           "tokens[head] is None or length > in_len[head] + 1:",
           "split get_bufs: a used length one past the buffer is believed"),
    # -- packed ring ------------------------------------------------------------------------
    Mutant("packed-pop-burst-wrap", PACKED,
           "                self.avail_wrap ^= 1\n                bits32 ^= _AU32\n"
           "            inflight[bid] = 1",
           "                self.avail_wrap ^= 1\n"
           "            inflight[bid] = 1",
           "packed pop_burst: past the ring's end the wrap counter flips, its bits do not"),
    Mutant("packed-chain-wrap", PACKED,
           "                wrap ^= 1\n                want ^= _AU",
           "                wrap ^= 1",
           "packed walk: a chain across the ring's end expects the old lap's flags"),
    Mutant("packed-pop-id-eq-num", PACKED,
           "            if bid < num and not self._inflight[bid]:",
           "            if bid <= num and not self._inflight[bid]:",
           "packed pop fast path: buffer id == num taken"),
    Mutant("packed-walk-id-eq-num", PACKED,
           "            if bid >= num or self._inflight[bid]:\n"
           "                raise self._bad_id(bid, start, (i, wrap, -1, 1))",
           "            if bid > num or self._inflight[bid]:\n"
           "                raise self._bad_id(bid, start, (i, wrap, -1, 1))",
           "packed walk, one descriptor: buffer id == num taken"),
    Mutant("packed-used-lie-unseen", PACKED,
           "        if au == _used_bits(self.avail_wrap):",
           "        if au == _used_bits(self.avail_wrap) and False:",
           "packed device: AVAIL=USED of the lap not yet taken (a driver lie) read as empty"),
    Mutant("packed-indirect-in-chain", PACKED,
           "        if slots > 1:",
           "        if slots > 2:",
           "packed walk: INDIRECT as a chain's second descriptor"),
    Mutant("packed-indirect-len-0", PACKED,
           "        if length == 0 or length % DESC_SIZE:",
           "        if length % DESC_SIZE:",
           "packed walk: a zero-length indirect table is a chain of nothing"),
    Mutant("packed-get-buf-write-ignored", PACKED,
           "        length = word & _U32 if word & _WRITE else 0\n        if bid >= self.num",
           "        length = word & _U32\n        if bid >= self.num",
           "packed get_buf: a used length without WRITE counts (2.8.4)"),
    Mutant("packed-get-bufs-used-wrap", PACKED,
           "                bits32 ^= _AU32\n                self.used_wrap ^= 1",
           "                bits32 ^= _AU32",
           "packed get_bufs: past the ring's end the used wrap counter stays"),
    # -- rx ----------------------------------------------------------------------------------
    Mutant("rx-deferred-short-no-eth", RX_SEED,
           "    if length < hdr_len + ETH_HLEN:  # virtio_net.c receive_buf(): \"short packet\"",
           "    if length < hdr_len:  # virtio_net.c receive_buf(): \"short packet\"",
           "deferred: a frame shorter than an Ethernet header is not short", tests=NET_FIRST),
    Mutant("rx-num-buffers-0", RX,
           "        if num_buf == 0:",
           "        if num_buf < 0:",
           "rx: num_buffers 0 is not refused (5.1.6.4)", tests=NET_FIRST),
    Mutant("rx-bufs-out+1", RX,
           "        out = rq.num + length_hint(rq.burst) + 1",
           "        out = rq.num + length_hint(rq.burst) + 2",
           "rx: one buffer more than the driver has out may be named", tests=NET_FIRST),
]  # fmt: skip


def copy_tree(root: Path, dest: Path) -> None:
    """Tracked and untracked, not ignored, files of a checkout: what a commit would hold."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True,
    ).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, files):
        src = root / os.fsdecode(name)
        if src.is_file() and src.suffix != ".so":
            (dest / src.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / src.relative_to(root))


def mutate(text: str, m: Mutant) -> str | None:
    """The mutated text, or None when the mutant does not apply (not exactly once)."""
    lo, hi = 0, len(text)
    if m.scope is not None:
        start = re.search(rf"(?m)^class {m.scope}\b", text)
        if start is None:
            return None
        lo = start.start()
        end = re.search(r"(?m)^(class |def )", text[start.end() :])
        hi = start.end() + end.start() if end else len(text)
    body = text[lo:hi]
    if m.regex:
        new, n = re.subn(m.old, m.new, body, count=1)
    else:
        n = body.count(m.old)
        new = body.replace(m.old, m.new)
    return None if n != 1 else text[:lo] + new + text[hi:]


def env_for(tree: Path) -> dict[str, str]:
    env = dict(os.environ, VIRTNET_PURE="1", PYTHONPATH=f"{tree / 'src'}{os.pathsep}{tree}")
    env.pop("VIRTNET_FUZZ_EXAMPLES", None)  # the short profile
    return env


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=tree, env=env_for(tree), capture_output=True,
                           text=True, timeout=TIMEOUT)  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, "the whole run timed out"
    first = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", p.stdout, re.M)  # -ra's summary
    return p.returncode, first.group(1) if first else p.stdout.strip().splitlines()[-1:][0]


def check_imports(tree: Path) -> None:
    """The copy, not the editable install, is what the tests import."""
    out = subprocess.run([sys.executable, "-c", "import virtnet; print(virtnet.__file__)"],
                         cwd=tree, env=env_for(tree), capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"mutants: the tests would import {out}, not the copy in {tree}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", help="run this mutant (repeatable)")
    ap.add_argument("--tests", nargs="+", help="test paths instead of each mutant's own")
    ap.add_argument("--list", action="store_true", help="name every mutant and stop")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the checkout to copy (default: this one), e.g. a branch not merged")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.name:32} {m.path:34} {m.why}")
        return 0 if args.list else 2
    # SIGTERM unwinds like ^C: the copy is removed, the worktree was never touched.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("mutants: terminated"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="virtnet-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(args.root.resolve(), tree)
        check_imports(tree)
        if not args.no_baseline:
            tests = tuple(args.tests) if args.tests else UNIT
            rc, what = run_tests(tree, tests)
            if rc != 0:
                sys.exit(f"mutants: the unmutated tree fails ({what}): fix that first")
            print(f"baseline: {what}", flush=True)
        for m in chosen:
            path = tree / m.path
            original = path.read_text()
            text = mutate(original, m)
            if text is None:
                rows.append((m, "n/a", "pattern not in the tree", 0.0))
                print(f"{m.name}: n/a", flush=True)
                continue
            path.write_text(text)
            t0 = time.monotonic()
            try:
                rc, what = run_tests(tree, tuple(args.tests) if args.tests else m.tests)
            finally:
                path.write_text(original)
            verdict = {0: "missed", 1: "caught"}.get(rc, f"error (rc {rc})")
            rows.append((m, verdict, what, time.monotonic() - t0))
            print(f"{m.name}: {verdict} {what} ({rows[-1][3]:.0f} s)", flush=True)
    print("\n| mutant | what it plants | result | first failing test |\n|---|---|---|---|")
    for m, verdict, what, _s in rows:
        print(f"| `{m.name}` | {m.why} | {verdict} | {what if verdict == 'caught' else ''} |")
    return 1 if any(v == "missed" for _m, v, _w, _s in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
