//! The padding scheme and the client's record plan.
//!
//! A scheme says, for each of the client's first `stop` writes, which TLS record sizes
//! to produce: payload is cut to those sizes and short records are filled with Waste
//! frames, so the first packets of a session do not reveal the payload's sizes.
//! A server may pad its own first writes the same way (downlink padding): clients
//! discard Waste frames whichever end sends them. This module only plans; the session
//! does the writing.
//!
//! Two parsers: [`PaddingScheme::parse`] reads a scheme from the wire as the reference
//! does, skipping what it cannot use; [`PaddingScheme::load`] reads one an operator
//! wrote and refuses anything the lenient parser would silently skip.

use md5::{Digest, Md5};
use rand::{Rng, RngExt};

use super::frame::{HEADER_LEN, MAX_FRAME_DATA};

/// The reference's default scheme, byte for byte (no trailing newline).
pub const DEFAULT_SCHEME: &str = "stop=8
0=30-30
1=100-400
2=400-500,c,500-1000,c,500-1000,c,500-1000,c,500-1000
3=9-9,500-1000
4=500-1000
5=500-1000
6=500-1000
7=500-1000";

/// The server's built-in downlink scheme. Unpadded, a server's first records after the
/// handshake are tiny: its Settings answer (a 32-byte record on the wire), a SYNACK (24
/// bytes); no web server answers a request like that. This one makes the first writes
/// the sizes of an HTTP response's head and first body records, and cuts a large first
/// answer into records of varied size, as a server streaming a page does.
pub const DEFAULT_DOWNLINK_SCHEME: &str = "stop=4
0=300-700
1=500-1400,c,1000-1400
2=800-1400,c,1400-4000
3=1000-4000";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemeError {
    #[error("padding scheme has no integer `stop=` line")]
    MissingStop,
    /// What [`PaddingScheme::load`] refuses: the line (from 1) and why.
    #[error("padding scheme line {line}: {why}")]
    BadLine { line: usize, why: String },
    #[error("padding scheme of {0} bytes is longer than one frame ({MAX_FRAME_DATA} bytes) can carry")]
    TooLong(usize),
}

/// One element of a scheme line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeSpec {
    /// `c`: stop here if the payload is used up.
    Check,
    /// `min-max`: a size in `[min, max)`, or exactly `min` when equal.
    Range(usize, usize),
}

/// A record size drawn for one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordSize {
    Check,
    Bytes(usize),
}

/// One TLS record the client writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// The next `n` payload bytes.
    Payload(usize),
    /// The last `payload` bytes followed by a Waste frame carrying `waste` bytes of data
    /// (no Waste frame when `waste` is `None`).
    PayloadThenWaste { payload: usize, waste: Option<usize> },
    /// Only a Waste frame carrying `n` bytes of data.
    Waste(usize),
}

/// The records one write turns into, in order.
pub type RecordPlan = Vec<Piece>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddingScheme {
    raw: Vec<u8>,
    md5_hex: String,
    stop: u32,
    lines: Vec<Vec<SizeSpec>>,
}

impl Default for PaddingScheme {
    fn default() -> PaddingScheme {
        PaddingScheme::parse(DEFAULT_SCHEME.as_bytes()).expect("the default scheme parses")
    }
}

