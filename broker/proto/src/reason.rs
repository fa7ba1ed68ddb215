//! MQTT 5 reason codes by name (MQTT 5.0 §2.4): the broker decides with these names and turns
//! them into bytes only at the codec, so no decision hides behind a bare `0x82`.

/// A reason code the broker sends (CONNACK codes have their own type in the codec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// 0x00 Success / Normal disconnection / Granted QoS 0.
    Success = 0x00,
    /// 0x04 Disconnect with Will Message (sent by clients).
    DisconnectWithWill = 0x04,
    /// 0x10 No matching subscribers (PUBACK/PUBREC).
    NoMatchingSubscribers = 0x10,
    /// 0x11 No subscription existed (UNSUBACK).
    NoSubscriptionExisted = 0x11,
    /// 0x80 Unspecified error; also MQTT 3.1.1's SUBACK "Failure".
    UnspecifiedError = 0x80,
    /// 0x81 Malformed Packet.
    MalformedPacket = 0x81,
    /// 0x82 Protocol Error.
    ProtocolError = 0x82,
    /// 0x87 Not authorized.
    NotAuthorized = 0x87,
    /// 0x8B Server shutting down.
    ServerShuttingDown = 0x8B,
    /// 0x8D Keep Alive timeout.
    KeepAliveTimeout = 0x8D,
    /// 0x8E Session taken over.
    SessionTakenOver = 0x8E,
    /// 0x8F Topic Filter invalid.
    TopicFilterInvalid = 0x8F,
    /// 0x90 Topic Name invalid.
    TopicNameInvalid = 0x90,
    /// 0x92 Packet Identifier not found.
    PacketIdNotFound = 0x92,
    /// 0x93 Receive Maximum exceeded.
    ReceiveMaximumExceeded = 0x93,
    /// 0x94 Topic Alias invalid.
    TopicAliasInvalid = 0x94,
    /// 0x95 Packet too large.
    PacketTooLarge = 0x95,
    /// 0x96 Message rate too high.
    MessageRateTooHigh = 0x96,
    /// 0x97 Quota exceeded.
    QuotaExceeded = 0x97,
    /// 0x98 Administrative action.
    AdministrativeAction = 0x98,
    /// 0x9A Retain not supported.
    RetainNotSupported = 0x9A,
    /// 0x9B QoS not supported.
    QosNotSupported = 0x9B,
    /// 0x9C Use another server.
    UseAnotherServer = 0x9C,
}

impl Reason {
    /// The byte on the wire.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Whether the code reports a failure (0x80 and above).
    pub const fn is_error(self) -> bool {
        self.code() >= 0x80
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn codes_are_the_specifications() {
        assert_eq!(Reason::ProtocolError.code(), 0x82);
        assert_eq!(Reason::NotAuthorized.code(), 0x87);
        assert_eq!(Reason::UseAnotherServer.code(), 0x9C);
        assert!(Reason::UnspecifiedError.is_error() && !Reason::NoMatchingSubscribers.is_error());
    }
}
