"""Transport feature bits (VIRTIO 1.2, 6) and the device status machine (2.1, 3.1.1)."""

from __future__ import annotations

import pytest

from virtnet.virtio.errors import FeatureError, VirtioError
from virtnet.virtio.features import (
    DeviceStatus,
    StatusMachine,
    VirtioF,
    bit,
    feature_names,
    has,
)

S = DeviceStatus
ACK, DRIVER, FEATURES_OK, DRIVER_OK = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK


# -- feature bits -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feature", "number"),
    [
        (VirtioF.NOTIFY_ON_EMPTY, 24),
        (VirtioF.ANY_LAYOUT, 27),
        (VirtioF.RING_INDIRECT_DESC, 28),
        (VirtioF.RING_EVENT_IDX, 29),
        (VirtioF.VERSION_1, 32),
        (VirtioF.ACCESS_PLATFORM, 33),
        (VirtioF.RING_PACKED, 34),
        (VirtioF.IN_ORDER, 35),
        (VirtioF.ORDER_PLATFORM, 36),
        (VirtioF.SR_IOV, 37),
        (VirtioF.NOTIFICATION_DATA, 38),
        (VirtioF.NOTIF_CONFIG_DATA, 39),
        (VirtioF.RING_RESET, 40),
    ],
)
def test_transport_bits_have_the_spec_numbers(feature, number):
    assert int(feature) == number
    assert bit(feature) == 1 << number


def test_has_and_bit_agree_above_bit_31():
    features = bit(VirtioF.VERSION_1) | bit(VirtioF.RING_EVENT_IDX)
    assert has(features, VirtioF.VERSION_1) and has(features, 29)
    assert not has(features, VirtioF.RING_PACKED)


def test_feature_names_name_known_bits_and_number_the_rest():
    features = bit(VirtioF.VERSION_1) | bit(VirtioF.RING_INDIRECT_DESC) | bit(50) | bit(0)
    assert feature_names(features, VirtioF) == [
        "bit0",
        "RING_INDIRECT_DESC",
        "VERSION_1",
        "bit50",
    ]
    assert feature_names(0, VirtioF) == []


# -- device status --------------------------------------------------------------------------------


def test_status_bits_have_the_spec_values():
    assert [int(s) for s in (ACK, DRIVER, DRIVER_OK, FEATURES_OK, S.NEEDS_RESET, S.FAILED)] == [
        1, 2, 4, 8, 64, 128,
    ]  # fmt: skip


def test_the_driver_walks_ack_driver_features_ok_driver_ok():
    sm = StatusMachine()
    assert sm.status == 0 and not sm.driver_ok
    sm.set(ACK)
    sm.set(ACK | DRIVER)
    sm.set(ACK | DRIVER | FEATURES_OK)
    assert not sm.driver_ok
    sm.set(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert sm.driver_ok
    sm.set(sm.status)  # writing the same status again is fine
    assert sm.driver_ok


def test_several_steps_may_be_set_in_one_write_if_in_order():
    sm = StatusMachine()
    sm.set(ACK | DRIVER)
    sm.set(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert sm.driver_ok


@pytest.mark.parametrize(
    ("before", "write", "match"),
    [
        (0, DRIVER, r"DRIVER set before \['ACKNOWLEDGE'\]"),
        (0, FEATURES_OK, r"FEATURES_OK set before \['ACKNOWLEDGE', 'DRIVER'\]"),
        (ACK, ACK | FEATURES_OK, r"FEATURES_OK set before \['DRIVER'\]"),
        (ACK | DRIVER, ACK | DRIVER | DRIVER_OK, r"DRIVER_OK set before \['FEATURES_OK'\]"),
        (0, DRIVER_OK, r"DRIVER_OK set before"),
    ],
    ids=["driver first", "features_ok first", "skips driver", "skips features_ok", "ok first"],
)
def test_a_step_out_of_order_is_refused(before, write, match):
    # 3.1.1: the driver MUST follow the initialization sequence in order.
    sm = StatusMachine()
    if before:
        sm.set(before)
    with pytest.raises(FeatureError, match=match) as e:
        sm.set(write)
    assert isinstance(e.value, VirtioError)
    assert sm.status == before  # a refused write changes nothing


def test_clearing_a_bit_is_refused_only_a_reset_clears():
    # 2.1.1: "The driver MUST NOT clear a device status bit."
    sm = StatusMachine()
    sm.set(ACK | DRIVER | FEATURES_OK)
    with pytest.raises(FeatureError, match="clears bits"):
        sm.set(ACK | DRIVER)
    assert sm.status == ACK | DRIVER | FEATURES_OK
    sm.set(0)
    assert sm.status == 0
    sm.set(ACK)


@pytest.mark.parametrize("at", [0, ACK, ACK | DRIVER, ACK | DRIVER | FEATURES_OK])
def test_failed_may_be_set_at_any_step_and_then_only_a_reset_follows(at):
    sm = StatusMachine()
    if at:
        sm.set(at)
    sm.set(at | S.FAILED)
    assert not sm.driver_ok
    sm.set(at | S.FAILED)  # idempotent
    with pytest.raises(FeatureError, match="FAILED is set"):
        sm.set(at | S.FAILED | DRIVER_OK | FEATURES_OK | DRIVER | ACK)
    sm.reset()
    assert sm.status == 0
    sm.set(ACK)


def test_needs_reset_comes_from_the_device_and_stops_driver_ok():
    sm = StatusMachine()
    sm.set(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    sm.device_needs_reset()
    assert sm.status & S.NEEDS_RESET
    assert not sm.driver_ok
    with pytest.raises(FeatureError, match="clears bits"):
        sm.set(ACK | DRIVER | FEATURES_OK | DRIVER_OK)  # dropping NEEDS_RESET
    sm.set(sm.status | S.FAILED)  # 3.1.1: the driver may give up
    sm.set(0)
    assert sm.status == 0 and not sm.driver_ok


@pytest.mark.parametrize("at", [0, ACK, ACK | DRIVER | FEATURES_OK | DRIVER_OK])
def test_the_driver_may_not_set_needs_reset(at):
    # 2.1: DEVICE_NEEDS_RESET is the device's to set.
    sm = StatusMachine()
    if at:
        sm.set(at)
    with pytest.raises(FeatureError, match="NEEDS_RESET"):
        sm.set(at | S.NEEDS_RESET)
    assert sm.status == at


def test_a_status_write_with_unknown_bits_is_refused():
    sm = StatusMachine()
    with pytest.raises(FeatureError, match="unknown bits 0x30"):
        sm.set(ACK | 0x30)
    with pytest.raises(FeatureError, match="unknown bits 0x100"):
        sm.set(ACK | 0x100)
    assert sm.status == 0
