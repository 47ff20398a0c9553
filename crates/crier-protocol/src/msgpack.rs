//! MessagePack ⇄ JSON, for the `crier.v1.msgpack` encoding, without a MessagePack library.
//!
//! crier keeps every frame's meaning in JSON (the session's frames, the broker's `message`
//! frames, the history): a MessagePack connection's frames are the same values transcoded.
//! - [`from_json`]: a JSON document as one MessagePack value, keeping object key order (server
//!   → client; a `message` frame is transcoded once per node, not per subscriber).
//! - [`to_json`]: one MessagePack value as JSON text (client → server, then decoded by the JSON
//!   frame decoder, so both encodings obey the same rules). Only what JSON can say is accepted:
//!   nil, booleans, integers, finite floats, UTF-8 strings, arrays, maps with string keys;
//!   `bin` and `ext` values, non-string keys, NaN/∞, invalid UTF-8, truncated input, trailing
//!   bytes and nesting deeper than [`MAX_DEPTH`] are errors. Nothing is preallocated from a
//!   length the input claims (a 5-byte array header may announce 4 billion elements).

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Deepest nesting accepted (the frame object plus `data`'s own
/// [`MAX_DATA_DEPTH`](crate::frames::MAX_DATA_DEPTH), with room to spare).
pub const MAX_DEPTH: usize = 80;

/// Transcodes a JSON document to one MessagePack value.
pub fn from_json(json: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(json.len());
    let mut de = serde_json::Deserializer::from_slice(json);
    Value { out: &mut out, depth: 0 }.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Writes one JSON value as MessagePack while serde_json reads it.
struct Value<'a> {
    out: &'a mut Vec<u8>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Value<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Value<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.out.push(0xc0);
        Ok(())
    }
    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.out.push(if v { 0xc3 } else { 0xc2 });
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        write_uint(self.out, v);
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        if v >= 0 {
            write_uint(self.out, v as u64);
        } else if v >= -32 {
            self.out.push(v as u8);
        } else if v >= i8::MIN as i64 {
            self.out.extend_from_slice(&[0xd0, v as u8]);
        } else if v >= i16::MIN as i64 {
            self.out.push(0xd1);
            self.out.extend_from_slice(&(v as i16).to_be_bytes());
        } else if v >= i32::MIN as i64 {
            self.out.push(0xd2);
            self.out.extend_from_slice(&(v as i32).to_be_bytes());
        } else {
            self.out.push(0xd3);
            self.out.extend_from_slice(&v.to_be_bytes());
        }
        Ok(())
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.out.push(0xcb);
        self.out.extend_from_slice(&v.to_be_bytes());
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        write_str(self.out, v);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(serde::de::Error::custom("nested too deeply"));
        }
        let start = self.out.len();
        self.out.extend_from_slice(&[0xdd, 0, 0, 0, 0]);
        let mut n: u32 = 0;
        while seq.next_element_seed(Value { out: &mut *self.out, depth })?.is_some() {
            n = n.saturating_add(1);
        }
        shrink_header(self.out, start, n, 0x90, 0xdc);
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(serde::de::Error::custom("nested too deeply"));
        }
        let start = self.out.len();
        self.out.extend_from_slice(&[0xdf, 0, 0, 0, 0]);
        let mut n: u32 = 0;
        while map.next_key_seed(Value { out: &mut *self.out, depth })?.is_some() {
            map.next_value_seed(Value { out: &mut *self.out, depth })?;
            n = n.saturating_add(1);
        }
        shrink_header(self.out, start, n, 0x80, 0xde);
        Ok(())
    }
}

/// Replaces the 5-byte (32-bit) container header at `start` with the shortest one for `n`.
fn shrink_header(out: &mut Vec<u8>, start: usize, n: u32, fix: u8, marker16: u8) {
    if n < 16 {
        out[start] = fix | n as u8;
        out.drain(start + 1..start + 5);
    } else if n <= u16::MAX as u32 {
        out[start] = marker16;
        out[start + 1..start + 3].copy_from_slice(&(n as u16).to_be_bytes());
        out.drain(start + 3..start + 5);
    } else {
        out[start + 1..start + 5].copy_from_slice(&n.to_be_bytes());
    }
}

