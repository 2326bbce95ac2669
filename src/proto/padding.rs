//! The padding scheme and the client's record plan.
//!
//! A scheme says, for each of the client's first `stop` writes, which TLS record sizes
//! to produce: payload is cut to those sizes and short records are filled with Waste
//! frames, so the first packets of a session do not reveal the payload's sizes.
//! Servers do not pad. This module only plans; the session does the writing.

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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemeError {
    #[error("padding scheme has no integer `stop=` line")]
    MissingStop,
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
