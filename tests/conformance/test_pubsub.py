"""Publish / subscribe routing: QoS 0/1/2 delivery, QoS downgrade, overlapping subscriptions,
topic wildcards and UNSUBSCRIBE.

This is the core promise of a broker; each test is run for MQTT 3.1.1 and 5.0.
"""

import pytest

from mqttutil import (PUBACK, PUBCOMP, PUBREC, PUBREL, V311, V5, ack_packet, publish_packet,
                      resend_qos2_with_dup, sub_options, subscribe_refused, unique)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_subscribe_roundtrip(version, qos, paho, topic):
    sub = paho(version)
    assert sub.subscribe(topic, qos) == [qos]  # SUBACK grants the requested QoS [MQTT-3.8.4-5]
    pub = paho(version)
    pub.publish(topic, b"hello", qos)
    m = sub.message()
    assert (m.topic, m.payload, m.qos, m.retain) == (topic, b"hello", qos, False)
    sub.no_message()  # exactly one copy


@pytest.mark.parametrize("sub_qos,pub_qos", [(0, 1), (0, 2), (1, 2)])
def test_qos_downgraded_to_subscription(version, sub_qos, pub_qos, raw, topic):
    # [MQTT-3.8.4-6] (5.0: [MQTT-3.8.4-8]): delivered QoS = min(published QoS, granted QoS).
    sub = raw(version)
    assert sub.subscribe(topic, sub_qos).codes == [sub_qos]
    raw(version).publish(topic, b"x", pub_qos)
    m = sub.message()
    assert m.qos == sub_qos, m


@pytest.mark.parametrize("pub_qos,sub_qos", [(0, 2), (1, 2)])
def test_qos_never_upgraded(version, pub_qos, sub_qos, raw, topic):
    # Same rule from the other side: a QoS 0/1 publication is not upgraded [MQTT-3.8.4-6].
    sub = raw(version)
    sub.subscribe(topic, sub_qos)
    raw(version).publish(topic, b"x", pub_qos)
    assert sub.message().qos == pub_qos


@pytest.mark.xfail_mosquitto("for 3.1.1 clients sends one copy at the QoS of whichever "
                             "subscription it finds first, not the maximum [MQTT-3.3.5-1]",
                             only=V311)
def test_overlapping_subscriptions_deliver_max_qos(version, raw, topic):
    # [MQTT-3.3.5-1] (5.0: [MQTT-3.3.4-2]): with overlapping subscriptions the Server MUST
    # deliver respecting the maximum QoS of all matching subscriptions. It may send one copy
    # or one per subscription; at least one copy must carry the maximum QoS.
    sub = raw(version)
    sub.subscribe(f"{topic}/+", 0)
    sub.subscribe(f"{topic}/#", 2)
    raw(version).publish(f"{topic}/a", b"x", 2)
    copies = sub.burst()
    assert len(copies) <= 2, copies
    assert max(c.qos for c in copies) == 2, copies


def test_qos2_delivered_exactly_once_despite_duplicate_publish(version, raw, topic):
    # [MQTT-4.3.3-2] / 4.3.3: the receiver of a QoS 2 PUBLISH MUST NOT cause duplicate
    # onward delivery when the sender retransmits it (DUP=1) before PUBREL.
    sub = raw(version)
    sub.subscribe(topic, 2)
    pub = raw(version)
    pub.send(publish_packet(topic, b"once", 2, pid=7, version=version))
    assert pub.expect(PUBREC).pid == 7
    resend_qos2_with_dup(pub, sub, topic, b"once", 7)


def test_messages_on_one_topic_keep_their_order(version, raw, topic):
    # [MQTT-4.6.0-6]: by default every topic is an Ordered Topic; messages from one client
    # on one topic at one QoS arrive in the order they were published.
    sub = raw(version)
    sub.subscribe(topic, 1)
    pub = raw(version)
    for i in range(30):
        pub.publish(topic, str(i).encode(), 1)
    got = [int(sub.message().payload) for _ in range(30)]
    assert got == list(range(30))


# Filters relative to the test's own prefix T, and which of TOPICS each must match.
# Rules and examples: sections 4.7.1.2 ("sport/#" also matches "sport"), 4.7.1.3 ("+" matches
# exactly one level, an empty one included: "sport/+" matches "sport/") and 4.7.3 (topics are
# case sensitive; "/" separates levels, zero-length levels are allowed).
TOPICS = ["T", "T/", "T/a", "T/b", "T/A", "T/a/b", "T/a/b/c", "T/b/c", "T//c"]
WILDCARD_CASES = [
    ("T/a", {"T/a"}),
    ("T/+", {"T/", "T/a", "T/b", "T/A"}),
    ("T/#", set(TOPICS)),
    ("T/+/c", {"T/b/c", "T//c"}),
    ("T/a/#", {"T/a", "T/a/b", "T/a/b/c"}),
    ("T/+/+", {"T/a/b", "T/b/c", "T//c"}),
    ("T/+/#", {"T/", "T/a", "T/b", "T/A", "T/a/b", "T/a/b/c", "T/b/c", "T//c"}),
    ("+/a", {"T/a"}),
]


