"""MQTT 5.0 features with no 3.1.1 counterpart: flow control (Receive Maximum), topic aliases,
subscription identifiers, No Local, message expiry, request/response and user properties
passed through, shared subscriptions and Request Problem Information.
"""

import time

import pytest

from mqttutil import (DISCONNECT, PUBACK, PUBCOMP, PUBREC, PUBREL, SUBACK, V5,
                      ack_packet, assert_props, delayed_will, publish_packet, sub_options,
                      subscribe_packet, subscribe_refused, unique)


@pytest.mark.xfail_mosquitto("respects Receive Maximum 2 at first, but after one PUBACK sends "
                             "two queued messages: 3 unacknowledged in flight [MQTT-3.3.4-9]")
def test_receive_maximum_limits_inflight(raw, topic):
    # [MQTT-3.3.4-9]: the Server MUST NOT send more than Receive Maximum QoS 1/2 PUBLISH
    # packets that the client has not yet acknowledged.
    sub = raw(V5, props={"receive_maximum": 2})
    sub.subscribe(topic, 1)
    pub = raw(V5)
    for i in range(5):
        pub.publish(topic, str(i).encode(), qos=1)
    inflight = [sub.message(ack=False), sub.message(ack=False)]
    sub.no_message()  # a third would exceed Receive Maximum
    received = [int(m.payload) for m in inflight]
    # Each acknowledgement frees exactly one slot.
    while inflight:
        sub.ack(inflight.pop(0))
        if len(received) < 5:
            m = sub.message(ack=False)
            received.append(int(m.payload))
            inflight.append(m)
            if len(inflight) == 2:
                sub.no_message(0.3)
    assert received == [0, 1, 2, 3, 4]


def test_topic_alias_from_client(raw, topic):
    sub = raw(V5)
    sub.subscribe(topic, 1)
    pub = raw(V5)
    maximum = pub.connack.props.get("topic_alias_maximum", 0)
    if maximum < 1:
        pytest.skip("broker accepts no topic aliases (Topic Alias Maximum 0) [MQTT-3.2.2-17]")
    # 3.3.2.3.4: a PUBLISH with a topic name and alias 1 sets the mapping; a later PUBLISH with
    # an empty topic name and alias 1 uses it. Subscribers see the real topic name.
    pub.send(publish_packet(topic, b"first", 1, pid=1, props={"topic_alias": 1}))
    pub.expect(PUBACK)
    pub.send(publish_packet("", b"second", 1, pid=2, props={"topic_alias": 1}))
    pub.expect(PUBACK)
    for payload in (b"first", b"second"):
        m = sub.message()
        assert (m.topic, m.payload) == (topic, payload)
        # The client announced no Topic Alias Maximum (= 0): the Server MUST NOT send it
        # aliases [MQTT-3.1.2-27].
        assert "topic_alias" not in m.props


def test_topic_alias_above_maximum_is_protocol_error(raw, port, topic):
    pub = raw(V5)
    maximum = pub.connack.props.get("topic_alias_maximum", 0)
    # [MQTT-3.3.2-9]/[MQTT-3.2.2-17]: an alias greater than Topic Alias Maximum is a Protocol
    # Error: DISCONNECT 0x94 (Topic Alias invalid) and close.
    pub.send(publish_packet(topic, b"x", 0, props={"topic_alias": maximum + 1}))
    seen = pub.wait_closed()
    assert all(p.reason == 0x94 for p in seen), seen


def test_subscription_identifiers(raw, topic):
    sub = raw(V5)
    if not sub.connack.props.get("subscription_identifier_available", 1):
        pytest.skip("broker does not support subscription identifiers")
    sub.subscribe(f"{topic}/+", 1, props={"subscription_identifier": 7})
    sub.subscribe(f"{topic}/a", 1, props={"subscription_identifier": 300})
    sub.subscribe(f"{topic}/#", 1)  # no identifier
    pub = raw(V5)
    # [MQTT-3.3.4-3]: the Subscription Identifiers of all matching subscriptions are sent with
    # the message; one copy carries all of them [MQTT-3.3.4-4], several copies carry one
    # each [MQTT-3.3.4-5].
    pub.publish(f"{topic}/a", b"x", 1)
    copies = sub.burst()
    ids = sorted(i for c in copies for i in c.props.get("subscription_identifier", []))
    assert ids == [7, 300], copies
    pub.publish(f"{topic}/b/c", b"y", 1)  # only the identifier-less subscription matches
    m = sub.message()
    assert "subscription_identifier" not in m.props, m


