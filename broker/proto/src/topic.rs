//! Topic names and filters: the validation rules of MQTT 4.7 in one place, so the router can
//! assume well-formed input and every entry point (PUBLISH, SUBSCRIBE, wills, ACLs) agrees.

/// Whether `s` holds a control character the specification says SHOULD NOT be sent
/// (U+0001–U+001F, U+007F–U+009F; MQTT 1.5.4), which a receiver may treat as malformed.
pub fn has_control_chars(s: &str) -> bool {
    s.chars()
        .any(|c| matches!(c, '\u{1}'..='\u{1f}' | '\u{7f}'..='\u{9f}'))
}

/// Why a topic or filter is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty topic or filter [MQTT-4.7.3-1].
    #[error("topic is empty")]
    Empty,
    /// U+0000 is not allowed [MQTT-4.7.3-2].
    #[error("topic contains U+0000")]
    NullChar,
    /// Wildcards are not allowed in topic names [MQTT-3.3.2-2].
    #[error("wildcard in topic name")]
    WildcardInName,
    /// `#` must be last and alone in its level, `+` alone in its level [MQTT-4.7.1-2, 4.7.1-3].
    #[error("misplaced wildcard in filter")]
    BadWildcard,
    /// `$share/{group}/{filter}` with an empty or wildcard group, or no filter [MQTT-4.8.2-1/2].
    #[error("malformed shared subscription")]
    BadShare,
    /// More levels than `mqtt.max_topic_levels`.
    #[error("more than {0} topic levels")]
    TooManyLevels(usize),
    /// Longer than `mqtt.max_topic_length` bytes.
    #[error("longer than {0} bytes")]
    TooLong(usize),
}

/// The size bounds on topic names and filters (`mqtt.max_topic_levels`,
/// `mqtt.max_topic_length`): what keeps a hostile topic from costing memory or time
/// proportional to its depth in every trie it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Most `/`-separated levels.
    pub max_levels: usize,
    /// Most bytes.
    pub max_len: usize,
}

impl TopicLimits {
    /// No bound beyond what MQTT's 16-bit string length allows (internal, trusted topics).
    pub const PROTOCOL: TopicLimits = TopicLimits {
        max_levels: 65536,
        max_len: 65535,
    };

    /// Checks the size of a topic name or of a filter (without its `$share/{group}/` prefix).
    pub fn check(&self, topic: &str) -> Result<(), TopicError> {
        if topic.len() > self.max_len {
            return Err(TopicError::TooLong(self.max_len));
        }
        // Levels = separators + 1; count without allocating, stop as soon as it is over.
        let mut levels = 1usize;
        for b in topic.bytes() {
            if b == b'/' {
                levels += 1;
                if levels > self.max_levels {
                    return Err(TopicError::TooManyLevels(self.max_levels));
                }
            }
        }
        Ok(())
    }

    /// [`validate_name`] plus the size bounds.
    pub fn name(&self, topic: &str) -> Result<(), TopicError> {
        self.check(topic)?;
        validate_name(topic)
    }

    /// [`parse_filter`] plus the size bounds (on the whole string and on the filter proper).
    pub fn filter<'a>(&self, raw: &'a str) -> Result<Filter<'a>, TopicError> {
        if raw.len() > self.max_len {
            return Err(TopicError::TooLong(self.max_len));
        }
        let f = parse_filter(raw)?;
        self.check(f.filter)?;
        Ok(f)
    }
}

/// Checks a PUBLISH topic name.
pub fn validate_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    for b in topic.bytes() {
        match b {
            0 => return Err(TopicError::NullChar),
            b'+' | b'#' => return Err(TopicError::WildcardInName),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a subscription filter (without a `$share/` prefix).
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    if filter.contains('\0') {
        return Err(TopicError::NullChar);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::BadWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::BadWildcard);
        }
    }
    Ok(())
}

/// A parsed subscription filter: plain, or a member of a shared-subscription group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter<'a> {
    /// Share group name, for `$share/{group}/{filter}`.
    pub group: Option<&'a str>,
    /// The topic filter proper.
    pub filter: &'a str,
}

/// Parses and validates a SUBSCRIBE filter, splitting off `$share/{group}/`.
pub fn parse_filter(raw: &str) -> Result<Filter<'_>, TopicError> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
            return Err(TopicError::BadShare);
        }
        validate_filter(filter)?;
        Ok(Filter {
            group: Some(group),
            filter,
        })
    } else {
        if raw == "$share" {
            return Err(TopicError::BadShare);
        }
        validate_filter(raw)?;
        Ok(Filter {
            group: None,
            filter: raw,
        })
    }
}

/// Whether `filter` matches `topic` (both already validated). Topics starting with `$` are
/// not matched by a leading wildcard [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a topic is in `$SYS`, which only the broker publishes to (as mosquitto: a
/// client's PUBLISH there is refused like an ACL denial).
pub fn is_sys(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// Whether a `$SYS` topic carries another client's identity or address
/// (`$SYS/brokers/{node}/clients/…`).
pub fn sys_names_clients(topic: &str) -> bool {
    topic
        .strip_prefix("$SYS/brokers/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, rest)| rest.starts_with("clients/"))
}

/// Whether a filter contains wildcards.
pub fn has_wildcards(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("a/b").is_ok());
        assert!(validate_name("/").is_ok());
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a\0b"), Err(TopicError::NullChar));
    }

    #[test]
    fn filters() {
        for ok in ["#", "+", "a/#", "a/+/b", "+/+", "/", "$SYS/#", "a//b"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["a/#/b", "a#", "a/b+", "#/a", "", "a+/b"] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shares() {
        assert_eq!(
            parse_filter("$share/g/a/+"),
            Ok(Filter {
                group: Some("g"),
                filter: "a/+"
            })
        );
        assert_eq!(parse_filter("$share/g"), Err(TopicError::BadShare));
        assert_eq!(parse_filter("$share//a"), Err(TopicError::BadShare));
        assert_eq!(parse_filter("$share/g+/a"), Err(TopicError::BadShare));
        assert_eq!(
            parse_filter("a/b"),
            Ok(Filter {
                group: None,
                filter: "a/b"
            })
        );
    }

    #[test]
    fn limits() {
        let l = TopicLimits {
            max_levels: 3,
            max_len: 16,
        };
        assert!(l.name("a/b/c").is_ok());
        assert_eq!(l.name("a/b/c/d"), Err(TopicError::TooManyLevels(3)));
        assert_eq!(l.name("//"), Ok(()));
        assert_eq!(l.name("///"), Err(TopicError::TooManyLevels(3)));
        assert_eq!(l.name("abcdefghijklmnopq"), Err(TopicError::TooLong(16)));
        assert!(l.filter("$share/g/a/+/#").is_ok());
        assert_eq!(
            l.filter("$share/g/a/b/c/d"),
            Err(TopicError::TooManyLevels(3))
        );
        assert_eq!(l.filter("$share/g/abcdefghi"), Err(TopicError::TooLong(16)));
        assert_eq!(
            l.filter("a/+/#"),
            Ok(Filter {
                group: None,
                filter: "a/+/#"
            })
        );
    }

    #[test]
    fn matching() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "/x", true),
            ("+", "/x", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/b", "a/c", false),
            ("a//b", "a//b", true),
        ];
        for (f, t, m) in cases {
            assert_eq!(matches(f, t), m, "{f} vs {t}");
        }
    }
}
