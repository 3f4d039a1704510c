//! The budgets of linking requests: how many new windows and pairing codes the operator
//! and each link page may ask WhatsApp for, a minute and (pages) over their life.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{LinkError, PAGE_PAIR_CODES, Requester};

/// What each requester may ask for: new windows and pairing codes, `per_minute` for
/// the operator and as many for each link page apart (so pages never use up the
/// operator's), and [`PAGE_PAIR_CODES`] pairing codes per page over its life.
pub(super) struct Budgets {
    per_minute: u32,
    operator: Rate,
    pages: HashMap<Arc<str>, PageBudget>,
}

struct PageBudget {
    rate: Rate,
    pair_codes: u32,
}

impl Budgets {
    pub(super) fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            operator: Rate::new(per_minute),
            pages: HashMap::new(),
        }
    }

    /// Counts a new window, or a pairing-code request (`pair_code`), for `by`, or says
    /// why it is refused. For a page's pairing code, returns the page and the codes it
    /// was given now, to be stored.
    pub(super) fn take(
        &mut self,
        by: &Requester,
        pair_code: bool,
        now: Instant,
    ) -> Result<Option<(Arc<str>, u32)>, LinkError> {
        let (id, stored) = match by {
            Requester::Operator => {
                self.operator.take(now).map_err(LinkError::RateLimited)?;
                return Ok(None);
            }
            Requester::Page { id, pair_codes } => (id, *pair_codes),
        };
        // Pages quiet for a minute are forgotten here: their count is in the store.
        self.pages.retain(|_, page| !page.rate.idle(now));
        let per_minute = self.per_minute;
        let page = self.pages.entry(id.clone()).or_insert_with(|| PageBudget {
            rate: Rate::new(per_minute),
            pair_codes: 0,
        });
        page.pair_codes = page.pair_codes.max(stored);
        if pair_code && page.pair_codes >= PAGE_PAIR_CODES {
            return Err(LinkError::PageCodesUsedUp);
        }
        page.rate.take(now).map_err(LinkError::RateLimited)?;
        if !pair_code {
            return Ok(None);
        }
        page.pair_codes += 1;
        Ok(Some((id.clone(), page.pair_codes)))
    }
}

/// At most `per_minute` events in any minute.
struct Rate {
    per_minute: usize,
    recent: VecDeque<Instant>,
}

impl Rate {
    fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1) as usize,
            recent: VecDeque::new(),
        }
    }

    /// Forgets the events more than a minute old; true if none is left.
    fn idle(&mut self, now: Instant) -> bool {
        while self.recent.front().is_some_and(|t| now - *t >= MINUTE) {
            self.recent.pop_front();
        }
        self.recent.is_empty()
    }

    /// Counts one event, or says how long until one is allowed.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.idle(now);
        if self.recent.len() >= self.per_minute {
            let oldest = self.recent[0];
            return Err(MINUTE - (now - oldest));
        }
        self.recent.push_back(now);
        Ok(())
    }
}

const MINUTE: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_allows_so_many_a_minute_and_says_how_long_to_wait() {
        let mut rate = Rate::new(2);
        let t0 = Instant::now();
        assert!(rate.take(t0).is_ok());
        assert!(rate.take(t0 + Duration::from_secs(10)).is_ok());
        assert_eq!(
            rate.take(t0 + Duration::from_secs(15)),
            Err(Duration::from_secs(45))
        );
        assert!(rate.take(t0 + Duration::from_secs(60)).is_ok());
    }

    fn page(id: &str, pair_codes: u32) -> Requester {
        Requester::Page {
            id: id.into(),
            pair_codes,
        }
    }

    #[test]
    fn each_link_page_has_a_budget_apart_from_the_operator_s() {
        let mut budgets = Budgets::new(1);
        let t0 = Instant::now();
        let (a, b) = (page("a", 0), page("b", 0));
        assert_eq!(budgets.take(&a, false, t0), Ok(None));
        assert_eq!(
            budgets.take(&a, true, t0),
            Err(LinkError::RateLimited(MINUTE))
        );
        assert_eq!(budgets.take(&b, false, t0), Ok(None));
        assert_eq!(budgets.take(&Requester::Operator, true, t0), Ok(None));
        assert_eq!(
            budgets.take(&Requester::Operator, false, t0),
            Err(LinkError::RateLimited(MINUTE))
        );
    }

    #[test]
    fn a_link_page_is_given_so_many_pairing_codes_over_its_life() {
        let mut budgets = Budgets::new(100);
        let t0 = Instant::now();
        // Nine given before a restart, as stored: one more.
        assert_eq!(
            budgets.take(&page("a", PAGE_PAIR_CODES - 1), true, t0),
            Ok(Some(("a".into(), PAGE_PAIR_CODES)))
        );
        // A count read before that one was stored does not give more.
        assert_eq!(
            budgets.take(&page("a", PAGE_PAIR_CODES - 1), true, t0),
            Err(LinkError::PageCodesUsedUp)
        );
        // Nor does time; QR codes it may still ask for.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(
            budgets.take(&page("a", PAGE_PAIR_CODES), true, later),
            Err(LinkError::PageCodesUsedUp)
        );
        assert_eq!(
            budgets.take(&page("a", PAGE_PAIR_CODES), false, later),
            Ok(None)
        );
    }
}