def test_no_local(raw, topic):
    me = raw(V5)
    me.subscribe(topic, 1, no_local=True)
    other = raw(V5)
    other.subscribe(topic, 1)
    # [MQTT-3.8.3-3]: No Local 1 -> messages MUST NOT be forwarded to a connection with the
    # publisher's ClientID.
    me.publish(topic, b"mine", 1)
    assert other.message().payload == b"mine"
    me.no_message()
    other.publish(topic, b"theirs", 1)
    assert me.message().payload == b"theirs"


def test_message_expiry_interval(raw, topic):
    sub = raw(V5, clean=True, props={"session_expiry_interval": 60})
    sub.subscribe(topic, 1)
    cid = sub.client_id
    sub.disconnect()
    pub = raw(V5)
    pub.publish(topic, b"short", 1, props={"message_expiry_interval": 1})
    pub.publish(topic, b"long", 1, props={"message_expiry_interval": 60})
    sent_at = time.monotonic()
    time.sleep(2.2)  # let the short-lived message expire (time-based behaviour)
    sub = raw(V5, client_id=cid, clean=False, props={"session_expiry_interval": 0})
    # [MQTT-3.3.2-5]: an expired message not yet delivered MUST be deleted for that subscriber.
    m = sub.message()
    assert m.payload == b"long", m
    # [MQTT-3.3.2-6]: the forwarded Message Expiry Interval is the received value minus the
    # time the message waited in the Server.
    waited = time.monotonic() - sent_at
    remaining = m.props.get("message_expiry_interval")
    assert remaining is not None and remaining <= 60 - int(waited) + 1 and remaining < 60, m
    sub.no_message()


def test_request_response_properties_passed_through(raw, topic):
    sub = raw(V5)
    sub.subscribe(topic, 1)
    props = {"response_topic": f"{topic}/reply", "correlation_data": b"\x00\xffcorr",
             "content_type": "application/x-test", "payload_format_indicator": 1}
    raw(V5).publish(topic, b"req", 1, props=props)
    m = sub.message()
    # [MQTT-3.3.2-15] Response Topic and [MQTT-3.3.2-16] Correlation Data unaltered;
    # [MQTT-3.3.2-20] Content Type and [MQTT-3.3.2-4] Payload Format Indicator unaltered.
    assert_props(m, props)


def test_user_properties_passed_through_in_order(raw, topic):
    sub = raw(V5)
    sub.subscribe(topic, 1)
    pairs = [("b", "2"), ("a", "1"), ("a", "1"), ("a", "0"), ("ünï", "cødé")]
    raw(V5).publish(topic, b"x", 1, props={"user_property": pairs})
    # [MQTT-3.3.2-17]: all User Properties unaltered; [MQTT-3.3.2-18]: order maintained;
    # a name may appear more than once (3.3.2.3.7).
    assert sub.message().props.get("user_property") == pairs


def test_user_properties_passed_through_paho(paho, topic):
    # The same through an ordinary client library, as applications see it.
    sub = paho(V5)
    sub.subscribe(topic, 1)
    paho(V5).publish(topic, b"x", 1, props={"user_property": [("k", "v"), ("k", "w")]})
    m = sub.message()
    assert m.props.UserProperty == [("k", "v"), ("k", "w")]


