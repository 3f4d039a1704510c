//! A linking window as the instance's task sees it: the code valid now, the callers
//! waiting for one, the pairing-code request (one phone at a time, coalesced), the
//! deadlines, who opened it and who was handed its codes, and the budgets (`budget`)
//! of windows and pairing codes each requester may ask for.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::actor::{Actor, Reply};
use super::budget::Budgets;
use super::state::{Input, State};
use super::{Cause, LinkError, PairCode, Problem, QrCode, Requester, work};

/// How long WhatsApp accepts a pairing code (the client's own constant).
const PAIR_CODE_VALID: Duration = Duration::from_secs(180);

struct Waiter<T> {
    deadline: Instant,
    reply: Reply<T>,
}

/// Callers waiting for the same thing.
struct Waiters<T>(Vec<Waiter<T>>);

impl<T: Clone> Waiters<T> {
    fn push(&mut self, deadline: Instant, reply: Reply<T>) {
        self.0.push(Waiter { deadline, reply });
    }

    fn answer(&mut self, answer: Result<T, LinkError>) {
        for waiter in self.0.drain(..) {
            let _ = waiter.reply.send(answer.clone());
        }
    }

    /// Answers the callers whose wait is over; returns whether anyone is left.
    fn expire(&mut self, now: Instant, error: &LinkError) -> bool {
        let (over, left) = self.0.drain(..).partition(|w| w.deadline <= now);
        self.0 = left;
        Waiters(over).answer(Err(error.clone()));
        !self.0.is_empty()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.0.iter().map(|w| w.deadline).min()
    }
}

/// A pairing-code request for one phone.
struct PairFlow {
    phone: String,
    code: Option<PairCode>,
    waiters: Waiters<String>,
    /// The window's request number once sent to WhatsApp.
    request: Option<u64>,
}

pub(super) struct Window {
    generation: u64,
    qr: Option<Arc<QrCode>>,
    /// The window's client showed a code: it is registered with WhatsApp.
    registered: bool,
    /// The window fails if its client shows no code by then.
    first_code_by: Option<Instant>,
    qr_waiters: Waiters<Arc<QrCode>>,
    pair: Option<PairFlow>,
    /// QR codes ran out but a pairing code is valid until then.
    held_until: Option<Instant>,
    /// Pairing-code requests sent on this window's client, and whether one is still
    /// on its way: one at a time, each a new number.
    requests: u64,
    in_flight: bool,
    /// The last code the client announced, with its validity.
    announced: Option<(String, Instant)>,
    /// Who opened the window, and everyone handed its codes since (the opener too).
    opened_by: Option<Requester>,
    handed: Vec<Requester>,
    budgets: Budgets,
}

impl Window {
    pub(super) fn new(per_minute: u32) -> Self {
        Self {
            generation: 0,
            qr: None,
            registered: false,
            first_code_by: None,
            qr_waiters: Waiters(Vec::new()),
            pair: None,
            held_until: None,
            requests: 0,
            in_flight: false,
            announced: None,
            opened_by: None,
            handed: Vec::new(),
            budgets: Budgets::new(per_minute),
        }
    }

    /// `by` is opening a new window: it is the window's, and handed its codes.
    fn begin(&mut self, by: Requester) {
        self.handed = vec![by.clone()];
        self.opened_by = Some(by);
    }

    /// `by` is handed the window's codes (or waits for them); true if it is new.
    fn hand(&mut self, by: &Requester) -> bool {
        let new = !self.handed.iter().any(|h| h.is(by));
        if new {
            self.handed.push(by.clone());
        }
        new
    }

    /// The link pages handed the window's codes.
    pub(super) fn pages_handed(&self) -> Arc<[Arc<str>]> {
        self.handed
            .iter()
            .filter_map(|h| h.page().cloned())
            .collect()
    }

