"""Persistent sessions: what a broker must remember about a client between connections.

3.1.1 keeps a session when CleanSession=0; 5.0 when the Session Expiry Interval is above 0,
and drops it once the interval has passed. Covered: subscriptions surviving a reconnect,
QoS 1/2 messages queued while offline, unacknowledged messages re-sent with DUP, and expiry.
"""

import time

from mqttutil import (PUBREC, PUBREL, V311, V5, ack_packet, publish_packet,
                      resend_qos2_with_dup)


def persistent(version, expiry=300):
    """raw() keyword arguments for a session that outlives its connection."""
    kw = {"clean": False}
    if version == V5:
        kw["props"] = {"session_expiry_interval": expiry}
    return kw


def fresh_persistent(raw, version, expiry=300):
    """A persistent session that starts empty (Clean Start 1 but kept after disconnect)."""
    kw = persistent(version, expiry)
    if version == V5:
        kw["clean"] = True  # Clean Start 1 + expiry: new session, still kept afterwards
    return raw(version, **kw)


def test_subscription_and_offline_messages_survive_reconnect(version, raw, topic):
    c = fresh_persistent(raw, version)
    cid = c.client_id
    c.subscribe(topic, 2)
    c.disconnect()
    pub = raw(version)
    # 3.1.1 [MQTT-3.1.2-5] (5.0 [MQTT-3.1.2-23] with 4.1): QoS 1 and 2 messages matching the
    # session's subscriptions are stored while the client is offline.
    pub.publish(topic, b"q1", qos=1)
    pub.publish(topic, b"q2", qos=2)
    c = raw(version, client_id=cid, **persistent(version))
    # [MQTT-3.1.2-4] (5.0 [MQTT-3.1.2-5]): the session is resumed.
    assert c.connack.session_present
    got = [(m.payload, m.qos) for m in (c.message(), c.message())]
    assert got == [(b"q1", 1), (b"q2", 2)]
    # The subscription itself survived: live messages arrive without re-subscribing.
    pub.publish(topic, b"live", qos=1)
    assert c.message().payload == b"live"
    raw(version, client_id=cid, clean=True).disconnect()


def test_clean_session_discards_stored_session(version, raw, topic):
    c = fresh_persistent(raw, version)
    c.subscribe(topic, 1)
    c.disconnect()
    raw(version).publish(topic, b"queued", qos=1)
    # [MQTT-3.1.2-6] (5.0 [MQTT-3.1.2-4]): Clean Session / Clean Start 1 discards the session:
    # no subscription, no queued message.
    c = raw(version, client_id=c.client_id, clean=True)
    assert not c.connack.session_present
    c.no_message()
    raw(version).publish(topic, b"live", qos=1)
    c.no_message()


def test_unacknowledged_qos1_resent_with_dup(version, raw, topic):
    c = fresh_persistent(raw, version)
    c.subscribe(topic, 1)
    raw(version).publish(topic, b"unacked", qos=1)
    first = c.message(ack=False)
    c.close()
    c = raw(version, client_id=c.client_id, **persistent(version))
    # [MQTT-4.4.0-1]: on reconnect with a session the Server MUST re-send unacknowledged
    # PUBLISH packets with their original Packet Identifiers, DUP set [MQTT-3.3.1-1].
    again = c.message()
    assert (again.payload, again.pid, again.dup) == (b"unacked", first.pid, True)
    c.no_message()
    raw(version, client_id=c.client_id, clean=True).disconnect()


def test_unfinished_qos2_flow_resumed_with_pubrel(version, raw, topic):
    c = fresh_persistent(raw, version)
    c.subscribe(topic, 2)
    raw(version).publish(topic, b"qos2", qos=2)
    m = c.message(ack=False)
    c.send(ack_packet(PUBREC, m.pid, version))
    rel = c.expect(PUBREL)
    c.close()  # PUBREL never answered with PUBCOMP
    c = raw(version, client_id=c.client_id, **persistent(version))
    # [MQTT-4.4.0-1]: unacknowledged PUBREL packets are re-sent; the message itself is not
    # delivered again (it was already received once, 4.3.3).
    p = c.recv()
    assert (p.type, p.pid) == (PUBREL, rel.pid), p
    c.no_message()
    raw(version, client_id=c.client_id, clean=True).disconnect()