def test_shared_subscription_delivers_each_message_once(raw, topic):
    members = [raw(V5), raw(V5)]
    if not members[0].connack.props.get("shared_subscription_available", 1):
        pytest.skip("broker does not support shared subscriptions")
    group = unique("g")
    for m in members:
        assert m.subscribe(f"$share/{group}/{topic}", 1).codes == [1]
    other_group = raw(V5)
    other_group.subscribe(f"$share/{unique('g')}/{topic}", 1)
    plain = raw(V5)
    plain.subscribe(topic, 1)
    n = 20
    pub = raw(V5)
    for i in range(n):
        pub.publish(topic, str(i).encode(), 1)
    # 4.8.2: each message goes to exactly one session of the group; every group and every
    # ordinary subscription gets its own copy.
    assert sorted(int(plain.message().payload) for _ in range(n)) == list(range(n))
    assert sorted(int(other_group.message().payload) for _ in range(n)) == list(range(n))
    per_member = [[], []]
    deadline = time.monotonic() + 5
    while sum(map(len, per_member)) < n and time.monotonic() < deadline:
        for i, m in enumerate(members):
            try:
                per_member[i].append(int(m.message(timeout=0.05).payload))
            except TimeoutError:
                pass
    for i, m in enumerate(members):
        try:
            per_member[i].append(int(m.message(timeout=0.3).payload))
        except TimeoutError:
            pass
    everything = sorted(per_member[0] + per_member[1])
    assert everything == list(range(n)), f"lost or duplicated: {per_member}"
    # Distribution is the broker's choice, but a group that always picks one member is
    # not sharing anything.
    assert per_member[0] and per_member[1], f"all messages went to one member: {per_member}"


def test_shared_subscription_member_leaving(raw, topic):
    # 4.8.2: once a member unsubscribes, the remaining members receive everything.
    a, b = raw(V5), raw(V5)
    group = unique("g")
    for m in (a, b):
        m.subscribe(f"$share/{group}/{topic}", 1)
    b.unsubscribe(f"$share/{group}/{topic}")
    pub = raw(V5)
    for i in range(5):
        pub.publish(topic, str(i).encode(), 1)
    assert [int(a.message().payload) for _ in range(5)] == list(range(5))
    b.no_message(0.3)


@pytest.mark.xfail_mosquitto("grants a shared subscription with No Local 1 [MQTT-3.8.3-4]")
def test_shared_subscription_with_no_local_is_protocol_error(raw):
    # [MQTT-3.8.3-4]: No Local 1 on a Shared Subscription is a Protocol Error.
    c = raw(V5)
    pid = c.next_pid()
    c.send(subscribe_packet(pid, [(f"$share/{unique('g')}/x", sub_options(1, no_local=True))]))
    seen = c.wait_closed()
    assert all(p.reason in (0x81, 0x82) for p in seen if p.type == DISCONNECT), seen
    assert not any(p.type == SUBACK and p.codes[0] < 0x80 for p in seen), seen


def test_request_problem_information_zero(raw, topic):
    # [MQTT-3.1.2-29]: with Request Problem Information 0 the Server MUST NOT send a Reason
    # String or User Properties on any packet other than PUBLISH, CONNACK or DISCONNECT.
    c = raw(V5, props={"request_problem_information": 0})
    acks = [c.unsubscribe(f"{topic}/never-subscribed"),  # UNSUBACK 0x11 No subscription
            c.subscribe(f"{topic}/a", 2),
            c.publish(f"{topic}/nobody", b"x", 1),        # PUBACK, maybe 0x10 No subscribers
            c.publish(f"{topic}/nobody", b"x", 2)]        # PUBCOMP
    for ack in acks:
        assert "reason_string" not in ack.props and "user_property" not in ack.props, ack


def test_puback_no_matching_subscribers_reason(raw, topic):
    # 3.4.2.1: PUBACK 0x00 Success or 0x10 No matching subscribers are both valid answers to a
    # publication nobody subscribed to - but not an error code.
    ack = raw(V5).publish(f"{topic}/nobody", b"x", 1)
    assert ack.reason in (0x00, 0x10), ack


def test_server_keep_alive_and_limits_are_sane(raw):
    # 3.2.2.3: whatever the broker advertises must allow this suite's ordinary traffic.
    props = raw(V5).connack.props
    assert props.get("maximum_qos", 2) == 2, props
    assert props.get("receive_maximum", 65535) >= 1, props
    assert props.get("maximum_packet_size", 1 << 28) >= 1024, props


