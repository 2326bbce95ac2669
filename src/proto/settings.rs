//! Settings and ServerSettings payloads: `key=value` lines joined by `\n`.

/// Ordered key/value pairs; unknown keys are kept and ignored by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    entries: Vec<(String, String)>,
}

impl Settings {
    pub fn new() -> Settings {
        Settings::default()
    }

    pub fn with(mut self, key: &str, value: &str) -> Settings {
        self.entries.push((key.to_string(), value.to_string()));
        self
    }

    /// Parses lines split at the first `=`; lines without `=` are ignored, `\r` is stripped.
    pub fn parse(data: &[u8]) -> Settings {
        let text = String::from_utf8_lossy(data);
        let entries = text
            .split('\n')
            .filter_map(|line| {
                let line = line.strip_suffix('\r').unwrap_or(line);
                let (key, value) = line.split_once('=')?;
                Some((key.to_string(), value.to_string()))
            })
            .collect();
        Settings { entries }
    }

    pub fn encode(&self) -> Vec<u8> {
        let lines: Vec<String> = self.entries.iter().map(|(k, v)| format!("{k}={v}")).collect();
        lines.join("\n").into_bytes()
    }

    /// The first value for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The protocol version (`v`), 1 when absent or unreadable, as the reference does.
    pub fn version(&self) -> u8 {
        self.get("v").and_then(|v| v.trim().parse().ok()).unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn client_settings_encode_as_lines() {
        let settings = Settings::new()
            .with("v", "2")
            .with("client", "anytls-rs/0.1.0")
            .with("padding-md5", "75cff2ad89aadf5e257059ee571ebe11");
        assert_eq!(settings.encode(), b"v=2\nclient=anytls-rs/0.1.0\npadding-md5=75cff2ad89aadf5e257059ee571ebe11");
    }

    #[test]
    fn values_split_at_the_first_equals_and_crlf_is_tolerated() {
        let settings = Settings::parse(b"v=2\r\nclient=a=b\nnonsense\n\npadding-md5=x");
        assert_eq!(settings.get("client"), Some("a=b"));
        assert_eq!(settings.get("padding-md5"), Some("x"));
        assert_eq!(settings.version(), 2);
        assert_eq!(settings.get("nonsense"), None);
    }

    #[test]
    fn missing_or_bad_version_means_v1() {
        assert_eq!(Settings::parse(b"client=x").version(), 1);
        assert_eq!(Settings::parse(b"v=two").version(), 1);
    }

    proptest! {
        #[test]
        fn settings_round_trip(pairs in proptest::collection::vec(("[a-z-]{1,12}", "[ -~&&[^=]]{0,20}"), 0..6)) {
            let mut settings = Settings::new();
            for (k, v) in &pairs {
                settings = settings.with(k, v);
            }
            prop_assert_eq!(Settings::parse(&settings.encode()), settings);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Settings::parse(&bytes).version();
        }
    }
}