    /// The link page a link in this window came through: the one page handed its
    /// codes, when nobody else was.
    pub(super) fn linked_through(&self) -> Option<Arc<str>> {
        match self.handed.as_slice() {
            [only] => only.page().cloned(),
            _ => None,
        }
    }

    /// A new client of `generation` is starting for this window.
    pub(super) fn open(&mut self, generation: u64, wait: Duration) {
        self.generation = generation;
        self.qr = None;
        self.registered = false;
        self.first_code_by = Some(Instant::now() + wait);
        self.held_until = None;
        self.requests = 0;
        self.in_flight = false;
        self.announced = None;
    }

    /// The window is over: everyone still waiting hears `answer`.
    pub(super) fn close(&mut self, answer: LinkError) {
        self.fail(answer);
        self.pair = None;
        self.qr = None;
        self.registered = false;
        self.first_code_by = None;
        self.held_until = None;
        self.opened_by = None;
        self.handed.clear();
    }

    pub(super) fn fail(&mut self, error: LinkError) {
        self.qr_waiters.answer(Err(error.clone()));
        if let Some(flow) = &mut self.pair {
            flow.waiters.answer(Err(error));
        }
    }

    pub(super) fn qr(&self) -> Option<Arc<QrCode>> {
        self.qr.clone().filter(|q| q.is_fresh())
    }