def test_qos0_subscription_survives_but_offline_qos0_optional(version, raw, topic):
    # 3.1.1 3.1.2.4: QoS 0 messages MAY be stored for an offline session; either way the
    # subscription survives and live QoS 0 messages flow after reconnect.
    c = fresh_persistent(raw, version)
    c.subscribe(topic, 0)
    c.disconnect()
    c = raw(version, client_id=c.client_id, **persistent(version))
    raw(version).publish(topic, b"live0", qos=0)
    assert c.message().payload == b"live0"
    raw(version, client_id=c.client_id, clean=True).disconnect()


def test_session_expiry_drops_session_v5(raw, topic):
    c = fresh_persistent(raw, V5, expiry=1)
    c.subscribe(topic, 1)
    c.disconnect()
    # [MQTT-3.1.2-23]: the session is kept only for the Session Expiry Interval (1 s).
    # Expiry is time-based, so this test has to let the interval pass.
    time.sleep(2.5)
    raw(V5).publish(topic, b"after-expiry", qos=1)
    c = raw(V5, client_id=c.client_id, clean=False, props={"session_expiry_interval": 1})
    assert not c.connack.session_present, c.connack
    c.no_message()


def test_session_kept_within_expiry_v5(raw, topic):
    c = fresh_persistent(raw, V5, expiry=10)
    c.subscribe(topic, 1)
    c.disconnect()
    raw(V5).publish(topic, b"queued", qos=1)
    c = raw(V5, client_id=c.client_id, clean=False, props={"session_expiry_interval": 0})
    assert c.connack.session_present
    assert c.message().payload == b"queued"


def test_disconnect_can_shorten_session_expiry_v5(raw, topic):
    # 3.14.2.2.2: the Session Expiry Interval can be changed in DISCONNECT (here to 0: the
    # session ends now).
    c = fresh_persistent(raw, V5, expiry=300)
    c.subscribe(topic, 1)
    c.disconnect(props={"session_expiry_interval": 0})
    c = raw(V5, client_id=c.client_id, clean=False)
    assert not c.connack.session_present


def test_persistent_session_v311_survives_takeover(raw, topic):
    # [MQTT-3.1.4-2] + [MQTT-3.1.2-4]: a takeover by the same ClientId with CleanSession=0
    # keeps the session state.
    c = raw(V311, clean=False)
    c.subscribe(topic, 1)
    c2 = raw(V311, client_id=c.client_id, clean=False)
    assert c2.connack.session_present
    raw(V311).publish(topic, b"x", qos=1)
    assert c2.message().payload == b"x"
    raw(V311, client_id=c.client_id, clean=True).disconnect()


def test_redelivery_keeps_original_order(version, raw, topic):
    # [MQTT-4.6.0-1]: unacknowledged PUBLISH packets are re-sent in the order in which the
    # originals were sent.
    c = fresh_persistent(raw, version)
    c.subscribe(topic, 1)
    pub = raw(version)
    for i in range(5):
        pub.publish(topic, str(i).encode(), 1)
    first = [c.message(ack=False) for _ in range(5)]
    c.close()
    c = raw(version, client_id=c.client_id, **persistent(version))
    again = [c.message() for _ in range(5)]
    assert [m.payload for m in again] == [m.payload for m in first] == [b"0", b"1", b"2", b"3",
                                                                         b"4"]
    assert all(m.dup for m in again), again
    raw(version, client_id=c.client_id, clean=True).disconnect()


def test_inbound_qos2_state_survives_reconnect(version, raw, topic):
    # 4.3.3 + [MQTT-4.4.0-1]: the Server keeps the QoS 2 state of a publisher's session; after
    # a reconnect the client's PUBREL completes the flow and the message is delivered once.
    sub = raw(version)
    sub.subscribe(topic, 2)
    pub = fresh_persistent(raw, version)
    pub.send(publish_packet(topic, b"exactly-once", 2, pid=11, version=version))
    assert pub.expect(PUBREC).pid == 11
    pub.close()
    pub = raw(version, client_id=pub.client_id, **persistent(version))
    assert pub.connack.session_present
    # A client that missed the PUBREC may also resend the PUBLISH with DUP first.
    resend_qos2_with_dup(pub, sub, topic, b"exactly-once", 11)
    raw(version, client_id=pub.client_id, clean=True).disconnect()


def test_unsubscribe_persists_in_session(version, raw, topic):
    # [MQTT-3.10.4-2] on a persistent session: the removal is part of the stored state.
    c = fresh_persistent(raw, version)
    c.subscribe(topic, 1)
    c.unsubscribe(topic)
    c.disconnect()
    raw(version).publish(topic, b"x", 1)
    c = raw(version, client_id=c.client_id, **persistent(version))
    assert c.connack.session_present
    c.no_message()
    raw(version, client_id=c.client_id, clean=True).disconnect()