fn write_uint(out: &mut Vec<u8>, v: u64) {
    if v < 128 {
        out.push(v as u8);
    } else if v <= u8::MAX as u64 {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= u16::MAX as u64 {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u32::MAX as u64 {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n <= u8::MAX as usize {
        out.extend_from_slice(&[0xd9, n as u8]);
    } else if n <= u16::MAX as usize {
        out.push(0xda);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

/// Transcodes one MessagePack value (the whole input) to JSON text, appended to `out`.
pub fn to_json(bytes: &[u8], out: &mut String) -> Result<(), String> {
    let mut r = Reader { bytes, at: 0 };
    r.value(out, 0)?;
    if r.at != bytes.len() {
        return Err(format!("{} bytes after the value", bytes.len() - r.at));
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("truncated value")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn be(&mut self, n: usize) -> Result<u64, String> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }

    fn value(&mut self, out: &mut String, depth: usize) -> Result<(), String> {
        use std::fmt::Write;
        let m = self.byte()?;
        match m {
            0x00..=0x7f => write!(out, "{m}").map_err(|e| e.to_string()),
            0xe0..=0xff => write!(out, "{}", m as i8).map_err(|e| e.to_string()),
            0xc0 => {
                out.push_str("null");
                Ok(())
            }
            0xc2 => {
                out.push_str("false");
                Ok(())
            }
            0xc3 => {
                out.push_str("true");
                Ok(())
            }
            0xcc..=0xcf => {
                let v = self.be(1 << (m - 0xcc))?;
                write!(out, "{v}").map_err(|e| e.to_string())
            }
            0xd0..=0xd3 => {
                let n = 1usize << (m - 0xd0);
                let raw = self.be(n)?;
                let shift = 64 - 8 * n as u32;
                let v = ((raw << shift) as i64) >> shift;
                write!(out, "{v}").map_err(|e| e.to_string())
            }
            0xca => {
                let v = f32::from_bits(self.be(4)? as u32) as f64;
                float(out, v)
            }
            0xcb => {
                let v = f64::from_bits(self.be(8)?);
                float(out, v)
            }
            0xa0..=0xbf => self.string(out, (m & 0x1f) as usize),
            0xd9..=0xdb => {
                let n = self.be(1 << (m - 0xd9))? as usize;
                self.string(out, n)
            }
            0x90..=0x9f => self.array(out, (m & 0x0f) as u64, depth),
            0xdc | 0xdd => {
                let n = self.be(if m == 0xdc { 2 } else { 4 })?;
                self.array(out, n, depth)
            }
            0x80..=0x8f => self.map(out, (m & 0x0f) as u64, depth),
            0xde | 0xdf => {
                let n = self.be(if m == 0xde { 2 } else { 4 })?;
                self.map(out, n, depth)
            }
            0xc4..=0xc6 => Err("bin values have no JSON equivalent; send strings".into()),
            0xc7..=0xc9 | 0xd4..=0xd8 => Err("ext values have no JSON equivalent".into()),
            0xc1 => Err("0xc1 is never used in MessagePack".into()),
        }
    }

    fn string(&mut self, out: &mut String, n: usize) -> Result<(), String> {
        let raw = self.take(n)?;
        let s = std::str::from_utf8(raw).map_err(|_| "a string is not valid UTF-8".to_owned())?;
        // Serialising a &str cannot fail.
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
        Ok(())
    }

    fn array(&mut self, out: &mut String, n: u64, depth: usize) -> Result<(), String> {
        if depth + 1 > MAX_DEPTH {
            return Err("nested too deeply".into());
        }
        out.push('[');
        for i in 0..n {
            if i > 0 {
                out.push(',');
            }
            self.value(out, depth + 1)?;
        }
        out.push(']');
        Ok(())
    }

    fn map(&mut self, out: &mut String, n: u64, depth: usize) -> Result<(), String> {
        if depth + 1 > MAX_DEPTH {
            return Err("nested too deeply".into());
        }
        out.push('{');
        for i in 0..n {
            if i > 0 {
                out.push(',');
            }
            let m = *self.bytes.get(self.at).ok_or("truncated value")?;
            if !matches!(m, 0xa0..=0xbf | 0xd9..=0xdb) {
                return Err("map keys must be strings".into());
            }
            self.value(out, depth + 1)?;
            out.push(':');
            self.value(out, depth + 1)?;
        }
        out.push('}');
        Ok(())
    }
}

fn float(out: &mut String, v: f64) -> Result<(), String> {
    if !v.is_finite() {
        return Err("NaN and infinities have no JSON equivalent".into());
    }
    out.push_str(&serde_json::to_string(&v).map_err(|e| e.to_string())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(json: &str) -> String {
        let mp = from_json(json.as_bytes()).unwrap_or_default();
        let mut back = String::new();
        to_json(&mp, &mut back).unwrap_or_else(|e| panic!("{json}: {e}"));
        back
    }

    #[test]
    fn json_round_trips_in_key_order_with_shortest_headers() {
        for json in [
            r#"{"type":"message","channel":"c","epoch":"e","offset":58,"data":{"z":1,"a":[true,false,null]}}"#,
            r#"[0,127,128,255,256,65535,65536,4294967295,4294967296,18446744073709551615]"#,
            r#"[-1,-32,-33,-128,-129,-32768,-32769,-2147483648,-2147483649,-9223372036854775808]"#,
            r#"[1.5,-0.25,1e+300,"","é\"\\\n"]"#,
            "[5.104235516441091e+38,0.1,1.7976931348623157e+308]",
        ] {
            assert_eq!(round_trip(json), json);
        }
        let long: Vec<u32> = (0..70_000).collect();
        let json = serde_json::to_string(&long).unwrap_or_default();
        assert_eq!(round_trip(&json), json);
        let s = "x".repeat(70_000);
        let json = serde_json::to_string(&s).unwrap_or_default();
        assert_eq!(round_trip(&json), json);
        assert_eq!(from_json(br#"{"a":1}"#), Ok(vec![0x81, 0xa1, b'a', 1]));
    }

    #[test]
    fn refuses_what_json_cannot_say_and_broken_input() {
        let bad: &[&[u8]] = &[
            &[],
            &[0xc1],
            &[0xc4, 1, 0],
            &[0xd4, 1, 0],
            &[0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0],
            &[0x81, 1, 1],
            &[0xa2, 0xff, 0xfe],
            &[0xdd, 0xff, 0xff, 0xff, 0xff],
            &[0x91],
            &[0xc0, 0xc0],
            &[0xdb, 0xff, 0xff, 0xff, 0xff, b'a'],
        ];
        for b in bad {
            assert!(to_json(b, &mut String::new()).is_err(), "{b:?}");
        }
        let deep = vec![0x91u8; MAX_DEPTH + 1];
        assert!(to_json(&deep, &mut String::new()).is_err());
        let deep_json = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(from_json(deep_json.as_bytes()).is_err());
        assert!(from_json(b"{} x").is_err());
    }
}
