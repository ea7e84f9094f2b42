//! Bounded JSON collections in request bodies.
//!
//! A derived `Deserialize` collects a whole array or object before the handler can check its
//! length, so a 16 MiB body of `[0,0,…]` or `["","",…]` becomes millions of elements (hundreds
//! of MiB for one request) before it is refused. These functions read a collection the body
//! kept raw (`&RawValue`: its syntax checked, nothing allocated) and give up at the first
//! entry past the limit. Sans-IO, like the rest of `http`.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer as _, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Why a bounded collection was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Bounded {
    /// More entries than the limit.
    TooMany,
    /// Not a collection of the expected shape (wrong type, wrong element type).
    Invalid,
}

/// The elements of the JSON array `raw`, at most `max` of them.
pub fn array_up_to<'de, T: Deserialize<'de>>(
    raw: &'de RawValue,
    max: usize,
) -> Result<Vec<T>, Bounded> {
    let overflowed = Cell::new(false);
    let parsed = serde_json::Deserializer::from_str(raw.get()).deserialize_seq(ArrayUpTo {
        max,
        overflowed: &overflowed,
        element: PhantomData,
    });
    outcome(parsed, &overflowed)
}

/// The entries of the JSON object `raw`, in order, at most `max` of them (a repeated key
/// counts each time; the caller decides which entry wins).
pub fn object_up_to<'de, K: Deserialize<'de>, V: Deserialize<'de>>(
    raw: &'de RawValue,
    max: usize,
) -> Result<Vec<(K, V)>, Bounded> {
    let overflowed = Cell::new(false);
    let parsed = serde_json::Deserializer::from_str(raw.get()).deserialize_map(ObjectUpTo {
        max,
        overflowed: &overflowed,
        entry: PhantomData,
    });
    outcome(parsed, &overflowed)
}

fn outcome<T>(parsed: Result<T, serde_json::Error>, overflowed: &Cell<bool>) -> Result<T, Bounded> {
    // Checked first: stopping early makes the deserializer report the unread rest as an error.
    if overflowed.get() {
        return Err(Bounded::TooMany);
    }
    parsed.map_err(|_| Bounded::Invalid)
}

/// Appends `item`, or marks the collection as over `max` and stops the deserializer.
fn push_up_to<T, E: de::Error>(
    items: &mut Vec<T>,
    item: T,
    max: usize,
    overflowed: &Cell<bool>,
) -> Result<(), E> {
    if items.len() == max {
        overflowed.set(true);
        return Err(E::custom("more entries than allowed"));
    }
    items.push(item);
    Ok(())
}

struct ArrayUpTo<'f, T> {
    max: usize,
    overflowed: &'f Cell<bool>,
    element: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for ArrayUpTo<'_, T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array of at most {} elements", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut elements = Vec::new();
        while let Some(element) = seq.next_element()? {
            push_up_to(&mut elements, element, self.max, self.overflowed)?;
        }
        Ok(elements)
    }
}

struct ObjectUpTo<'f, K, V> {
    max: usize,
    overflowed: &'f Cell<bool>,
    entry: PhantomData<(K, V)>,
}

impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Visitor<'de> for ObjectUpTo<'_, K, V> {
    type Value = Vec<(K, V)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an object of at most {} entries", self.max)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            push_up_to(&mut entries, entry, self.max, self.overflowed)?;
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> &RawValue {
        serde_json::from_str(json).expect("valid JSON")
    }

    #[test]
    fn arrays_up_to_the_limit_and_no_further() {
        assert_eq!(array_up_to::<u8>(raw("[1,2,3]"), 3), Ok(vec![1, 2, 3]));
        assert_eq!(array_up_to::<u8>(raw("[]"), 3), Ok(vec![]));
        assert_eq!(
            array_up_to::<u8>(raw("[1,2,3,4]"), 3),
            Err(Bounded::TooMany)
        );
        assert_eq!(
            array_up_to::<u8>(raw("[1,\"x\"]"), 3),
            Err(Bounded::Invalid)
        );
        assert_eq!(
            array_up_to::<u8>(raw("{\"a\":1}"), 3),
            Err(Bounded::Invalid)
        );
        let borrowed: Vec<&RawValue> = array_up_to(raw(r#"[{"a":1}, 2]"#), 2).expect("raw items");
        assert_eq!(borrowed[0].get(), r#"{"a":1}"#);
    }

    #[test]
    fn objects_up_to_the_limit_keeping_order_and_repeats() {
        let entries: Vec<(String, u8)> =
            object_up_to(raw(r#"{"b":1,"a":2,"b":3}"#), 3).expect("within");
        assert_eq!(
            entries,
            vec![("b".into(), 1), ("a".into(), 2), ("b".into(), 3)]
        );
        assert_eq!(
            object_up_to::<String, u8>(raw(r#"{"a":1,"b":2}"#), 1),
            Err(Bounded::TooMany)
        );
        assert_eq!(
            object_up_to::<String, u8>(raw("[1]"), 1),
            Err(Bounded::Invalid)
        );
    }
}
