//! Serde helpers that carry 64-bit addresses (and register or page-table values) as
//! lowercase hex strings, `"0xffffffff81234560"`.
//!
//! JSON numbers above 2^53 lose precision in jq 1.6, JavaScript and most other JSON tools, so
//! every address hvpatch writes to JSON is a string. Reading accepts such a string or, for
//! state written by older versions, a plain non-negative JSON integer; anything else is an
//! error.
//!
//! One module serves every shape: `u64`, `Option<u64>`, `Vec<u64>`, `[u64; N]`, pairs and
//! vectors of those (see [`HexForm`]):
//!
//! ```
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct S {
//!     #[serde(with = "introspect::hex")]
//!     addr: u64,
//!     #[serde(with = "introspect::hex", default)]
//!     maybe: Option<u64>,
//! }
//! let s: S = serde_json::from_str(r#"{"addr": "0xffffffff81000000", "maybe": 16}"#).unwrap();
//! assert_eq!(s.maybe, Some(16));
//! assert_eq!(
//!     serde_json::to_string(&s).unwrap(),
//!     r#"{"addr":"0xffffffff81000000","maybe":"0x10"}"#
//! );
//! ```
//!
//! Optional fields read with `with` need `#[serde(default)]` to keep accepting a missing field.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// `v` as JSON carries it: `"0x…"`, lowercase, no padding.
pub fn to_hex(v: u64) -> String {
    format!("{v:#x}")
}

/// Parses `"0x…"` (either case of digits, `0X` accepted too).
pub fn parse_hex(s: &str) -> Result<u64, String> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or_else(|| format!("expected a hex address like \"0xffffffff81000000\", got {s:?}"))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not a hex number"));
    }
    u64::from_str_radix(digits, 16).map_err(|_| format!("{s:?} does not fit in 64 bits"))
}

/// One 64-bit value, serialized as a hex string; deserialized from a hex string or a JSON
/// integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hex(pub u64);

impl Serialize for Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

struct HexVisitor;

