//! Address ranges for route rules and rule sets: sorted, merged intervals per family, so
//! a lookup is a binary search however many ranges a list holds.

use std::net::IpAddr;

use crate::server::policy::{Cidr, normalise};

/// Ranges of addresses; IPv4 inside IPv6 counts as IPv4 (see [`normalise`]).
#[derive(Debug, Default, Clone)]
pub struct CidrSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
    sorted: bool,
}

impl CidrSet {
    pub fn insert(&mut self, range: Cidr) {
        match range.bounds() {
            (IpAddr::V4(first), IpAddr::V4(last)) => self.v4.push((first.to_bits(), last.to_bits())),
            (IpAddr::V6(first), IpAddr::V6(last)) => self.v6.push((first.to_bits(), last.to_bits())),
            _ => unreachable!("a range's bounds share its family"),
        }
        self.sorted = false;
    }

    /// Sorts and merges the ranges; [`CidrSet::contains`] needs it after inserts.
    pub fn seal(&mut self) {
        merge(&mut self.v4, |v| v.saturating_add(1));
        merge(&mut self.v6, |v| v.saturating_add(1));
        self.sorted = true;
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        debug_assert!(self.sorted || self.is_empty(), "seal() after inserting");
        match normalise(ip) {
            IpAddr::V4(ip) => within(&self.v4, ip.to_bits()),
            IpAddr::V6(ip) => within(&self.v6, ip.to_bits()),
        }
    }
}

/// Sorts `ranges` and joins those that overlap or touch (`next` is the value after one).
fn merge<T: Ord + Copy>(ranges: &mut Vec<(T, T)>, next: fn(T) -> T) {
    ranges.sort_unstable();
    let mut merged: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for &(first, last) in ranges.iter() {
        match merged.last_mut() {
            Some((_, end)) if first <= next(*end) => *end = (*end).max(last),
            _ => merged.push((first, last)),
        }
    }
    *ranges = merged;
}

fn within<T: Ord + Copy>(ranges: &[(T, T)], value: T) -> bool {
    // The last range starting at or before `value`.
    let after = ranges.partition_point(|&(first, _)| first <= value);
    after > 0 && value <= ranges[after - 1].1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[&str]) -> CidrSet {
        let mut set = CidrSet::default();
        ranges.iter().for_each(|r| set.insert(Cidr::parse(r).unwrap()));
        set.seal();
        set
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn addresses_inside_any_range_match_and_others_do_not() {
        let ranges = set(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]);
        assert!(ranges.contains(ip("10.255.255.255")));
        assert!(ranges.contains(ip("192.0.2.7")));
        assert!(!ranges.contains(ip("192.0.2.8")));
        assert!(!ranges.contains(ip("11.0.0.0")));
        assert!(ranges.contains(ip("2001:db8:ffff::1")));
        assert!(!ranges.contains(ip("2001:db9::1")));
        assert!(ranges.contains(ip("::ffff:10.1.2.3")), "IPv4 inside IPv6 is IPv4");
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let ranges = set(&["10.0.0.0/9", "10.128.0.0/9", "10.1.0.0/16", "0.0.0.0/0"]);
        assert_eq!(ranges.v4, vec![(0, u32::MAX)]);
        assert!(ranges.contains(ip("255.255.255.255")));
        let apart = set(&["10.0.0.0/24", "10.0.2.0/24"]);
        assert_eq!(apart.v4.len(), 2);
        assert!(!apart.contains(ip("10.0.1.1")));
    }
}
