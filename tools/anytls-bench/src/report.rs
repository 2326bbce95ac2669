//! What a run prints: one human line, or (with `--json`) one JSON object.
//!
//! The JSON is written by hand (flat keys, numbers, strings, one level of
//! nesting) to keep the tool free of a serde dependency.

use std::fmt::Write;

/// A JSON value of the small kind a report needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(u64),
    Num(f64),
    Str(String),
    Bool(bool),
    Obj(Vec<(&'static str, Value)>),
}

impl Value {
    fn write(&self, out: &mut String) {
        match self {
            Value::Int(n) => write!(out, "{n}").expect("string write"),
            // Finite with fixed precision: enough for ms and Gbit/s, and stable diffs.
            Value::Num(x) if x.is_finite() => write!(out, "{}", (x * 1e6).round() / 1e6).expect("string write"),
            Value::Num(_) => out.push_str("null"),
            Value::Bool(b) => write!(out, "{b}").expect("string write"),
            Value::Str(s) => write_json_string(s, out),
            Value::Obj(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_json_string(key, out);
                    out.push(':');
                    value.write(out);
                }
                out.push('}');
            }
        }
    }

    pub fn to_json(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }
}

fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).expect("string write"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The outcome of one subcommand.
pub struct Report {
    pub human: String,
    pub json: Value,
    /// Whether the run did what was asked (all requests answered, no failures,
    /// within --max-seconds). Decides the exit status.
    pub ok: bool,
}

impl Report {
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.json.to_json());
        } else {
            println!("{}", self.human);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_nested_objects_and_escapes() {
        let v = Value::Obj(vec![
            ("mode", Value::Str("rr \"x\"\n".into())),
            ("n", Value::Int(3)),
            ("ok", Value::Bool(true)),
            ("lat", Value::Obj(vec![("p50", Value::Num(1.25)), ("nan", Value::Num(f64::NAN))])),
        ]);
        assert_eq!(v.to_json(), r#"{"mode":"rr \"x\"\n","n":3,"ok":true,"lat":{"p50":1.25,"nan":null}}"#);
    }
}