    pub(super) fn pair_code(&self) -> Option<PairCode> {
        self.pair.as_ref().and_then(|p| p.code.clone())
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        [
            self.qr_waiters.next_deadline(),
            self.pair.as_ref().and_then(|p| p.waiters.next_deadline()),
            self.first_code_by.filter(|_| !self.registered),
            self.held_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub(super) fn on_qr(&mut self, code: &str, valid_for: Duration) {
        let qr = Arc::new(QrCode::new(code.to_owned(), valid_for));
        self.registered = true;
        self.qr = Some(qr.clone());
        self.qr_waiters.answer(Ok(qr));
    }

    /// WhatsApp's client announced the code it got, with its real validity (this may
    /// come before or after the request's own answer).
    pub(super) fn on_pair_code(&mut self, code: &str, valid_for: Duration) {
        let (grouped, expires) = (group_code(code), Instant::now() + valid_for);
        if let Some(issued) = self
            .pair
            .as_mut()
            .and_then(|p| p.code.as_mut())
            .filter(|c| c.code == grouped)
        {
            issued.expires = expires;
            if self.held_until.is_some() {
                self.held_until = Some(expires);
            }
        }
        self.announced = Some((grouped, expires));
    }

    /// The phone linked: nothing of the window is waited for any more.
    pub(super) fn on_paired(&mut self) {
        self.held_until = None;
        self.first_code_by = None;
    }

    /// The QR codes ran out: a pairing code still valid holds the window until it
    /// expires. Returns whether it does.
    pub(super) fn hold_for_pair_code(&mut self) -> bool {
        self.qr = None;
        self.qr_waiters.answer(Err(LinkError::QrCodesRanOut));
        let valid = self
            .pair_code()
            .map(|c| c.expires)
            .filter(|at| *at > Instant::now());
        self.held_until = valid;
        valid.is_some()
    }

    /// Whether the pairing code that held the window has expired (said once).
    pub(super) fn pair_code_over(&mut self, now: Instant) -> bool {
        let over = self.held_until.is_some_and(|at| at <= now);
        if over {
            self.held_until = None;
        }
        over
    }

    /// Answers the callers whose wait is over with `cause`. Returns whether the window
    /// of `generation` failed: its client showed no code in time.
    pub(super) fn expire(&mut self, now: Instant, generation: u64, cause: &Cause) -> bool {
        let error = LinkError::Unavailable(cause.clone());
        self.qr_waiters.expire(now, &error);
        if let Some(flow) = &mut self.pair {
            flow.waiters.expire(now, &error);
        }
        let passed = !self.registered && self.first_code_by.is_some_and(|at| at <= now);
        if passed {
            self.first_code_by = None;
        }
        let failed = passed && generation == self.generation;
        if failed {
            self.fail(error);
        }
        failed
    }
}

/// WhatsApp shows pairing codes as two groups of four: `ABCD-EFGH`.
pub(super) fn group_code(code: &str) -> String {
    if code.len() == 8 && code.is_ascii() {
        format!("{}-{}", &code[..4], &code[4..])
    } else {
        code.to_owned()
    }
}

impl Actor {
    /// Why a linking request is refused in this state, if it is.
    fn link_refusal(&self) -> Option<LinkError> {
        match self.state {
            State::Connected => Some(LinkError::AlreadyConnected),
            State::Reconnecting | State::Stopped => Some(LinkError::SessionStored),
            State::SessionMissing => Some(LinkError::Problem(Problem::SessionMissing)),
            State::Unlinking => Some(LinkError::Unlinking),
            // Paired, logging in: it will not link again.
            State::Linking if self.link.is_some() => Some(LinkError::AlreadyConnected),
            State::Linking | State::NoSession => None,
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.ctx.link_wait
    }

    pub(super) async fn ask_qr(&mut self, by: Requester, reply: Reply<Arc<QrCode>>) {
        if let Some(refused) = self.link_refusal() {
            let _ = reply.send(Err(refused));
            return;
        }
        if self.state == State::Linking {
            self.handed(&by);
            match self.window.qr() {
                Some(qr) => drop(reply.send(Ok(qr))),
                None if self.window.held_until.is_some() => {
                    drop(reply.send(Err(LinkError::QrCodesRanOut)))
                }
                None => self.window.qr_waiters.push(self.deadline(), reply),
            }
            return;
        }
        if let Err(refused) = self.window.budgets.take(&by, false, Instant::now()) {
            let _ = reply.send(Err(refused));
            return;
        }
        self.window.begin(by);
        self.window.qr_waiters.push(self.deadline(), reply);
        self.apply(Input::OpenLink).await;
    }

    pub(super) async fn ask_pair(&mut self, phone: String, by: Requester, reply: Reply<String>) {
        if let Some(refused) = self.link_refusal() {
            let _ = reply.send(Err(refused));
            return;
        }
        let deadline = self.deadline();
        if let Some(flow) = self.window.pair.as_mut().filter(|f| f.phone == phone) {
            match &flow.code {
                Some(code) if code.expires > Instant::now() + Duration::from_secs(1) => {
                    let _ = reply.send(Ok(code.code.clone()));
                    return self.handed(&by);
                }
                None => {
                    flow.waiters.push(deadline, reply);
                    return self.handed(&by);
                }
                Some(_) => {} // expired: ask WhatsApp again
            }
        }
        match self.window.budgets.take(&by, true, Instant::now()) {
            Ok(counted) => self.store_page_codes(counted),
            Err(refused) => {
                let _ = reply.send(Err(refused));
                return;
            }
        }
        if let Some(mut previous) = self.window.pair.take() {
            previous
                .waiters
                .answer(Err(LinkError::Replaced(phone.clone())));
        }
        let mut flow = PairFlow {
            phone,
            code: None,
            waiters: Waiters(Vec::new()),
            request: None,
        };
        flow.waiters.push(deadline, reply);
        self.window.pair = Some(flow);
        if self.state == State::Linking {
            self.window.hand(&by);
            self.request_pair_code();
            self.publish();
        } else {
            self.window.begin(by);
            self.apply(Input::OpenLink).await;
        }
    }

    /// `by` joined the open window: its stream shows the window's codes from now on.
    fn handed(&mut self, by: &Requester) {
        if self.window.hand(by) {
            self.publish();
        }
    }

    /// Records, in the background, the pairing codes a link page was given.
    fn store_page_codes(&self, counted: Option<(Arc<str>, u32)>) {
        let Some((page, codes)) = counted else { return };
        let (store, instance) = (self.ctx.store.clone(), self.record.id.clone());
        self.ctx.tracker.spawn(async move {
            let stored = tokio::time::timeout(
                work::STORE_TIMEOUT,
                store.count_link_page_codes(&page, codes),
            )
            .await;
            if !matches!(stored, Ok(Ok(()))) {
                tracing::error!(instance.id = %instance, outcome = ?stored, "could not record a link page's pairing codes; it may get more after a restart");
            }
        });
    }

    /// Closes the linking window, if one is open and nothing is linked yet; a link page
    /// may close only a window it opened.
    pub(super) async fn stop_linking(&mut self, by: Requester, reply: Reply<()>) {
        if self.state == State::Linking && self.link.is_none() {
            let opener = self.window.opened_by.as_ref();
            if by.page().is_some() && !opener.is_some_and(|o| o.is(&by)) {
                let _ = reply.send(Err(LinkError::NotStartedHere));
                return;
            }
            self.apply(Input::Disconnect).await;
        }
        let _ = reply.send(Ok(()));
    }

    /// Asks WhatsApp for the pending pairing code once the window's client is
    /// registered and no other request is on its way; the answer comes back as
    /// [`work::Work::PairCode`].
    pub(super) fn request_pair_code(&mut self) {
        let Some(running) = &self.client else { return };
        let window = &mut self.window;
        if !window.registered || window.in_flight {
            return;
        }
        let Some(flow) = window.pair.as_mut().filter(|f| f.request.is_none()) else {
            return;
        };
        window.requests += 1;
        window.in_flight = true;
        flow.request = Some(window.requests);
        let deadline = flow
            .waiters
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + self.ctx.link_wait);
        self.ctx.tracker.spawn(work::request_pair_code(
            running.client.clone(),
            self.generation,
            window.requests,
            flow.phone.clone(),
            window.requests > 1,
            deadline,
            self.work_tx.clone(),
        ));
    }

    pub(super) fn on_pair_code(
        &mut self,
        generation: u64,
        request: u64,
        result: Result<String, LinkError>,
    ) {
        if generation != self.generation || self.state != State::Linking {
            return;
        }
        let window = &mut self.window;
        window.in_flight = false;
        if let Some(flow) = window.pair.as_mut().filter(|f| f.request == Some(request)) {
            match result {
                Ok(code) => {
                    let expires = match &window.announced {
                        Some((announced, at)) if *announced == code => *at,
                        _ => Instant::now() + PAIR_CODE_VALID,
                    };
                    flow.code = Some(PairCode {
                        phone: flow.phone.clone(),
                        code: code.clone(),
                        expires,
                    });
                    if window.held_until.is_some() {
                        window.held_until = Some(expires);
                    }
                    flow.waiters.answer(Ok(code));
                }
                Err(e) => {
                    flow.waiters.answer(Err(e));
                    window.pair = None;
                }
            }
        }
        // A request that was replaced meanwhile is over: the newer one goes now.
        self.request_pair_code();
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_grouped_four_and_four() {
        assert_eq!(group_code("ABCDEFGH"), "ABCD-EFGH");
        assert_eq!(group_code("ABC"), "ABC");
    }

    fn page(id: &str, pair_codes: u32) -> Requester {
        Requester::Page {
            id: id.into(),
            pair_codes,
        }
    }

    #[test]
    fn a_link_is_through_a_page_only_when_that_page_alone_was_handed_codes() {
        let mut window = Window::new(1);
        window.begin(page("a", 0));
        window.hand(&page("a", 3));
        assert_eq!(window.linked_through(), Some("a".into()));
        window.hand(&Requester::Operator);
        assert_eq!(window.linked_through(), None);
        window.begin(Requester::Operator);
        assert_eq!(window.linked_through(), None);
        window.begin(page("b", 0));
        window.hand(&page("a", 0));
        assert_eq!(window.linked_through(), None);
    }
}