def test_client_maximum_packet_size_respected(raw, topic):
    # [MQTT-3.1.2-24]: the Server MUST NOT send packets larger than the client's Maximum
    # Packet Size; [MQTT-3.1.2-25]: it discards such a message and carries on as if it had
    # been sent - the connection stays up and later messages flow.
    sub = raw(V5, props={"maximum_packet_size": 200})
    sub.subscribe(topic, 1)
    pub = raw(V5)
    pub.publish(topic, b"x" * 500, 1)
    pub.publish(topic, b"small", 1)
    m = sub.message()
    assert m.payload == b"small", m
    sub.no_message()
    sub.ping()


def two_qos2_with_receive_maximum_1(raw, topic):
    """A subscriber with Receive Maximum 1 that was sent two QoS 2 messages: returns it and the
    first message, received but not yet acknowledged (so the second must wait)."""
    sub = raw(V5, props={"receive_maximum": 1})
    sub.subscribe(topic, 2)
    pub = raw(V5)
    pub.publish(topic, b"1", 2)
    pub.publish(topic, b"2", 2)
    return sub, sub.message(ack=False)


def test_receive_maximum_counts_qos2_until_pubcomp(raw, topic):
    # [MQTT-3.3.4-9]: a QoS 2 PUBLISH stays "unacknowledged" until PUBCOMP (a PUBREC below
    # 0x80 does not free the slot).
    sub, first = two_qos2_with_receive_maximum_1(raw, topic)
    sub.send(ack_packet(PUBREC, first.pid))
    rel = sub.expect(PUBREL)
    sub.no_message()  # still in flight: PUBCOMP not sent yet
    sub.send(ack_packet(PUBCOMP, rel.pid))
    assert sub.message().payload == b"2"


def test_receive_maximum_applies_to_queued_messages_on_reconnect(raw, topic):
    # [MQTT-3.3.4-9] also bounds the burst of messages queued while the client was offline.
    sub = raw(V5, props={"session_expiry_interval": 60})
    sub.subscribe(topic, 1)
    sub.disconnect()
    pub = raw(V5)
    for i in range(6):
        pub.publish(topic, str(i).encode(), 1)
    sub = raw(V5, client_id=sub.client_id, clean=False,
              props={"session_expiry_interval": 0, "receive_maximum": 2})
    assert sub.connack.session_present
    inflight = [sub.message(ack=False), sub.message(ack=False)]
    sub.no_message()
    for m in inflight:
        sub.ack(m)
    rest = [int(sub.message().payload) for _ in range(4)]
    assert [int(m.payload) for m in inflight] + rest == list(range(6))


def test_server_topic_aliases_stay_within_client_maximum(raw, topic):
    # [MQTT-3.1.2-26]: the Server MUST NOT send a Topic Alias greater than the client's Topic
    # Alias Maximum. Whatever aliases it chooses to use, every message must resolve to the
    # right topic (3.3.2.3.4).
    sub = raw(V5, props={"topic_alias_maximum": 2})
    sub.subscribe(f"{topic}/#", 1)
    pub = raw(V5)
    sent = [f"{topic}/{leaf}" for leaf in ("a", "b", "c", "a", "b", "c", "a")]
    for i, t in enumerate(sent):
        pub.publish(t, str(i).encode(), 1)
    aliases = {}
    for i, t in enumerate(sent):
        m = sub.message()
        alias = m.props.get("topic_alias")
        if alias is not None:
            assert 1 <= alias <= 2, m
            if m.topic:
                aliases[alias] = m.topic
            else:
                assert alias in aliases, f"alias {alias} used before it was set: {m}"
        resolved = m.topic or aliases[alias]
        assert (resolved, m.payload) == (t, str(i).encode()), m


def test_retained_message_keeps_properties(raw, topic):
    # A retained message replayed later is still the same Application Message: its User
    # Properties [MQTT-3.3.2-17], Content Type [MQTT-3.3.2-20], Response Topic
    # [MQTT-3.3.2-15] and Correlation Data [MQTT-3.3.2-16] go with it.
    props = {"user_property": [("k", "v")], "content_type": "text/plain",
             "response_topic": f"{topic}/r", "correlation_data": b"c"}
    raw(V5).publish(topic, b"r", 1, retain=True, props=props)
    sub = raw(V5)
    sub.subscribe(topic, 1)
    m = sub.message()
    assert m.retain
    assert_props(m, props)