impl Visitor<'_> for HexVisitor {
    type Value = Hex;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a 64-bit address as a hex string (\"0x…\") or a non-negative integer")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Hex, E> {
        Ok(Hex(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Hex, E> {
        u64::try_from(v)
            .map(Hex)
            .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Hex, E> {
        u64::try_from(v)
            .map(Hex)
            .map_err(|_| E::custom(format!("{v} does not fit in 64 bits")))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Hex, E> {
        u64::try_from(v)
            .map(Hex)
            .map_err(|_| E::custom(format!("{v} is not a 64-bit address")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Hex, E> {
        parse_hex(v).map(Hex).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Hex, D::Error> {
        d.deserialize_any(HexVisitor)
    }
}

/// A field type whose 64-bit values [`serialize`]/[`deserialize`] write as hex: `Repr` is the
/// same shape with [`Hex`] in place of each address.
pub trait HexForm: Sized {
    /// The serialized shape.
    type Repr;
    /// To the serialized shape.
    fn to_repr(&self) -> Self::Repr;
    /// From the serialized shape (fails only on a wrong array length).
    fn from_repr(r: Self::Repr) -> Result<Self, String>;
}

impl HexForm for u64 {
    type Repr = Hex;
    fn to_repr(&self) -> Hex {
        Hex(*self)
    }
    fn from_repr(r: Hex) -> Result<u64, String> {
        Ok(r.0)
    }
}

/// Values that keep their own representation inside a hex shape (e.g. the register name of
/// `(&str, u64)` or the page index of `(usize, u64)`).
macro_rules! plain {
    ($($t:ty),*) => {$(
        impl HexForm for $t {
            type Repr = $t;
            fn to_repr(&self) -> $t {
                self.clone()
            }
            fn from_repr(r: $t) -> Result<$t, String> {
                Ok(r)
            }
        }
    )*};
}
plain!(usize, &'static str, String);

impl<T: HexForm> HexForm for Option<T> {
    type Repr = Option<T::Repr>;
    fn to_repr(&self) -> Self::Repr {
        self.as_ref().map(T::to_repr)
    }
    fn from_repr(r: Self::Repr) -> Result<Self, String> {
        r.map(T::from_repr).transpose()
    }
}

impl<T: HexForm> HexForm for Vec<T> {
    type Repr = Vec<T::Repr>;
    fn to_repr(&self) -> Self::Repr {
        self.iter().map(T::to_repr).collect()
    }
    fn from_repr(r: Self::Repr) -> Result<Self, String> {
        r.into_iter().map(T::from_repr).collect()
    }
}

impl<T: HexForm, const N: usize> HexForm for [T; N] {
    type Repr = Vec<T::Repr>;
    fn to_repr(&self) -> Self::Repr {
        self.iter().map(T::to_repr).collect()
    }
    fn from_repr(r: Self::Repr) -> Result<Self, String> {
        let n = r.len();
        let v: Vec<T> = r.into_iter().map(T::from_repr).collect::<Result<_, _>>()?;
        v.try_into()
            .map_err(|_| format!("expected {N} values, got {n}"))
    }
}

impl<A: HexForm, B: HexForm> HexForm for (A, B) {
    type Repr = (A::Repr, B::Repr);
    fn to_repr(&self) -> Self::Repr {
        (self.0.to_repr(), self.1.to_repr())
    }
    fn from_repr(r: Self::Repr) -> Result<Self, String> {
        Ok((A::from_repr(r.0)?, B::from_repr(r.1)?))
    }
}

/// `#[serde(with = "introspect::hex")]`: writes every 64-bit value of the field as hex.
pub fn serialize<T, S>(v: &T, s: S) -> Result<S::Ok, S::Error>
where
    T: HexForm,
    T::Repr: Serialize,
    S: Serializer,
{
    v.to_repr().serialize(s)
}

/// `#[serde(with = "introspect::hex")]`: reads hex strings (or integers) back.
pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
where
    T: HexForm,
    T::Repr: Deserialize<'de>,
    D: Deserializer<'de>,
{
    T::from_repr(T::Repr::deserialize(d)?).map_err(de::Error::custom)
}

/// `#[serde(with = "introspect::hex::keys")]` for a `BTreeMap<u64, V>`: the keys as hex
/// strings. Reads hex keys and the decimal keys older versions wrote.
pub mod keys {
    use std::collections::BTreeMap;

    use serde::de::{Deserializer, Error as _};
    use serde::ser::{SerializeMap, Serializer};
    use serde::{Deserialize, Serialize};

    /// Writes the map with hex keys.
    pub fn serialize<V: Serialize, S: Serializer>(
        m: &BTreeMap<u64, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(m.len()))?;
        for (k, v) in m {
            map.serialize_entry(&super::to_hex(*k), v)?;
        }
        map.end()
    }

    /// Reads a map with hex (or decimal) keys.
    pub fn deserialize<'de, V: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u64, V>, D::Error> {
        let raw = BTreeMap::<String, V>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (k, v) in raw {
            let key = if k.starts_with("0x") || k.starts_with("0X") {
                super::parse_hex(&k).map_err(D::Error::custom)?
            } else {
                k.parse::<u64>().map_err(|_| {
                    D::Error::custom(format!("map key {k:?} is not a hex or decimal address"))
                })?
            };
            if out.insert(key, v).is_some() {
                return Err(D::Error::custom(format!("duplicate map key {k:?}")));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};
    use serde_json::json;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        #[serde(with = "crate::hex")]
        a: u64,
        #[serde(with = "crate::hex", default)]
        o: Option<u64>,
        #[serde(with = "crate::hex", default)]
        v: Vec<u64>,
        #[serde(with = "crate::hex", default)]
        arr: [u64; 3],
        #[serde(with = "crate::hex", default)]
        pairs: Vec<(usize, u64)>,
        #[serde(with = "crate::hex::keys", default)]
        m: BTreeMap<u64, u8>,
    }

    fn sample() -> S {
        S {
            a: 0xffff_ffff_8123_4560,
            o: Some(0),
            v: vec![1, u64::MAX],
            arr: [0x10, 0x20, 0xffff_8880_0000_0000],
            pairs: vec![(3, 0x8000_0000_0010_0063)],
            m: BTreeMap::from([(0xffff_ffff_8100_0000, 7)]),
        }
    }

    #[test]
    fn writes_lowercase_hex_strings() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(
            v,
            json!({
                "a": "0xffffffff81234560",
                "o": "0x0",
                "v": ["0x1", "0xffffffffffffffff"],
                "arr": ["0x10", "0x20", "0xffff888000000000"],
                "pairs": [[3, "0x8000000000100063"]],
                "m": {"0xffffffff81000000": 7},
            })
        );
        let none = S {
            o: None,
            ..sample()
        };
        assert_eq!(serde_json::to_value(none).unwrap()["o"], json!(null));
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let back: S = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn reads_numbers_written_by_older_versions() {
        let old = r#"{"a": 18446744071581156704, "o": 0, "v": [1, 18446744073709551615],
            "arr": [16, 32, 18446612682070032384], "pairs": [[3, 9223372036855824483]],
            "m": {"18446744071578845184": 7}}"#;
        let s: S = serde_json::from_str(old).unwrap();
        assert_eq!(s, sample());
    }

    #[test]
    fn missing_optional_fields_default() {
        let s: S = serde_json::from_str(r#"{"a": "0x1"}"#).unwrap();
        assert_eq!((s.a, s.o, s.v.len(), s.arr), (1, None, 0, [0; 3]));
        let s: S = serde_json::from_str(r#"{"a": "0X1F", "o": null}"#).unwrap();
        assert_eq!((s.a, s.o), (0x1f, None));
    }

    #[test]
    fn rejects_garbage() {
        for (bad, why) in [
            (r#"{"a": "ffffffff81000000"}"#, "expected a hex address"),
            (r#"{"a": "0x"}"#, "is not a hex number"),
            (r#"{"a": "0xfoo"}"#, "is not a hex number"),
            (r#"{"a": "0x+1"}"#, "is not a hex number"),
            (r#"{"a": "0x10000000000000000"}"#, "does not fit in 64 bits"),
            (r#"{"a": "123"}"#, "expected a hex address"),
            (r#"{"a": -1}"#, "hex string"),
            (r#"{"a": 1.5}"#, "hex string"),
            (r#"{"a": true}"#, "hex string"),
            (r#"{"a": null}"#, "hex string"),
            (r#"{"a": 1, "arr": ["0x1"]}"#, "expected 3 values, got 1"),
            (
                r#"{"a": 1, "m": {"zz": 1}}"#,
                "not a hex or decimal address",
            ),
            (r#"{"a": 1, "m": {"0x1": 1, "1": 2}}"#, "duplicate map key"),
        ] {
            let e = serde_json::from_str::<S>(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(super::to_hex(0xabc), "0xabc");
        assert_eq!(super::parse_hex("0xABC"), Ok(0xabc));
        assert!(super::parse_hex("0x 1").is_err());
    }
}
