"""The vhost-user sessions speak the protocol and hand rings, memory and eventfds to
where the pairs run; they load no data-plane module (issue 17)."""

from __future__ import annotations

import subprocess
import sys

DATA_PLANE_LOOPS = ("virtnet.net.device", "virtnet.net.driver", "virtnet.net.rx",
                    "virtnet.net.guest", "virtnet.vhost_user.device_loop",
                    "virtnet.vhost_user.driver_loop")  # fmt: skip


def loaded_by(module: str) -> list[str]:
    """The data-plane loop modules a fresh interpreter has loaded after importing ``module``."""
    code = (f"import sys, {module}; print(' '.join(m for m in sys.modules "
            f"if m.startswith({DATA_PLANE_LOOPS!r})))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return out.split()


def test_the_device_session_loads_no_data_plane_module():
    assert loaded_by("virtnet.vhost_user.backend") == []


def test_the_driver_session_loads_no_data_plane_module():
    assert loaded_by("virtnet.vhost_user.frontend") == []
