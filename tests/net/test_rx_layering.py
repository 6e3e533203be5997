"""net/rx/ is the receive path over an RxQueue: it never names the driver, and ``num``
(the seed's vi->num, buffers posted and not yet returned) has one owner."""

from __future__ import annotations

import ast
from pathlib import Path

import virtnet.net

NET = Path(virtnet.net.__file__).parent
RX = NET / "rx"
OWNER = RX / "queue.py"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def test_nothing_under_net_rx_imports_or_names_the_driver() -> None:
    files = sorted(RX.glob("*.py"))
    assert OWNER in files and len(files) >= 8
    for path in files:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "virtnet.net.driver", path.name
                assert "VirtnetDriver" not in {a.name for a in node.names}, path.name
            elif isinstance(node, ast.Import):
                assert "virtnet.net.driver" not in {a.name for a in node.names}, path.name
            elif isinstance(node, ast.Name):
                assert node.id != "VirtnetDriver", f"{path.name}:{node.lineno}"


def _writes_of_num(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(_tree(path)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        lines += [t.lineno for t in targets if isinstance(t, ast.Attribute) and t.attr == "num"]
    return lines


def test_num_is_written_by_the_rx_queue_alone() -> None:
    writers = {p.relative_to(NET).as_posix(): _writes_of_num(p) for p in NET.rglob("*.py")}
    assert writers["rx/queue.py"], "RxQueue counts the buffers it posts and takes back"
    assert {name: lines for name, lines in writers.items() if lines and
            name != "rx/queue.py"} == {}  # fmt: skip