impl PaddingScheme {
    /// Parses a scheme; the md5 is taken over `raw` exactly as given.
    pub fn parse(raw: &[u8]) -> Result<PaddingScheme, SchemeError> {
        let text = String::from_utf8_lossy(raw);
        let mut stop = None;
        let mut numbered: Vec<(u32, Vec<SizeSpec>)> = Vec::new();
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if key == "stop" {
                stop = Some(value.trim().parse::<u32>().map_err(|_| SchemeError::MissingStop)?);
            } else if let Ok(index) = key.trim().parse::<u32>() {
                numbered.push((index, parse_line(value)));
            }
        }
        let stop = stop.ok_or(SchemeError::MissingStop)?;
        // Only lines below `stop` are ever used; a huge `stop` does not allocate lines.
        let used = numbered.iter().filter(|(i, _)| *i < stop).map(|(i, _)| *i as usize + 1);
        let mut lines = vec![Vec::new(); used.max().unwrap_or(0)];
        for (index, specs) in numbered {
            if index < stop {
                lines[index as usize] = specs;
            }
        }
        Ok(PaddingScheme { md5_hex: md5_hex(raw), raw: raw.to_vec(), stop, lines })
    }

    /// Parses a scheme an operator wrote (a file, the config, the admin API): what the
    /// reference would skip without a word is an error naming the line, so a typo does
    /// not quietly turn padding off. Accepts every scheme the reference's own examples
    /// use, including line `0=`, which sizes the authentication block's padding.
    pub fn load(raw: &[u8]) -> Result<PaddingScheme, SchemeError> {
        if raw.len() > MAX_FRAME_DATA {
            return Err(SchemeError::TooLong(raw.len()));
        }
        let bad = |line: usize, why: String| SchemeError::BadLine { line, why };
        let text =
            std::str::from_utf8(raw).map_err(|e| bad(1 + count_lines(&raw[..e.valid_up_to()]), "not UTF-8".into()))?;
        let mut stop = None;
        let mut seen = std::collections::HashSet::new();
        let mut writes = Vec::new();
        for (number, line) in text.split('\n').enumerate().map(|(i, line)| (i + 1, line)) {
            let line = line.strip_suffix('\r').unwrap_or(line).trim();
            if line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(bad(number, format!("`{line}` is not `key=value`")));
            };
            let key = key.trim();
            if !seen.insert(key.to_string()) {
                return Err(bad(number, format!("`{key}=` appears twice")));
            }
            if key == "stop" {
                let value = value.trim().parse::<u32>();
                stop = Some(value.map_err(|_| bad(number, "`stop=` needs a whole number".into()))?);
                continue;
            }
            let index = key.parse::<u32>();
            let index = index.map_err(|_| bad(number, format!("`{key}` is neither `stop` nor a write number")))?;
            writes.push((number, index));
            for item in value.split(',').map(str::trim) {
                if item != "c" && !valid_range(item) {
                    return Err(bad(number, format!("`{item}` is neither `c` nor a size range `min-max` (1 or more)")));
                }
            }
        }
        let stop = stop.ok_or(SchemeError::MissingStop)?;
        if let Some((number, index)) = writes.into_iter().find(|&(_, index)| index >= stop) {
            return Err(bad(number, format!("write {index} is at or past stop={stop}, so it is never used")));
        }
        PaddingScheme::parse(raw)
    }

    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Lowercase hex md5 of the scheme's bytes, as sent in `padding-md5`.
    pub fn md5_hex(&self) -> &str {
        &self.md5_hex
    }

    pub fn stop(&self) -> u32 {
        self.stop
    }

    /// Draws the record sizes of write `index` (the auth block is write 0).
    pub fn record_sizes(&self, index: u32, rng: &mut impl Rng) -> Vec<RecordSize> {
        if index >= self.stop {
            return Vec::new();
        }
        let Some(specs) = self.lines.get(index as usize) else {
            return Vec::new();
        };
        specs
            .iter()
            .map(|spec| match *spec {
                SizeSpec::Check => RecordSize::Check,
                SizeSpec::Range(min, max) if min == max => RecordSize::Bytes(min),
                SizeSpec::Range(min, max) => RecordSize::Bytes(rng.random_range(min..max)),
            })
            .collect()
    }

    /// Length of the zero padding in the authentication block: line 0's first size.
    pub fn auth_padding_len(&self, rng: &mut impl Rng) -> u16 {
        match self.record_sizes(0, rng).first() {
            Some(RecordSize::Bytes(n)) => (*n).min(u16::MAX as usize) as u16,
            _ => 0,
        }
    }

    /// Plans write `index` carrying `payload_len` bytes.
    pub fn plan(&self, index: u32, payload_len: usize, rng: &mut impl Rng) -> RecordPlan {
        plan_records(&self.record_sizes(index, rng), payload_len)
    }
}

/// Walks drawn sizes over a payload, as docs/protocol.md §6 describes.
pub fn plan_records(sizes: &[RecordSize], payload_len: usize) -> RecordPlan {
    let mut plan = Vec::with_capacity(sizes.len() + 1);
    let mut remaining = payload_len;
    for size in sizes {
        match *size {
            RecordSize::Check if remaining == 0 => break,
            RecordSize::Check => continue,
            RecordSize::Bytes(l) if remaining > l => {
                plan.push(Piece::Payload(l));
                remaining -= l;
            }
            RecordSize::Bytes(l) if remaining > 0 => {
                let waste = l.checked_sub(remaining + HEADER_LEN).filter(|&n| n > 0);
                let waste = waste.map(|n| n.min(MAX_FRAME_DATA));
                plan.push(Piece::PayloadThenWaste { payload: remaining, waste });
                remaining = 0;
            }
            RecordSize::Bytes(l) => plan.push(Piece::Waste(l.min(MAX_FRAME_DATA))),
        }
    }
    if remaining > 0 {
        plan.push(Piece::Payload(remaining));
    }
    plan
}

