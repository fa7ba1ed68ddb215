"""Last Will and Testament: published when a client vanishes, never when it says goodbye,
and (5.0) only after the Will Delay Interval, unless the client comes back first.

An abnormal disconnect is simulated by closing the raw TCP socket without DISCONNECT.
"""

import time

from mqttutil import V5, QUIET, assert_props, delayed_will, packet, will


def test_will_sent_on_abnormal_disconnect(version, raw, topic):
    sub = raw(version)
    sub.subscribe(topic, 1)
    c = raw(version, will=will(topic))
    c.close()
    # [MQTT-3.1.2-8]: the Will Message MUST be published when the network connection is
    # closed without a DISCONNECT.
    m = sub.message()
    assert (m.topic, m.payload, m.qos) == (topic, b"gone", 1)


def test_will_sent_when_server_closes_for_protocol_error(version, raw, topic):
    # 3.1.2.5: a Server-closed connection because of a protocol error also publishes the Will
    # [MQTT-3.1.2-8]. Packet type 0 is reserved, so it is a protocol error.
    sub = raw(version)
    sub.subscribe(topic, 1)
    c = raw(version, will=will(topic))
    c.send(packet(0, 0, b""))
    c.wait_closed()
    assert sub.message().payload == b"gone"


def test_no_will_on_disconnect(version, raw, topic):
    sub = raw(version)
    sub.subscribe(topic, 1)
    c = raw(version, will=will(topic))
    # 3.1.1 [MQTT-3.1.2-10] (5.0: DISCONNECT 0x00, [MQTT-3.1.2-10]): the Will is discarded.
    c.disconnect()
    sub.no_message()


def test_retained_will(version, raw, topic):
    # [MQTT-3.1.2-17]: Will Retain 1 -> the Will Message is published as a retained message.
    c = raw(version, will=will(topic, b"retained-will", retain=True))
    c.close()
    sub = raw(version)
    sub.subscribe(topic, 1)
    m = sub.message(timeout=5)
    assert (m.payload, m.retain) == (b"retained-will", True)


def test_disconnect_with_will_message_reason_v5(raw, topic):
    # 3.14.2.1: DISCONNECT with Reason Code 0x04 (Disconnect with Will Message) -> the Server
    # publishes the Will.
    sub = raw(V5)
    sub.subscribe(topic, 1)
    c = raw(V5, will=will(topic))
    c.disconnect(reason=0x04)
    assert sub.message().payload == b"gone"


def test_will_properties_forwarded_v5(raw, topic):
    # 3.1.3.2: the Will Properties are sent with the Will Message (content type, user
    # properties, response topic, correlation data) [MQTT-3.3.2-17].
    sub = raw(V5)
    sub.subscribe(topic, 1)
    props = {"content_type": "text/plain", "response_topic": f"{topic}/r",
             "correlation_data": b"\x01\x02", "user_property": [("k", "v")]}
    c = raw(V5, will=will(topic, props=props))
    c.close()
    m = sub.message()
    assert_props(m, props)


def test_will_delay_interval_v5(raw, topic):
    sub, c = delayed_will(raw, topic, expiry=30, delay=2)
    cid = c.client_id
    closed_at = time.monotonic()
    c.close()
    # 3.1.3.2.2 / [MQTT-3.1.2-8]: the Will is published when the Will Delay Interval has
    # passed (or the session ends, whichever is first) - not immediately.
    sub.no_message(1.2)
    m = sub.message(timeout=5)
    assert m.payload == b"gone"
    assert time.monotonic() - closed_at >= 1.8
    raw(V5, client_id=cid, clean=True).disconnect()  # end the leftover session


def test_will_delay_cancelled_by_reconnect_v5(raw, topic):
    sub, c = delayed_will(raw, topic, expiry=30, delay=2)
    c.close()
    # [MQTT-3.1.3-9]: a new network connection to this session before the Will Delay
    # Interval has passed -> the Server MUST NOT send the Will Message.
    again = raw(V5, client_id=c.client_id, clean=False, props={"session_expiry_interval": 30})
    assert again.connack.session_present
    sub.no_message(3.0)
    again.disconnect()
    sub.no_message(QUIET)
