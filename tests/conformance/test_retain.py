"""Retained messages: stored per topic, replayed to new subscriptions, cleared by an empty
payload, plus the 5.0 subscription options Retain As Published and Retain Handling.

Retained state outlives the test that created it, so every test uses its own topic prefix.
"""

import pytest

from mqttutil import V311, V5


def test_retained_message_delivered_on_subscribe(version, raw, topic):
    pub = raw(version)
    pub.publish(topic, b"r1", qos=1, retain=True)
    sub = raw(version)
    sub.subscribe(topic, 1)
    # 3.1.1 [MQTT-3.3.1-5]/[MQTT-3.3.1-6]: stored and sent to the new subscription, with the
    # RETAIN flag set [MQTT-3.3.1-8]. 5.0: [MQTT-3.3.1-5], Retain Handling 0 [MQTT-3.3.1-9].
    m = sub.message()
    assert (m.topic, m.payload, m.retain, m.qos) == (topic, b"r1", True, 1)
    # A retained publication forwarded to an established subscription has RETAIN 0
    # (3.1.1 [MQTT-3.3.1-9]; 5.0 without Retain As Published [MQTT-3.3.1-12]).
    pub.publish(topic, b"r2", qos=1, retain=True)
    m = sub.message()
    assert (m.payload, m.retain) == (b"r2", False)


def assert_new_subscriber_gets_only(sub, topic, payload):
    """Subscribe ``sub`` to ``topic`` and assert the one retained message it gets is ``payload``."""
    sub.subscribe(topic, 1)
    assert sub.message().payload == payload
    sub.no_message()


def test_newer_retained_message_replaces_older(version, raw, topic):
    # [MQTT-3.3.1-5]: the new retained message replaces any existing one for the topic.
    pub = raw(version)
    pub.publish(topic, b"old", qos=1, retain=True)
    pub.publish(topic, b"new", qos=1, retain=True)
    assert_new_subscriber_gets_only(raw(version), topic, b"new")


def test_retained_delivery_is_capped_at_subscription_qos(version, raw, topic):
    # [MQTT-3.8.4-6] (5.0: [MQTT-3.8.4-8]) applies to replayed retained messages too.
    raw(version).publish(topic, b"r", qos=2, retain=True)
    sub = raw(version)
    sub.subscribe(topic, 1)
    m = sub.message()
    assert (m.qos, m.retain) == (1, True)


def test_empty_retained_payload_clears(version, raw, topic):
    pub = raw(version)
    pub.publish(topic, b"r1", qos=1, retain=True)
    # 3.1.1 [MQTT-3.3.1-10]/[MQTT-3.3.1-11] (5.0 [MQTT-3.3.1-6]/[MQTT-3.3.1-7]): a zero-byte
    # retained PUBLISH removes the retained message and is not stored itself.
    pub.publish(topic, b"", qos=1, retain=True)
    sub = raw(version)
    sub.subscribe(topic, 1)
    sub.no_message()


def test_empty_retained_payload_still_delivered_to_current_subscribers(version, raw, topic):
    # [MQTT-3.3.1-10]: the zero-byte retained message "is processed normally" - current
    # subscribers receive it.
    sub = raw(version)
    sub.subscribe(topic, 1)
    raw(version).publish(topic, b"", qos=1, retain=True)
    m = sub.message()
    assert m.payload == b"", m


def test_non_retained_publish_keeps_retained_message(version, raw, topic):
    # 3.1.1 [MQTT-3.3.1-12] (5.0 [MQTT-3.3.1-8]): RETAIN 0 -> the Server MUST NOT store the
    # message and MUST NOT remove or replace any existing retained message.
    pub = raw(version)
    pub.publish(topic, b"kept", qos=1, retain=True)
    pub.publish(topic, b"transient", qos=1, retain=False)
    assert_new_subscriber_gets_only(raw(version), topic, b"kept")


def test_retained_messages_matched_by_wildcard(version, raw, topic):
    pub = raw(version)
    for leaf in ("a", "b/c"):
        pub.publish(f"{topic}/{leaf}", leaf.encode(), qos=1, retain=True)
    sub = raw(version)
    sub.subscribe(f"{topic}/#", 1)
    got = {sub.message().topic for _ in range(2)}
    assert got == {f"{topic}/a", f"{topic}/b/c"}
    sub.no_message()


def test_resubscribe_sends_retained_again_v311(raw, topic):
    # [MQTT-3.8.4-3]: a repeated SUBSCRIBE replaces the subscription and the retained
    # messages matching it MUST be re-sent.
    raw(V311).publish(topic, b"r", qos=1, retain=True)
    sub = raw(V311)
    sub.subscribe(topic, 1)
    assert sub.message().retain
    sub.subscribe(topic, 1)
    m = sub.message()
    assert (m.payload, m.retain) == (b"r", True)


def test_retain_as_published_v5(raw, topic):
    plain = raw(V5)
    plain.subscribe(topic, 1, rap=False)
    rap = raw(V5)
    rap.subscribe(topic, 1, rap=True)
    raw(V5).publish(topic, b"x", qos=1, retain=True)
    # [MQTT-3.3.1-12]: Retain As Published 0 -> RETAIN forwarded as 0.
    assert plain.message().retain is False
    # [MQTT-3.3.1-13]: Retain As Published 1 -> RETAIN as it was published.
    assert rap.message().retain is True
    raw(V5).publish(topic, b"y", qos=1, retain=False)
    assert rap.message().retain is False


@pytest.mark.parametrize("handling,first,again", [(0, True, True), (1, True, False),
                                                  (2, False, False)])
def test_retain_handling_v5(handling, first, again, raw, topic):
    raw(V5).publish(topic, b"r", qos=1, retain=True)
    sub = raw(V5)
    # Retain Handling 0: send retained on every SUBSCRIBE [MQTT-3.3.1-9];
    # 1: only if the subscription did not exist yet [MQTT-3.3.1-10]; 2: never [MQTT-3.3.1-11].
    for expected in (first, again):
        sub.subscribe(topic, 1, retain_handling=handling)
        if expected:
            m = sub.message()
            assert (m.payload, m.retain) == (b"r", True)
        else:
            sub.no_message()


def test_retain_available_v5(raw):
    # 3.2.2.3.5: a Server that does not support retained messages says so in CONNACK; this
    # suite expects retained-message support (absent property = 1 = available).
    assert raw(V5).connack.props.get("retain_available", 1) == 1
