//! The log of both binaries, in one of two formats (`--log-format`):
//! text, `2026-01-01T00:00:00Z [INFO] message`, for people, and JSON, one object a line
//! (`ts`, `level`, `target`, `msg`, then the record's own key-value fields), for log
//! shippers. `RUST_LOG` filters either way.

use std::fmt::Write as _;
use std::io::Write;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub const ALL: [LogFormat; 2] = [LogFormat::Text, LogFormat::Json];

    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            LogFormat::Text => "`TIME [LEVEL] message`, for people",
            LogFormat::Json => "one JSON object a line (ts, level, target, msg, fields), for log shippers",
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(name: &str) -> Result<LogFormat, UnknownLogFormat> {
        LogFormat::ALL.into_iter().find(|format| format.name() == name).ok_or_else(|| UnknownLogFormat(name.into()))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown log format {0:?} (text or json)")]
pub struct UnknownLogFormat(String);

/// INFO by default; `RUST_LOG` overrides (e.g. `RUST_LOG=debug`).
pub fn init(format: LogFormat) {
    let mut builder = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    match format {
        LogFormat::Text => builder
            .format(|out, record| writeln!(out, "{} [{}] {}", out.timestamp_seconds(), record.level(), record.args())),
        LogFormat::Json => builder.format(|out, record| {
            let line = json_line(&out.timestamp_millis().to_string(), record);
            writeln!(out, "{line}")
        }),
    };
    builder.init();
}

/// One record as a JSON object on one line: control characters and newlines in the
/// message are escaped, so a multi-line message cannot split the record.
pub fn json_line(ts: &str, record: &log::Record) -> String {
    let mut line = String::with_capacity(128);
    line.push_str("{\"ts\":");
    push_json_string(&mut line, ts);
    line.push_str(",\"level\":");
    push_json_string(&mut line, record.level().as_str());
    line.push_str(",\"target\":");
    push_json_string(&mut line, record.target());
    line.push_str(",\"msg\":");
    match record.args().as_str() {
        Some(text) => push_json_string(&mut line, text),
        None => push_json_string(&mut line, &record.args().to_string()),
    }
    let _ = record.key_values().visit(&mut JsonFields(&mut line));
    line.push('}');
    line
}

/// Appends each key-value field as `,"key":value` (numbers and booleans as such, the
/// rest as strings); the four fixed names are not overwritten.
struct JsonFields<'a>(&'a mut String);

impl<'kvs> log::kv::VisitSource<'kvs> for JsonFields<'_> {
    fn visit_pair(&mut self, key: log::kv::Key<'kvs>, value: log::kv::Value<'kvs>) -> Result<(), log::kv::Error> {
        if matches!(key.as_str(), "ts" | "level" | "target" | "msg") {
            return Ok(());
        }
        self.0.push(',');
        push_json_string(self.0, key.as_str());
        self.0.push(':');
        if let Some(n) = value.to_u64() {
            let _ = write!(self.0, "{n}");
        } else if let Some(n) = value.to_i64() {
            let _ = write!(self.0, "{n}");
        } else if let Some(b) = value.to_bool() {
            let _ = write!(self.0, "{b}");
        } else {
            push_json_string(self.0, &value.to_string());
        }
        Ok(())
    }
}

/// Appends `text` as a JSON string (serde_json's escaping: quotes, backslashes, every
/// control character).
pub fn push_json_string(out: &mut String, text: &str) {
    out.push_str(&serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(line: &str) -> serde_json::Value {
        assert!(!line.contains('\n'), "one line: {line:?}");
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    #[test]
    fn a_json_line_has_the_fixed_fields() {
        let line = json_line(
            "2026-01-01T00:00:00.000Z",
            &log::Record::builder()
                .args(format_args!("listening on {}", "127.0.0.1:8443"))
                .level(log::Level::Info)
                .target("anytls_rs::cli::server")
                .build(),
        );
        let object = parsed(&line);
        assert_eq!(object["ts"], "2026-01-01T00:00:00.000Z");
        assert_eq!(object["level"], "INFO");
        assert_eq!(object["target"], "anytls_rs::cli::server");
        assert_eq!(object["msg"], "listening on 127.0.0.1:8443");
        assert_eq!(object.as_object().unwrap().len(), 4, "{line}");
    }

    #[test]
    fn a_multi_line_message_with_controls_and_quotes_stays_one_valid_line() {
        let nasty = "two\nlines\r\t\u{1b}[31m \"quoted\" back\\slash \u{0}";
        let line = json_line(
            "t",
            &log::Record::builder().args(format_args!("{nasty}")).level(log::Level::Warn).target("x").build(),
        );
        assert_eq!(parsed(&line)["msg"], nasty);
    }

    #[test]
    fn key_value_fields_become_json_fields_of_their_type() {
        let fields: [(&str, log::kv::Value); 4] = [
            ("peer", log::kv::Value::from("192.0.2.1:5000")),
            ("suppressed", log::kv::Value::from(3u64)),
            ("msg", log::kv::Value::from("not overwritten")),
            ("first", log::kv::Value::from(true)),
        ];
        let line = json_line(
            "t",
            &log::Record::builder()
                .args(format_args!("authentication failed"))
                .level(log::Level::Info)
                .target("x")
                .key_values(&fields)
                .build(),
        );
        let object = parsed(&line);
        assert_eq!(object["peer"], "192.0.2.1:5000");
        assert_eq!(object["suppressed"], 3);
        assert_eq!(object["first"], true);
        assert_eq!(object["msg"], "authentication failed");
    }

    #[test]
    fn format_names_round_trip() {
        for format in LogFormat::ALL {
            assert_eq!(format.name().parse::<LogFormat>().unwrap(), format);
        }
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
