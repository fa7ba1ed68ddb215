//! [`wire_enum!`]: a state enum whose wire strings are written once, in one table, and from
//! which serialization, parsing, `Display` and the list of known values all follow.

/// Declares a state enum with its wire strings. Every enum gets an extra `Unknown` variant: a
/// string this build does not know (sent by a newer broker) parses to it, so readers never fail
/// on a new state and never mistake it for a known one. `Unknown` serializes as `"unknown"`.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A value this build does not know (a newer broker sent it): never treated as
            /// any known state.
            Unknown,
        }

        impl $name {
            /// Every known value, in declaration order (without `Unknown`).
            pub const KNOWN: &'static [$name] = &[$($name::$variant),+];

            /// The value's wire string, as the admin API sends it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $wire, )+
                    $name::Unknown => "unknown",
                }
            }

            /// Reads a wire string; a string this build does not know is `Unknown`.
            pub fn from_wire(s: &str) -> Self {
                match s {
                    $( $wire => $name::$variant, )+
                    _ => $name::Unknown,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Ok($name::from_wire(&s))
            }
        }
    };
}

pub(crate) use wire_enum;
