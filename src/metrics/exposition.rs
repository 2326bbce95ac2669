//! The one writer of the Prometheus text exposition format (version 0.0.4): every
//! `/metrics` section, pool, buffers, handshakes, users, is written through it, so the
//! `# HELP`/`# TYPE` header and label escaping exist once.

use std::fmt::Write;

/// What a family's samples mean to a scrape server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A page of metric families being written.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Writes one family: its header, then one line per `(labels, value)`; `labels` is
    /// the inside of the braces, already escaped with [`label`] (empty: no braces).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str, samples: impl IntoIterator<Item = (String, f64)>) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {}", kind.name());
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(self.text, "{name} {value}");
            } else {
                let _ = writeln!(self.text, "{name}{{{labels}}} {value}");
            }
        }
    }

    /// A counter family of whole-number samples.
    pub fn counter(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (String, u64)>) {
        self.family(name, Kind::Counter, help, samples.into_iter().map(|(l, v)| (l, v as f64)));
    }

    /// A gauge family of whole-number samples.
    pub fn gauge(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (String, u64)>) {
        self.family(name, Kind::Gauge, help, samples.into_iter().map(|(l, v)| (l, v as f64)));
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

/// `name="value"`, with the value escaped as the format requires: backslash, quote, newline.
pub fn label(name: &str, value: &str) -> String {
    let value = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    format!("{name}=\"{value}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_has_its_header_then_its_samples() {
        let mut page = Exposition::default();
        page.counter("x_total", "Xs.", [(label("who", "a\"b\\c\nd"), 3)]);
        page.family("y", Kind::Gauge, "Y.", [(String::new(), 0.5)]);
        assert_eq!(
            page.into_text(),
            "# HELP x_total Xs.\n# TYPE x_total counter\nx_total{who=\"a\\\"b\\\\c\\nd\"} 3\n\
             # HELP y Y.\n# TYPE y gauge\ny 0.5\n"
        );
    }
}
