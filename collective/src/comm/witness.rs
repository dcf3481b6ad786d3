//! Agreeing on the root cause: when a rank dies, the first survivor to notice records which
//! rank is gone before it gives up (and its own links close); a survivor whose link breaks
//! later — often to a neighbour that gave up, not to the dead rank — finds that record and
//! names the dead rank. In a job the record lives in the agent store (`compare_set`, so the
//! first write wins); ranks as threads share a [`LocalWitness`].
//!
//! # Trust
//! A record read back is parsed and range-checked; a malformed one is ignored (the rank then
//! reports its own view).

use std::fmt;
use std::sync::Mutex;

/// Where the ranks of a job agree on the first failure.
pub trait Witness: Send + Sync + fmt::Debug {
    /// Records `cause` unless a cause is recorded already; the recorded one (`None` when the
    /// witness cannot be reached; bounded briefly).
    fn first(&self, cause: &str) -> Option<String>;
}

/// A witness in this process (for ranks as threads).
#[derive(Debug, Default)]
pub struct LocalWitness(Mutex<Option<String>>);

impl Witness for LocalWitness {
    fn first(&self, cause: &str) -> Option<String> {
        let mut first = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(first.get_or_insert_with(|| cause.to_owned()).clone())
    }
}

/// One failure as recorded: `"<lost> <reporter> <during>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) lost: usize,
    pub(super) reporter: usize,
    pub(super) during: String,
}

impl Record {
    pub(super) fn parse(text: &str) -> Option<Self> {
        let mut words = text.splitn(3, ' ');
        Some(Self {
            lost: words.next()?.parse().ok()?,
            reporter: words.next()?.parse().ok()?,
            during: words.next()?.to_owned(),
        })
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.lost, self.reporter, self.during)
    }
}

impl From<Record> for super::Failure {
    fn from(r: Record) -> Self {
        Self::PeerLost {
            reporter: r.reporter,
            lost: r.lost,
            during: r.during,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_the_first_wins() {
        let r = Record {
            lost: 3,
            reporter: 1,
            during: "all_reduce(F32 × 4, Sum)".into(),
        };
        assert_eq!(Record::parse(&r.to_string()), Some(r.clone()));
        assert_eq!(Record::parse("x 1 y"), None);
        assert_eq!(Record::parse("1"), None);
        let w = LocalWitness::default();
        assert_eq!(w.first("a").as_deref(), Some("a"));
        assert_eq!(w.first("b").as_deref(), Some("a"));
    }
}