@pytest.mark.parametrize("filt,expected", WILDCARD_CASES, ids=[c[0] for c in WILDCARD_CASES])
def test_wildcard_matching(version, filt, expected, raw, topic):
    prefix = topic.replace("/", "_")  # one level, so "+/a" can be tested
    sub = raw(version)
    sub.subscribe(filt.replace("T", prefix, 1), 0)
    end = f"{prefix}-end"
    sub.subscribe(end, 0)
    pub = raw(version)
    for t in TOPICS:
        pub.publish(t.replace("T", prefix, 1), t.encode(), 1)
    pub.publish(end, b"", 1)
    got = set()
    while True:
        m = sub.message()
        if m.topic == end:
            break
        got.add(m.payload.decode())
    sub.no_message(0.3)
    assert got == expected


def test_dollar_topics_not_matched_by_leading_wildcards(version, raw, paho):
    # [MQTT-4.7.2-1]: the Server MUST NOT match Topic Filters starting with a wildcard (# or +)
    # with Topic Names beginning with "$".
    everything = paho(version)
    everything.subscribe("#", 0)
    plus = paho(version)
    plus.subscribe("+/conformance/+", 0)
    sys_sub = paho(version)
    sys_sub.subscribe("$SYS/#", 0)
    # A client may or may not be allowed to publish into $SYS; try, and fall back on the
    # broker's own $SYS topics if it has any.
    own = f"$SYS/conformance/{unique()}"
    try:
        raw(version).publish(own, b"x", 1)
    except Exception:
        pass
    try:
        sys_sub.message(timeout=3)
    except AssertionError:
        pytest.skip("no $SYS traffic at all: broker neither has $SYS topics nor routes them")
    sys_sub.drain(0.3)
    assert not [m.topic for m in everything.drain(0.3) if m.topic.startswith("$")]
    assert not [m.topic for m in plus.drain(0.1) if m.topic.startswith("$")]


def test_unsubscribe_stops_delivery(version, raw, topic):
    sub = raw(version)
    sub.subscribe(topic, 1)
    pub = raw(version)
    pub.publish(topic, b"before", 1)
    assert sub.message().payload == b"before"
    # [MQTT-3.10.4-4]: the Server MUST answer UNSUBSCRIBE with UNSUBACK (same packet id,
    # checked in RawClient.unsubscribe) [MQTT-3.10.4-5]; 5.0: reason 0x00 Success.
    ack = sub.unsubscribe(topic)
    if version == V5:
        assert ack.codes == [0], ack
    # [MQTT-3.10.4-2]: the Server MUST stop adding new messages for delivery.
    pub.publish(topic, b"after", 1)
    sub.no_message()


def test_unsubscribe_only_removes_exact_filter(version, raw, topic):
    # [MQTT-3.10.4-1]: UNSUBSCRIBE compares filters character by character; it does not
    # remove subscriptions that merely match.
    sub = raw(version)
    sub.subscribe(f"{topic}/#", 1)
    sub.unsubscribe(f"{topic}/a")
    raw(version).publish(f"{topic}/a", b"x", 1)
    assert sub.message().payload == b"x"


def test_resubscribe_replaces_subscription(version, raw, topic):
    # [MQTT-3.8.4-3]: a SUBSCRIBE with an existing filter replaces it (new QoS), and
    # messages are not duplicated.
    sub = raw(version)
    sub.subscribe(topic, 0)
    sub.subscribe(topic, 2)
    raw(version).publish(topic, b"x", 2)
    assert sub.message().qos == 2
    sub.no_message()


def test_subscribe_to_many_filters_in_one_packet(version, raw, topic):
    # [MQTT-3.8.4-4]: one SUBACK for a multi-filter SUBSCRIBE, a return code per filter, in
    # order [MQTT-3.9.3-1].
    sub = raw(version)
    opts = (lambda q: sub_options(q)) if version == V5 else (lambda q: q)
    ack = sub.subscribe_many([(f"{topic}/0", opts(0)), (f"{topic}/1", opts(1)),
                              (f"{topic}/2", opts(2))])
    assert ack.codes == [0, 1, 2]


@pytest.mark.parametrize("pub_version,sub_version", [(V311, V5), (V5, V311)],
                         ids=["v311-to-v5", "v5-to-v311"])