def test_retained_message_expires(raw, topic):
    # [MQTT-3.3.2-5]: once the Message Expiry Interval has passed the retained copy is not
    # delivered (3.3.2.3.3: it is no longer retained).
    raw(V5).publish(topic, b"soon-gone", 1, retain=True, props={"message_expiry_interval": 1})
    time.sleep(2.2)  # time-based behaviour
    sub = raw(V5)
    sub.subscribe(topic, 1)
    sub.no_message()


def test_will_sent_at_session_end_before_will_delay(raw, topic):
    # 3.1.3.2.2: the Will is published when the Will Delay Interval passes or the Session
    # ends, whichever happens first: Session Expiry 1 s < Will Delay 30 s.
    sub, c = delayed_will(raw, topic, expiry=1, delay=30)
    c.close()
    assert sub.message(timeout=6).payload == b"gone"


def test_disconnect_cannot_turn_on_session_expiry(raw, topic):
    # [MQTT-3.14.2-2]: with Session Expiry 0 in CONNECT, a non-zero value in DISCONNECT is a
    # Protocol Error - the session must not be kept because of it.
    c = raw(V5)
    c.subscribe(topic, 1)
    c.disconnect(props={"session_expiry_interval": 300})
    again = raw(V5, client_id=c.client_id, clean=False)
    assert not again.connack.session_present, again.connack


@pytest.mark.parametrize("bad", [
    "$share/g+/t", "$share/g#/t",
    pytest.param("$share/g", marks=pytest.mark.xfail_mosquitto(
        "grants $share/<name> without a topic filter [MQTT-4.8.2-2]")),
    pytest.param("$share//t", marks=pytest.mark.xfail_mosquitto(
        "grants an empty ShareName [MQTT-4.8.2-1]"))])
def test_invalid_shared_subscription_refused(bad, raw):
    # [MQTT-4.8.2-1]: the ShareName is at least one character; [MQTT-4.8.2-2]: it contains
    # no "/", "+", "#" and is followed by "/" and a Topic Filter. Refused with SUBACK 0x8F
    # (or 0x80), or the connection is closed as for a Protocol Error.
    subscribe_refused(raw(V5), bad)


def test_shared_subscription_respects_member_qos(raw, topic):
    # [MQTT-4.8.2-3]: the Server MUST respect the granted QoS of the member's subscription.
    member = raw(V5)
    member.subscribe(f"$share/{unique('g')}/{topic}", 0)
    raw(V5).publish(topic, b"x", 2)
    assert member.message().qos == 0


@pytest.mark.xfail_mosquitto("answers the extra PUBLISH with PUBREC 0x97 (Quota exceeded) and "
                             "keeps the connection, instead of DISCONNECT 0x93 (3.3.4, 4.9)")
def test_client_exceeding_server_receive_maximum(raw, topic):
    # 3.3.4 and 4.9: a client MUST NOT exceed the Server's Receive Maximum [MQTT-3.3.4-7]; a
    # Server receiving more unacknowledged QoS 2 PUBLISHes than that "uses DISCONNECT with
    # Reason Code 0x93 (Receive Maximum exceeded)" (spec text without a statement id).
    # Here no PUBREL is ever sent, so every flow stays open.
    c = raw(V5)
    maximum = c.connack.props.get("receive_maximum", 65535)
    if maximum > 1000:
        pytest.skip(f"Server Receive Maximum {maximum} is too large to exhaust quickly")
    for pid in range(1, maximum + 1):
        c.send(publish_packet(f"{topic}/flood", b"x", 2, pid=pid))
        c.expect(PUBREC)
    c.send(publish_packet(f"{topic}/flood", b"x", 2, pid=maximum + 1))
    seen = c.wait_closed()
    disconnects = [p.reason for p in seen if p.type == DISCONNECT]
    assert disconnects in ([], [0x93]), seen
    assert not any(p.type == PUBREC and p.pid == maximum + 1 for p in seen), seen


def alias_max_or_skip(client):
    maximum = client.connack.props.get("topic_alias_maximum", 0)
    if maximum < 1:
        pytest.skip("broker accepts no topic aliases (Topic Alias Maximum 0)")
    return maximum


