//! Valid names and the nearest one to a misspelling, for errors that say what to write.

use serde::Deserialize;

/// ` (did you mean `x`?)` when some valid name is close to `given`.
pub fn did_you_mean(given: &str, valid: &[&str]) -> String {
    valid
        .iter()
        .map(|v| (strsim::damerau_levenshtein(given, v), v))
        .filter(|(d, v)| *d <= 2.max(v.len() / 3))
        .min()
        .map(|(_, v)| format!("; did you mean `{v}`?"))
        .unwrap_or_default()
}

/// Field names of a derived `Deserialize` struct, read through serde itself so that the
/// list of valid keys can never drift from the struct.
pub fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Fields<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}