fn parse_line(value: &str) -> Vec<SizeSpec> {
    value
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            if item == "c" {
                return Some(SizeSpec::Check);
            }
            let (min, max) = item.split_once('-')?;
            let (min, max) = (min.trim().parse::<i64>().ok()?, max.trim().parse::<i64>().ok()?);
            if min <= 0 || max <= 0 {
                return None;
            }
            let (min, max) = if min > max { (max, min) } else { (min, max) };
            Some(SizeSpec::Range(min as usize, max as usize))
        })
        .collect()
}

/// `min-max` with both bounds whole numbers of 1 or more (either order).
fn valid_range(item: &str) -> bool {
    let Some((min, max)) = item.split_once('-') else { return false };
    [min, max].iter().all(|bound| bound.trim().parse::<u64>().is_ok_and(|n| n > 0 && n <= MAX_FRAME_DATA as u64))
}

fn count_lines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn default_scheme_md5_matches_the_contract() {
        assert_eq!(PaddingScheme::default().md5_hex(), "75cff2ad89aadf5e257059ee571ebe11");
        assert_eq!(PaddingScheme::default().stop(), 8);
    }

    #[test]
    fn a_trailing_newline_changes_the_md5() {
        let with_newline = format!("{DEFAULT_SCHEME}\n");
        let scheme = PaddingScheme::parse(with_newline.as_bytes()).unwrap();
        assert_ne!(scheme.md5_hex(), PaddingScheme::default().md5_hex());
    }

    #[test]
    fn auth_padding_is_the_first_size_of_line_zero() {
        assert_eq!(PaddingScheme::default().auth_padding_len(&mut rng()), 30);
    }

    #[test]
    fn scheme_without_integer_stop_is_rejected() {
        assert_eq!(PaddingScheme::parse(b"0=30-30"), Err(SchemeError::MissingStop));
        assert_eq!(PaddingScheme::parse(b"stop=x\n0=30-30"), Err(SchemeError::MissingStop));
    }

    #[test]
    fn bad_ranges_are_skipped_and_reversed_ones_swapped() {
        let scheme = PaddingScheme::parse(b"stop=2\r\n1=0-10,abc,50-40,c,5-5,-3-4").unwrap();
        let sizes = scheme.record_sizes(1, &mut rng());
        assert_eq!(sizes.len(), 3);
        assert!(matches!(sizes[0], RecordSize::Bytes(n) if (40..50).contains(&n)));
        assert_eq!(sizes[1], RecordSize::Check);
        assert_eq!(sizes[2], RecordSize::Bytes(5));
    }

    #[test]
    fn loading_accepts_the_schemes_operators_use() {
        let default = PaddingScheme::load(DEFAULT_SCHEME.as_bytes()).unwrap();
        assert_eq!(default, PaddingScheme::default());
        assert_eq!(PaddingScheme::load(DEFAULT_DOWNLINK_SCHEME.as_bytes()).unwrap().stop(), 4);
        // The workaround posted for the reference's line-0 question: numbered from 1, stop=9.
        let shifted = "stop=9\n1=30-30\n2=100-400\n3=400-500,c,500-1000\n4=9-9,500-1000\n8=500-1000\n";
        assert_eq!(PaddingScheme::load(shifted.as_bytes()).unwrap().stop(), 9);
        // `stop` may come last, lines may end in CRLF, blank lines are fine.
        assert!(PaddingScheme::load(b"0=30-30\r\n\r\n1=100-400\r\nstop=2\r\n").is_ok());
    }

    #[test]
    fn loading_names_the_line_the_lenient_parser_would_skip() {
        let refused = |text: &str| match PaddingScheme::load(text.as_bytes()) {
            Err(SchemeError::BadLine { line, why }) => (line, why),
            other => panic!("{text:?} gave {other:?}"),
        };
        assert_eq!(refused("stop=2\n0=30-30\n1=100_400").0, 3);
        assert!(refused("stop=2\n1=0-10").1.contains("`0-10`"));
        assert!(refused("stop=2\n1=100-400,x").1.contains("`x`"));
        assert!(refused("stop=2\n1=100-400\n1=5-5").1.contains("twice"));
        assert!(refused("stop=2\npadding").1.contains("key=value"));
        assert!(refused("stop=2\nfirst=30-30").1.contains("neither `stop`"));
        assert_eq!(refused("2=10-20\nstop=2"), (1, "write 2 is at or past stop=2, so it is never used".into()));
        assert!(refused("stop=eight").1.contains("whole number"));
        assert_eq!(PaddingScheme::load(b"0=30-30"), Err(SchemeError::MissingStop));
        let long = format!("stop=1\n0={}", "1-2,".repeat(20_000));
        assert!(matches!(PaddingScheme::load(long.as_bytes()), Err(SchemeError::TooLong(_))));
    }

    #[test]
    fn writes_from_stop_on_are_not_padded() {
        let scheme = PaddingScheme::default();
        assert_eq!(scheme.plan(8, 1000, &mut rng()), vec![Piece::Payload(1000)]);
        assert_eq!(scheme.plan(8, 0, &mut rng()), vec![]);
    }

    #[test]
    fn plan_follows_the_contract_rules() {
        use RecordSize::*;
        // Larger payload: cut at each size, the rest goes out as is.
        assert_eq!(
            plan_records(&[Bytes(100), Bytes(200)], 500),
            vec![Piece::Payload(100), Piece::Payload(200), Piece::Payload(200)]
        );
        // The payload ends inside a record: filled with a Waste frame.
        assert_eq!(plan_records(&[Bytes(100)], 40), vec![Piece::PayloadThenWaste { payload: 40, waste: Some(53) }]);
        // Too little room for a Waste header: no Waste frame.
        assert_eq!(plan_records(&[Bytes(100)], 95), vec![Piece::PayloadThenWaste { payload: 95, waste: None }]);
        // Nothing left: records of pure padding, until a check mark.
        assert_eq!(
            plan_records(&[Bytes(10), Bytes(300), Check, Bytes(700)], 10),
            vec![Piece::PayloadThenWaste { payload: 10, waste: None }, Piece::Waste(300)]
        );
        assert_eq!(plan_records(&[Check, Bytes(9)], 0), vec![]);
        assert_eq!(plan_records(&[Check, Bytes(9)], 3), vec![Piece::PayloadThenWaste { payload: 3, waste: None }]);
    }

    #[test]
    fn default_write_three_sends_a_nine_byte_record_first() {
        // Line 3 = "9-9,500-1000": a 9-byte record, then a padded one.
        let plan = PaddingScheme::default().plan(3, 20, &mut rng());
        assert_eq!(plan[0], Piece::Payload(9));
        assert!(matches!(plan[1], Piece::PayloadThenWaste { payload: 11, waste: Some(_) }));
    }

    proptest! {
        #[test]
        fn plans_carry_every_payload_byte_once(index in 0u32..10, len in 0usize..5000, seed in any::<u64>()) {
            let plan = PaddingScheme::default().plan(index, len, &mut StdRng::seed_from_u64(seed));
            let carried: usize = plan.iter().map(|p| match p {
                Piece::Payload(n) => *n,
                Piece::PayloadThenWaste { payload, .. } => *payload,
                Piece::Waste(_) => 0,
            }).sum();
            prop_assert_eq!(carried, len);
        }

        #[test]
        fn what_loading_accepts_parses_the_same_on_the_wire(text in "(stop=[0-9]\n)?([0-9]=([0-9]{1,3}-[0-9]{1,3}|c)(,[0-9]{1,3}-[0-9]{1,3})*\n){0,6}(stop=[0-9])?") {
            if let Ok(loaded) = PaddingScheme::load(text.as_bytes()) {
                prop_assert_eq!(Ok(loaded), PaddingScheme::parse(text.as_bytes()));
            }
        }

        #[test]
        fn arbitrary_schemes_never_panic(text in "[-0-9a-z=,\n\r]{0,200}", seed in any::<u64>()) {
            if let Ok(scheme) = PaddingScheme::parse(text.as_bytes()) {
                let mut rng = StdRng::seed_from_u64(seed);
                for index in 0..4 {
                    let _ = scheme.plan(index, 100, &mut rng);
                }
            }
        }
    }
}