def test_messages_cross_protocol_versions(pub_version, sub_version, raw, topic):
    # One broker, two protocol versions: a message is a message (3.1.1 and 5.0 clients share
    # topics; 5.0-only properties are simply not representable for the 3.1.1 receiver).
    sub = raw(sub_version)
    sub.subscribe(topic, 2)
    raw(pub_version).publish(topic, b"x", 2)
    m = sub.message()
    assert (m.topic, m.payload, m.qos) == (topic, b"x", 2)


def test_large_payload(version, raw, topic):
    # A 256 KiB payload needs a 3-byte Remaining Length (2.2.3) and must arrive intact.
    sub = raw(version)
    sub.subscribe(topic, 1)
    body = bytes(range(256)) * 1024
    raw(version).publish(topic, body, 1)
    assert sub.message().payload == body


@pytest.mark.parametrize("bad_filter", ["a/#/b", "a#", "a/b+", "+a/b", ""])
def test_invalid_topic_filter_refused(version, bad_filter, raw, port, topic):
    # [MQTT-4.7.1-2]: "#" must be the last character and stand alone in its level;
    # [MQTT-4.7.1-3]: "+" must occupy a whole level; [MQTT-4.7.3-1]: filters are at least one
    # character long. The Server refuses the filter: SUBACK 0x80 (3.1.1) / 0x8F Topic Filter
    # invalid (5.0), or closes the connection as for a protocol violation.
    ack = subscribe_refused(raw(version), bad_filter)
    if ack is not None and version == V5:
        assert ack.codes[0] == 0x8F, ack


def test_pubrel_for_unknown_packet_id_answered_with_pubcomp(version, raw):
    # Section 4.3.3: the receiver MUST respond to a PUBREL with a PUBCOMP carrying the same
    # Packet Identifier. 5.0 (3.7.2.1): reason 0x92 Packet Identifier not found is the precise
    # answer; 0x00 is tolerated.
    c = raw(version)
    c.send(ack_packet(PUBREL, 4242, version))
    comp = c.expect(PUBCOMP)
    assert comp.pid == 4242
    if version == V5:
        assert comp.reason in (0x00, 0x92), comp
    c.ping()


def test_qos2_packet_id_reusable_after_pubcomp(version, raw, topic):
    # [MQTT-2.2.1-3] / 4.3.3: once PUBCOMP is sent the Packet Identifier is free; the next
    # PUBLISH with it is a new Application Message and is delivered again.
    sub = raw(version)
    sub.subscribe(topic, 2)
    pub = raw(version)
    for payload in (b"first", b"second"):
        pub.send(publish_packet(topic, payload, 2, pid=9, version=version))
        assert pub.expect(PUBREC).pid == 9
        pub.send(ack_packet(PUBREL, 9, version))
        assert pub.expect(PUBCOMP).pid == 9
    assert [sub.message().payload, sub.message().payload] == [b"first", b"second"]


def test_qos1_publish_acknowledged(version, raw, topic):
    # Section 4.3.2: the receiver MUST respond with a PUBACK carrying the PUBLISH's Packet
    # Identifier - also when nobody subscribed.
    c = raw(version)
    c.send(publish_packet(f"{topic}/nobody", b"x", 1, pid=77, version=version))
    assert c.expect(PUBACK).pid == 77


def test_fan_out_to_many_subscribers(version, raw, topic):
    # [MQTT-4.5.0-1]: the Server MUST add an incoming Application Message to the Session State
    # of every client with a matching subscription.
    subs = [raw(version) for _ in range(40)]
    for s in subs:
        s.subscribe(topic, 1)
    raw(version).publish(topic, b"fan", 1)
    for s in subs:
        assert s.message().payload == b"fan"


@pytest.mark.parametrize("leaf", ["café/☃/日本", "with space", "x" * 60000],
                         ids=["unicode", "space", "60000-chars"])
def test_unusual_but_valid_topic_names(version, leaf, raw, topic):
    # 1.5.3 (5.0 1.5.4) and 4.7.3: any UTF-8 except U+0000, up to 65,535 bytes, is a valid
    # Topic Name; spaces are allowed.
    name = f"{topic}/{leaf}"
    sub = raw(version)
    sub.subscribe(name, 1)
    raw(version).publish(name, b"x", 1)
    assert sub.message().topic == name


def test_inflight_packet_ids_are_distinct(version, raw, topic):
    # [MQTT-2.2.1-3]: each new QoS > 0 PUBLISH gets a currently unused, non-zero Packet
    # Identifier - so unacknowledged messages never share one.
    props = {"receive_maximum": 20} if version == V5 else None
    sub = raw(version, props=props)
    sub.subscribe(topic, 1)
    pub = raw(version)
    for i in range(10):
        pub.publish(topic, str(i).encode(), 1)
    pids = [sub.message(ack=False).pid for _ in range(10)]
    assert 0 not in pids and len(set(pids)) == 10, pids
