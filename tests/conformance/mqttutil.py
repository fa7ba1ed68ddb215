"""Client-side tools for the conformance suite.

Two ways to talk to the broker under test live here:

* ``RawClient`` speaks MQTT 3.1.1 / 5.0 byte by byte over a plain socket. It exists because
  the interesting questions (which packet did the broker send, did it close the socket, does
  it honour our Receive Maximum) are hidden by ordinary client libraries, and because bad input
  can only be sent by hand. It reads synchronously: every wait has an explicit deadline.
* ``PahoClient`` wraps paho-mqtt for the ordinary pub/sub cases, turning its callbacks into
  queues so a test can wait for "the next message" with a timeout instead of sleeping.

Nothing here knows which broker is being tested.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST = "127.0.0.1"

# How long a test waits for something that must happen, and how long it watches for
# something that must not happen (a negative can only be checked by waiting).
WAIT = 5.0
QUIET = 0.7

V31 = 3  # MQTT 3.1 (`MQIsdp`), for paho clients only
V311 = 4
V5 = 5

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = (
    8, 9, 10, 11, 12, 13, 14, 15)
PACKET_NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
                7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
                12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH"}


def unique(prefix: str = "c") -> str:
    """A client id / topic segment no other test uses (retained messages outlive tests)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            byte |= 0x80
        out.append(byte)
        if not n:
            return bytes(out)


def utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def binary(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


# MQTT 5.0 properties: id -> (name, type).
PROPS = {
    0x01: ("payload_format_indicator", "byte"),
    0x02: ("message_expiry_interval", "u32"),
    0x03: ("content_type", "utf8"),
    0x08: ("response_topic", "utf8"),
    0x09: ("correlation_data", "bin"),
    0x0B: ("subscription_identifier", "varint"),
    0x11: ("session_expiry_interval", "u32"),
    0x12: ("assigned_client_identifier", "utf8"),
    0x13: ("server_keep_alive", "u16"),
    0x15: ("authentication_method", "utf8"),
    0x16: ("authentication_data", "bin"),
    0x17: ("request_problem_information", "byte"),
    0x18: ("will_delay_interval", "u32"),
    0x19: ("request_response_information", "byte"),
    0x1A: ("response_information", "utf8"),
    0x1C: ("server_reference", "utf8"),
    0x1F: ("reason_string", "utf8"),
    0x21: ("receive_maximum", "u16"),
    0x22: ("topic_alias_maximum", "u16"),
    0x23: ("topic_alias", "u16"),
    0x24: ("maximum_qos", "byte"),
    0x25: ("retain_available", "byte"),
    0x26: ("user_property", "pair"),
    0x27: ("maximum_packet_size", "u32"),
    0x28: ("wildcard_subscription_available", "byte"),
    0x29: ("subscription_identifier_available", "byte"),
    0x2A: ("shared_subscription_available", "byte"),
}
PROP_IDS = {name: (pid, typ) for pid, (name, typ) in PROPS.items()}
# Properties that may appear more than once; decoded as lists.
MULTI = {"user_property", "subscription_identifier"}


def encode_props(props: dict[str, Any] | None) -> bytes:
    """Encode a property dict; list values (user_property pairs, ...) repeat the property."""
    body = bytearray()
    for name, value in (props or {}).items():
        pid, typ = PROP_IDS[name]
        values = value if isinstance(value, list) else [value]
        for v in values:
            body += varint(pid)
            if typ == "byte":
                body.append(v)
            elif typ == "u16":
                body += struct.pack("!H", v)
            elif typ == "u32":
                body += struct.pack("!I", v)
            elif typ == "varint":
                body += varint(v)
            elif typ == "utf8":
                body += utf8(v)
            elif typ == "bin":
                body += binary(v)
            elif typ == "pair":
                body += utf8(v[0]) + utf8(v[1])
    return varint(len(body)) + bytes(body)


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + varint(len(body)) + body


def will(topic: str, payload: bytes = b"gone", qos: int = 1, retain: bool = False,
         props: dict | None = None) -> dict[str, Any]:
    """The ``will`` argument of ``connect_packet`` (defaults: QoS 1, not retained)."""
    return {"topic": topic, "payload": payload, "qos": qos, "retain": retain, "props": props}


def delayed_will(raw, topic: str, expiry: int, delay: int) -> tuple[RawClient, RawClient]:
    """5.0: a subscriber to ``topic`` and a client with Session Expiry ``expiry`` s whose Will
    (b"gone", QoS 1, to ``topic``) has a Will Delay of ``delay`` s; ``raw`` is the fixture."""
    sub = raw(V5)
    sub.subscribe(topic, 1)
    c = raw(V5, props={"session_expiry_interval": expiry},
            will=will(topic, props={"will_delay_interval": delay}))
    return sub, c


def connect_packet(client_id: str, version: int = V5, clean: bool = True, keepalive: int = 60,
                   props: dict | None = None, will: dict | None = None,
                   username: str | None = None, password: bytes | None = None,
                   protocol_name: bytes = b"MQTT", reserved: bool = False) -> bytes:
    """CONNECT. ``will`` = {topic, payload, qos, retain, props}."""
    flags = 0x02 if clean else 0
    if reserved:
        flags |= 0x01
    if will:
        flags |= 0x04 | (will.get("qos", 0) << 3) | (0x20 if will.get("retain") else 0)
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = utf8(protocol_name) + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == V5:
        body += encode_props(props)
    body += utf8(client_id)
    if will:
        if version == V5:
            body += encode_props(will.get("props"))
        body += utf8(will["topic"]) + binary(will.get("payload", b""))
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += binary(password)
    return packet(CONNECT, 0, body)


def publish_packet(topic: str | bytes, payload: bytes = b"", qos: int = 0, retain: bool = False,
                   pid: int = 0, version: int = V5, props: dict | None = None,
                   dup: bool = False) -> bytes:
    flags = (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = utf8(topic)
    if qos:
        body += struct.pack("!H", pid)
    if version == V5:
        body += encode_props(props)
    return packet(PUBLISH, flags, body + payload)


def subscribe_packet(pid: int, filters: list[tuple[str, int]], version: int = V5,
                     props: dict | None = None) -> bytes:
    """``filters``: (topic filter, options byte); for 3.1.1 the options byte is the QoS."""
    body = struct.pack("!H", pid)
    if version == V5:
        body += encode_props(props)
    for topic, opts in filters:
        body += utf8(topic) + bytes([opts])
    return packet(SUBSCRIBE, 0x02, body)


def sub_options(qos: int = 0, no_local: bool = False, rap: bool = False,
                retain_handling: int = 0) -> int:
    """MQTT 5.0 subscription options byte (section 3.8.3.1)."""
    return qos | (0x04 if no_local else 0) | (0x08 if rap else 0) | (retain_handling << 4)


def ack_packet(ptype: int, pid: int, version: int = V5, reason: int = 0) -> bytes:
    flags = 0x02 if ptype == PUBREL else 0
    body = struct.pack("!H", pid)
    if version == V5 and reason:
        body += bytes([reason])
    return packet(ptype, flags, body)


def disconnect_packet(version: int = V5, reason: int = 0, props: dict | None = None) -> bytes:
    if version == V5 and (reason or props):
        return packet(DISCONNECT, 0, bytes([reason]) + encode_props(props))
    return packet(DISCONNECT, 0, b"")


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

@dataclass
class Packet:
    type: int
    flags: int
    body: bytes
    version: int
    # Decoded fields, filled according to type.
    topic: str = ""
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    pid: int = 0
    reason: int = 0
    session_present: bool = False
    codes: list[int] = field(default_factory=list)
    props: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return PACKET_NAMES.get(self.type, f"type{self.type}")

    def __repr__(self) -> str:
        extra = {"CONNACK": f"sp={self.session_present} rc=0x{self.reason:02x}",
                 "PUBLISH": f"topic={self.topic!r} qos={self.qos} retain={self.retain} "
                            f"pid={self.pid} payload={self.payload[:40]!r}",
                 "DISCONNECT": f"rc=0x{self.reason:02x}",
                 "SUBACK": f"codes={self.codes}"}.get(
                     self.name, f"pid={self.pid} rc=0x{self.reason:02x}")
        return f"<{self.name} {extra} props={self.props}>"


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        self.pos += 2
        return struct.unpack_from("!H", self.data, self.pos - 2)[0]

    def u32(self) -> int:
        self.pos += 4
        return struct.unpack_from("!I", self.data, self.pos - 4)[0]

    def bin(self) -> bytes:
        n = self.u16()
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def utf8(self) -> str:
        return self.bin().decode()

    def varint(self) -> int:
        mult, value = 1, 0
        while True:
            b = self.byte()
            value += (b & 0x7F) * mult
            if not b & 0x80:
                return value
            mult *= 128

    def props(self) -> dict[str, Any]:
        length = self.varint()
        end = self.pos + length
        out: dict[str, Any] = {}
        while self.pos < end:
            name, typ = PROPS[self.varint()]
            v = {"byte": self.byte, "u16": self.u16, "u32": self.u32, "varint": self.varint,
                 "utf8": self.utf8, "bin": self.bin,
                 "pair": lambda: (self.utf8(), self.utf8())}[typ]()
            if name in MULTI:
                out.setdefault(name, []).append(v)
            else:
                out[name] = v
        return out


def decode(first: int, body: bytes, version: int) -> Packet:
    p = Packet(type=first >> 4, flags=first & 0x0F, body=body, version=version)
    r = Reader(body)
    v5 = version == V5
    if p.type == CONNACK:
        p.session_present = bool(r.byte() & 1)
        p.reason = r.byte()
        if v5 and r.left():
            p.props = r.props()
    elif p.type == PUBLISH:
        p.qos = (p.flags >> 1) & 3
        p.retain = bool(p.flags & 1)
        p.dup = bool(p.flags & 8)
        p.topic = r.utf8()
        if p.qos:
            p.pid = r.u16()
        if v5:
            p.props = r.props()
        p.payload = body[r.pos:]
    elif p.type in (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK, SUBACK):
        p.pid = r.u16()
        if p.type in (SUBACK, UNSUBACK):
            if v5:
                p.props = r.props()
            p.codes = list(body[r.pos:])
        elif v5 and r.left():
            p.reason = r.byte()
            if r.left():
                p.props = r.props()
    elif p.type in (DISCONNECT, AUTH):
        if v5 and r.left():
            p.reason = r.byte()
            if r.left():
                p.props = r.props()
    return p


# --------------------------------------------------------------------------------------------
# Raw client
# --------------------------------------------------------------------------------------------

class Closed(Exception):
    """The broker closed the connection."""


class RawClient:
    """One MQTT connection driven by hand. Reads only when asked, with a deadline."""

    def __init__(self, port: int, version: int = V5, host: str = HOST, timeout: float = WAIT):
        self.version = version
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.closed = False
        self._pid = 0
        # Packets read while waiting for something else (e.g. a PUBLISH before our SUBACK).
        self.pending: list[Packet] = []

    # -- plumbing ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_pid(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError from None
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            chunk = b""
        if not chunk:
            self.closed = True
            raise Closed
        self.buf += chunk

    def _parse(self) -> Packet | None:
        if len(self.buf) < 2:
            return None
        mult, length, i = 1, 0, 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        if len(self.buf) < i + length:
            return None
        first, body = self.buf[0], self.buf[i:i + length]
        self.buf = self.buf[i + length:]
        return decode(first, body, self.version)

    def recv(self, timeout: float = WAIT) -> Packet:
        """Next packet; raises TimeoutError or Closed."""
        if self.pending:
            return self.pending.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            p = self._parse()
            if p is not None:
                return p
            self._fill(deadline)

    def expect(self, ptype: int, timeout: float = WAIT) -> Packet:
        """Next packet of ``ptype``; other packets read meanwhile are kept for later."""
        deadline = time.monotonic() + timeout
        for i, p in enumerate(self.pending):
            if p.type == ptype:
                return self.pending.pop(i)
        skipped = []
        try:
            while True:
                p = self._read_fresh(deadline)
                if p.type == ptype:
                    return p
                skipped.append(p)
        finally:
            self.pending.extend(skipped)

    def _read_fresh(self, deadline: float) -> Packet:
        while True:
            p = self._parse()
            if p is not None:
                return p
            self._fill(deadline)

    def wait_closed(self, timeout: float = WAIT) -> list[Packet]:
        """Read until the broker closes the connection; returns what it sent before.

        Raises AssertionError if the connection is still open after ``timeout``.
        """
        seen = list(self.pending)
        self.pending.clear()
        deadline = time.monotonic() + timeout
        try:
            while True:
                seen.append(self._read_fresh(deadline))
        except Closed:
            return seen
        except TimeoutError:
            raise AssertionError(
                f"broker kept the connection open for {timeout}s; it sent {seen}") from None

    def is_open_for(self, seconds: float) -> bool:
        """True if the broker did not close the connection within ``seconds``."""
        try:
            deadline = time.monotonic() + seconds
            while True:
                self.pending.append(self._read_fresh(deadline))
        except TimeoutError:
            return True
        except Closed:
            return False

    def close(self) -> None:
        """Drop the TCP connection without DISCONNECT (an abnormal disconnect)."""
        try:
            self.sock.close()
        except OSError:
            pass

    # -- MQTT operations -------------------------------------------------------------------

    def connect(self, client_id: str, clean: bool = True, keepalive: int = 60,
                props: dict | None = None, will: dict | None = None,
                expect_success: bool = True, **kw) -> Packet:
        self.send(connect_packet(client_id, self.version, clean, keepalive, props, will, **kw))
        ack = self.expect(CONNACK)
        if expect_success:
            assert ack.reason == 0, f"CONNECT refused: {ack}"
        return ack

    def subscribe(self, topic: str, qos: int = 0, props: dict | None = None,
                  **opts) -> Packet:
        options = sub_options(qos, **opts) if self.version == V5 else qos
        return self.subscribe_many([(topic, options)], props)

    def subscribe_many(self, filters: list[tuple[str, int]], props: dict | None = None) -> Packet:
        pid = self.next_pid()
        self.send(subscribe_packet(pid, filters, self.version, props))
        ack = self.expect(SUBACK)
        assert ack.pid == pid, ack
        return ack

    def unsubscribe(self, *topics: str) -> Packet:
        pid = self.next_pid()
        body = struct.pack("!H", pid)
        if self.version == V5:
            body += encode_props(None)
        for t in topics:
            body += utf8(t)
        self.send(packet(UNSUBSCRIBE, 0x02, body))
        ack = self.expect(UNSUBACK)
        assert ack.pid == pid, ack
        return ack

    def publish(self, topic: str | bytes, payload: bytes = b"", qos: int = 0,
                retain: bool = False, props: dict | None = None) -> Packet | None:
        """Publish and complete the QoS flow; returns the final ack (None for QoS 0)."""
        pid = self.next_pid() if qos else 0
        self.send(publish_packet(topic, payload, qos, retain, pid, self.version, props))
        if qos == 1:
            return self.expect(PUBACK)
        if qos == 2:
            rec = self.expect(PUBREC)
            if rec.reason >= 0x80:
                return rec
            self.send(ack_packet(PUBREL, pid, self.version))
            return self.expect(PUBCOMP)
        return None

    def ack(self, p: Packet) -> None:
        """Acknowledge a received PUBLISH (QoS 1: PUBACK; QoS 2: PUBREC ... PUBCOMP)."""
        if p.qos == 1:
            self.send(ack_packet(PUBACK, p.pid, self.version))
        elif p.qos == 2:
            self.send(ack_packet(PUBREC, p.pid, self.version))
            rel = self.expect(PUBREL)
            assert rel.pid == p.pid, rel
            self.send(ack_packet(PUBCOMP, p.pid, self.version))

    def message(self, timeout: float = WAIT, ack: bool = True) -> Packet:
        """Next PUBLISH from the broker, acknowledged unless ``ack`` is False."""
        p = self.expect(PUBLISH, timeout)
        if ack:
            self.ack(p)
        return p

    def burst(self, quiet: float = 0.5) -> list[Packet]:
        """The next PUBLISH and every further one until ``quiet`` passes without one (all acked)."""
        out = [self.message()]
        while True:
            try:
                out.append(self.message(timeout=quiet))
            except TimeoutError:
                return out

    def no_message(self, timeout: float = QUIET) -> None:
        """Assert no PUBLISH arrives within ``timeout``."""
        try:
            p = self.expect(PUBLISH, timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message {p}")

    def ping(self, timeout: float = WAIT) -> None:
        self.send(packet(PINGREQ, 0, b""))
        self.expect(PINGRESP, timeout)

    def disconnect(self, reason: int = 0, props: dict | None = None) -> None:
        """DISCONNECT, then wait until the broker has closed its side too.

        Waiting for the broker's close makes the next step of a test (reconnect with the same
        client id, publish to the now-offline session) happen after the broker has processed
        the DISCONNECT, not race with it.
        """
        try:
            self.send(disconnect_packet(self.version, reason, props))
            self.sock.shutdown(socket.SHUT_WR)
            self.is_open_for(WAIT)
        except OSError:
            pass
        self.close()


def subscribe_refused(c: RawClient, topic_filter: str) -> Packet | None:
    """Subscribe to a filter the Server must refuse: the SUBACK (asserted to carry a failure
    code), or None when the Server closed the connection instead."""
    try:
        ack = c.subscribe(topic_filter, 1)
    except Closed:
        return None
    assert ack.codes[0] >= 0x80, ack
    return ack


def resend_qos2_with_dup(pub: RawClient, sub: RawClient, topic: str, payload: bytes,
                         pid: int) -> None:
    """Resend a QoS 2 PUBLISH with DUP, finish its flow, and assert ``sub`` gets it once.

    The receiver of a retransmitted QoS 2 PUBLISH must not deliver it again [MQTT-4.3.3-2].
    """
    v = pub.version
    pub.send(publish_packet(topic, payload, 2, pid=pid, version=v, dup=True))
    assert pub.expect(PUBREC).pid == pid
    pub.send(ack_packet(PUBREL, pid, v))
    assert pub.expect(PUBCOMP).pid == pid
    assert sub.message().payload == payload
    sub.no_message()


def assert_props(m: Packet, props: dict[str, Any]) -> None:
    """Assert every property in ``props`` reached ``m`` unaltered."""
    for k, v in props.items():
        assert m.props.get(k) == v, (k, m.props)


def raw_connect(port: int, version: int = V5, client_id: str | None = None, **kw) -> RawClient:
    c = RawClient(port, version)
    c.client_id = client_id if client_id is not None else unique()
    c.connack = c.connect(c.client_id, **kw)
    return c


# --------------------------------------------------------------------------------------------
# paho-mqtt wrapper
# --------------------------------------------------------------------------------------------

@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: Any  # paho Properties or None


class PahoClient:
    """paho-mqtt with its callbacks turned into queues; every wait has a timeout."""

    def __init__(self, port: int, version: int = V5, client_id: str | None = None,
                 clean: bool = True, transport: str = "tcp"):
        self.version = version
        self.client_id = client_id if client_id is not None else unique()
        protocol = {V5: paho.MQTTv5, V31: paho.MQTTv31}.get(version, paho.MQTTv311)
        kwargs = dict(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
                      protocol=protocol, transport=transport, reconnect_on_failure=False)
        if version != V5:
            kwargs["clean_session"] = clean
        self.clean = clean
        self.port = port
        self.c = paho.Client(**kwargs)
        if transport == "websockets":
            self.c.ws_set_options(path="/mqtt")
        self.messages: queue.Queue[Message] = queue.Queue()
        self._connack: queue.Queue = queue.Queue()
        self.disconnected = threading.Event()
        self.disconnect_reason = None
        self._acks: dict[int, Any] = {}
        self._acks_cv = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_ack
        self.c.on_unsubscribe = self._on_ack

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self._connack.put((flags.session_present, reason_code, properties))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnect_reason = reason_code
        self.disconnected.set()

    def _on_message(self, client, userdata, msg):
        self.messages.put(Message(msg.topic, msg.payload, msg.qos, bool(msg.retain),
                                  getattr(msg, "properties", None)))

    def _on_ack(self, client, userdata, mid, reason_codes, properties):
        with self._acks_cv:
            self._acks[mid] = reason_codes
            self._acks_cv.notify_all()

    def _wait_ack(self, mid: int):
        with self._acks_cv:
            assert self._acks_cv.wait_for(lambda: mid in self._acks, WAIT), "no SUBACK/UNSUBACK"
            return self._acks.pop(mid)

    def connect(self, keepalive: int = 60, props: dict | None = None,
                clean_start: bool | None = None, will: dict | None = None):
        """Connect and wait for CONNACK; returns (session_present, reason_code, properties)."""
        if will:
            self.c.will_set(will["topic"], will.get("payload", b""), will.get("qos", 0),
                            will.get("retain", False), paho_props(PacketTypes.WILLMESSAGE,
                                                                   will.get("props")))
        kw = {}
        if self.version == V5:
            kw["clean_start"] = self.clean if clean_start is None else clean_start
            kw["properties"] = paho_props(PacketTypes.CONNECT, props)
        self.c.connect(HOST, self.port, keepalive, **kw)
        self.c.loop_start()
        try:
            session_present, rc, properties = self._connack.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError("no CONNACK") from None
        assert not rc.is_failure, f"connect refused: {rc}"
        return session_present, rc, properties

    def subscribe(self, topic: str, qos: int = 0, props: dict | None = None, **opts):
        """Subscribe and wait for the SUBACK; returns the list of reason codes."""
        if self.version == V5:
            from paho.mqtt.subscribeoptions import SubscribeOptions
            o = SubscribeOptions(qos=qos, noLocal=opts.get("no_local", False),
                                 retainAsPublished=opts.get("rap", False),
                                 retainHandling=opts.get("retain_handling", 0))
            rc, mid = self.c.subscribe(topic, options=o,
                                       properties=paho_props(PacketTypes.SUBSCRIBE, props))
        else:
            rc, mid = self.c.subscribe(topic, qos)
        assert rc == paho.MQTT_ERR_SUCCESS, rc
        return [int(code.value) if hasattr(code, "value") else int(code)
                for code in self._wait_ack(mid)]

    def unsubscribe(self, topic: str):
        rc, mid = self.c.unsubscribe(topic)
        assert rc == paho.MQTT_ERR_SUCCESS, rc
        return self._wait_ack(mid)

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
                props: dict | None = None) -> None:
        """Publish and, for QoS 1/2, wait until the flow with the broker is complete."""
        info = self.c.publish(topic, payload, qos, retain,
                              paho_props(PacketTypes.PUBLISH, props))
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"publish to {topic} not completed"

    def message(self, timeout: float = WAIT) -> Message:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: no message within {timeout}s") from None

    def no_message(self, timeout: float = QUIET) -> None:
        try:
            m = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"{self.client_id}: unexpected message {m}")

    def drain(self, timeout: float = QUIET) -> list[Message]:
        """All messages arriving until ``timeout`` passes without a new one."""
        out = []
        while True:
            try:
                out.append(self.messages.get(timeout=timeout))
            except queue.Empty:
                return out

    def disconnect(self) -> None:
        self.c.disconnect()
        self.disconnected.wait(WAIT)
        self.c.loop_stop()


def paho_props(ptype: int, props: dict | None) -> Properties | None:
    """Our snake_case property dict -> paho Properties (None when empty)."""
    if not props:
        return None
    p = Properties(ptype)
    for name, value in props.items():
        attr = "".join(part.capitalize() for part in name.split("_"))
        if name == "user_property":
            attr = "UserProperty"
        elif name == "correlation_data":
            attr = "CorrelationData"
        setattr(p, attr, value)
    return p


def paho_connect(port: int, version: int = V5, **kw) -> PahoClient:
    connect_kw = {k: kw.pop(k) for k in ("keepalive", "props", "clean_start", "will") if k in kw}
    c = PahoClient(port, version, **kw)
    c.connect(**connect_kw)
    return c


def assert_healthy(port: int) -> None:
    """A fresh client can still subscribe, publish and receive: the broker keeps serving."""
    topic = f"health/{unique()}"
    sub = raw_connect(port, V311)
    try:
        sub.subscribe(topic, 1)
        pub = raw_connect(port, V5)
        try:
            pub.publish(topic, b"alive", qos=1)
        finally:
            pub.disconnect()
        m = sub.message()
        assert (m.topic, m.payload) == (topic, b"alive")
    finally:
        sub.disconnect()