def test_topic_alias_can_be_remapped(raw, topic):
    # 3.3.2.3.4: a PUBLISH with a Topic Name and an existing alias replaces that mapping.
    sub = raw(V5)
    sub.subscribe(f"{topic}/#", 1)
    pub = raw(V5)
    alias_max_or_skip(pub)
    for t, payload, alias_topic in ((f"{topic}/a", b"1", f"{topic}/a"),
                                    ("", b"2", None),
                                    (f"{topic}/b", b"3", f"{topic}/b"),
                                    ("", b"4", None)):
        pub.send(publish_packet(t, payload, 1, pid=int(payload), props={"topic_alias": 1}))
        pub.expect(PUBACK)
    got = [(m.topic, m.payload) for m in (sub.message() for _ in range(4))]
    assert got == [(f"{topic}/a", b"1"), (f"{topic}/a", b"2"), (f"{topic}/b", b"3"),
                   (f"{topic}/b", b"4")]


def test_topic_alias_not_carried_to_new_connection(raw, port, topic):
    # [MQTT-3.3.2-7]: Topic Alias mappings do not survive the network connection; using an
    # unmapped alias with an empty Topic Name is a Protocol Error (3.3.2.3.4).
    first = raw(V5, props={"session_expiry_interval": 30})
    alias_max_or_skip(first)
    first.send(publish_packet(topic, b"x", 1, pid=1, props={"topic_alias": 1}))
    first.expect(PUBACK)
    first.disconnect()
    again = raw(V5, client_id=first.client_id, clean=False)
    again.send(publish_packet("", b"y", 1, pid=2, props={"topic_alias": 1}))
    seen = again.wait_closed()
    assert all(p.type == DISCONNECT and p.reason >= 0x80 for p in seen), seen
    raw(V5, client_id=first.client_id, clean=True).disconnect()


def test_session_expiry_taken_from_latest_connect(raw, topic):
    # 3.1.2.11.2: the Session Expiry Interval of the latest CONNECT applies: a session first
    # created with 300 s and resumed with 1 s is gone 1 s after that connection ends.
    c = raw(V5, props={"session_expiry_interval": 300})
    c.subscribe(topic, 1)
    c.disconnect()
    c = raw(V5, client_id=c.client_id, clean=False, props={"session_expiry_interval": 1})
    assert c.connack.session_present
    c.disconnect()
    time.sleep(2.5)  # time-based behaviour
    c = raw(V5, client_id=c.client_id, clean=False)
    assert not c.connack.session_present


def test_will_delay_cancelled_by_takeover(raw, topic):
    # [MQTT-3.1.3-9]: a new network connection to the session before the Will Delay Interval
    # has passed - here by taking the session over while the old connection is still open.
    sub, old = delayed_will(raw, topic, expiry=30, delay=2)
    new = raw(V5, client_id=old.client_id, clean=False, props={"session_expiry_interval": 30})
    old.wait_closed()
    sub.no_message(3.0)
    new.disconnect()


def test_unsuback_has_code_per_filter(raw, topic):
    # [MQTT-3.11.3-1]: one UNSUBACK reason code per Topic Filter, in order; 0x00 for an
    # existing subscription, 0x00 or 0x11 (No subscription existed) for the other.
    c = raw(V5)
    c.subscribe(f"{topic}/a", 1)
    ack = c.unsubscribe(f"{topic}/a", f"{topic}/never")
    assert len(ack.codes) == 2 and ack.codes[0] == 0x00 and ack.codes[1] in (0x00, 0x11), ack


def test_pubrec_error_code_ends_qos2_flow(raw, topic):
    # 4.3.3 / [MQTT-3.3.4-9]: a PUBREC with a Reason Code of 0x80 or greater ends the QoS 2
    # flow - no PUBREL follows - and frees the Receive Maximum slot.
    sub, first = two_qos2_with_receive_maximum_1(raw, topic)
    sub.send(ack_packet(PUBREC, first.pid, V5, reason=0x80))
    second = sub.message(ack=False)
    assert second.payload == b"2", second
    assert not any(p.type == PUBREL and p.pid == first.pid for p in sub.pending), sub.pending
