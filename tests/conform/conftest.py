"""The vhost_user tests' device fixtures, for the conform tests."""

from tests.vhost_user.conftest import device_factory  # noqa: F401 -- a fixture
