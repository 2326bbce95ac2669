//! Domain matching for route rules and rule sets: full names and suffixes in hash sets.
//!
//! A name matches a suffix `example.com` when it is `example.com` or ends in
//! `.example.com`; matching walks the name's own suffixes, one hash lookup per label, so
//! the cost follows the name's length and not the list's (1,000,000 suffixes cost what 10
//! do; see benches/route.rs).

use std::collections::HashSet;

/// Names and suffixes, lower case without a trailing dot.
#[derive(Debug, Default, Clone)]
pub struct DomainSet {
    full: HashSet<Box<str>>,
    suffixes: HashSet<Box<str>>,
}

impl DomainSet {
    pub fn insert_full(&mut self, name: &str) {
        self.full.insert(canonical(name).into());
    }

    pub fn insert_suffix(&mut self, suffix: &str) {
        self.suffixes.insert(canonical(suffix.trim_start_matches('.')).into());
    }

    pub fn len(&self) -> usize {
        self.full.len() + self.suffixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `name` (already canonical: see [`canonical`]) is in the set.
    pub fn matches(&self, name: &str) -> bool {
        if self.full.contains(name) {
            return true;
        }
        if self.suffixes.is_empty() {
            return false;
        }
        let mut rest = name;
        loop {
            if self.suffixes.contains(rest) {
                return true;
            }
            match rest.find('.') {
                Some(dot) => rest = &rest[dot + 1..],
                None => return false,
            }
        }
    }
}

/// A name as the sets hold it: lower case, no trailing dot (`Example.COM.` is `example.com`).
pub fn canonical(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suffix_matches_itself_and_its_subdomains_only() {
        let mut set = DomainSet::default();
        set.insert_suffix("example.com");
        assert!(set.matches("example.com"));
        assert!(set.matches("a.b.example.com"));
        assert!(!set.matches("notexample.com"), "a suffix is whole labels");
        assert!(!set.matches("example.com.evil"));
        assert!(!set.matches("com"));
    }

    #[test]
    fn a_full_name_matches_only_itself() {
        let mut set = DomainSet::default();
        set.insert_full("Tracker.Example.ORG.");
        assert!(set.matches(&canonical("tracker.example.org")));
        assert!(!set.matches("a.tracker.example.org"));
        assert!(!set.matches("example.org"));
    }

    #[test]
    fn names_are_compared_without_case_or_trailing_dot() {
        let mut set = DomainSet::default();
        set.insert_suffix(".Ads.Example");
        assert!(set.matches(&canonical("X.ADS.example.")));
        assert_eq!(set.len(), 1);
    }
}
