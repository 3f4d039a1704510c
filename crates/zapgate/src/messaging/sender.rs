//! One task per instance sends its queue, oldest first, one message at a time: each
//! waits for WhatsApp's ack before the next leaves, so messages arrive in the order
//! they were queued. A message is marked on its way before it goes on the wire; one
//! without an ack (a drop, a crash) is sent again with the same WhatsApp id, which
//! WhatsApp drops as a duplicate if the first one arrived.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use whatsapp_rust::Jid;
use whatsapp_rust::client::Client;
use whatsapp_rust::proto_helpers::MessageBuilderExt as _;
use whatsapp_rust::send::{EditOptions, SendOptions};
use whatsapp_rust::waproto::whatsapp as wa;

use super::zapi::{self, errors};
use super::{Hub, Lane, Line, Told};
use crate::store::{Outbound, Status, StoreError};

/// Failures of one message while its number stayed connected (WhatsApp did not ack
/// it in time, or the client could not send it) before it is given up with Z-API's
/// error. A drop of the connection does not count: the message waits for the next one.
const MAX_STRIKES: u32 = 8;
/// The longest wait after a message could not be sent.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// With nothing queued, the queue is looked at again after this: a new message wakes
/// the sender at once, so this only bounds how long one queued in a race with an
/// unlink may wait to be failed.
const IDLE: Duration = Duration::from_secs(600);
/// After a failure to reach WhatsApp or the database.
const BACKOFF: Duration = Duration::from_secs(2);
/// Messages read from the queue at once: the next ones go without reading it again
/// while each before them is settled (a deletion meanwhile is still seen, when the
/// message is marked on its way).
const READ_AHEAD: u32 = 16;
/// How long an answer about a number is believed.
const KNOWN_ON_WHATSAPP: Duration = Duration::from_secs(24 * 3600);
const KNOWN_NOT_ON_WHATSAPP: Duration = Duration::from_secs(3600);
/// Numbers remembered per instance before the memory starts again.
const KNOWN_MAX: usize = 10_000;

enum Step {
    /// Look at the queue again now.
    Again,
    /// Wait for a wake-up, a change of line, or this long.
    Wait(Duration),
}

/// What became of a message on the wire.
enum Ack {
    /// WhatsApp took it.
    Taken,
    /// WhatsApp refused it, with this code.
    Refused(String),
    /// No ack in time while connected.
    Late,
    /// The connection changed before the ack.
    Dropped,
}

/// What the sender keeps between messages.
struct Sender {
    hub: Arc<Hub>,
    lane: Arc<Lane>,
    /// When the last message was taken by WhatsApp.
    last_sent: Option<Instant>,
    /// The pause chosen before a message (by its queue position), once chosen.
    pause: Option<(i64, Instant)>,
    /// Numbers asked about: the account's id, or `None` when not on WhatsApp.
    known: HashMap<String, (Option<Jid>, Instant)>,
    /// The head's failures while connected (its queue position, how many).
    strikes: (i64, u32),
    /// The queue's next messages, as read; dropped unless the one before them settled.
    ahead: std::collections::VecDeque<Outbound>,
    /// Messages settled (sent, or given up) so far.
    settled: u64,
    /// The head went back to `ahead` to wait for its pause.
    paused: bool,
}

pub(super) async fn run(hub: Arc<Hub>, lane: Arc<Lane>, shutdown: CancellationToken) {
    let mut line = lane.line.clone();
    let stop = lane.stop.clone();
    let mut sender = Sender {
        hub,
        lane,
        last_sent: None,
        pause: None,
        known: HashMap::new(),
        strikes: (0, 0),
        ahead: std::collections::VecDeque::new(),
        settled: 0,
        paused: false,
    };
    loop {
        let current = line.borrow_and_update().clone();
        if !matches!(current, Line::Up(_)) {
            // Read again when back: the queue may change meanwhile.
            sender.ahead.clear();
        }
        let work = async {
            match current {
                Line::Unlinked => sender.fail_all().await,
                Line::Down => Step::Wait(IDLE),
                Line::Up(client) => sender.next(&client, &line).await,
            }
        };
        // A stop mid-send is safe: a message on its way is sent again, with its id, by
        // the next sender of this instance.
        let step = tokio::select! {
            step = work => step,
            () = shutdown.cancelled() => return,
            () = stop.cancelled() => return,
        };
        let wait = match step {
            Step::Again => continue,
            Step::Wait(wait) => wait,
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = stop.cancelled() => return,
            changed = line.changed() => if changed.is_err() { return },
            () = sender.lane.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

impl Sender {
    fn instance(&self) -> &str {
        &self.lane.instance
    }

    /// Sends the head of the queue, if there is one and its pause is over.
    /// `line` is the receiver the run loop read the line from: a change since then is
    /// seen here.
    async fn next(&mut self, client: &Arc<Client>, line: &watch::Receiver<Line>) -> Step {
        let settled = self.settled;
        let step = self.send_head(client, line.clone()).await;
        if self.settled == settled && !std::mem::take(&mut self.paused) {
            // The head stays (its attempts changed), or the queue did: read it again.
            self.ahead.clear();
        }
        step
    }

    async fn send_head(&mut self, client: &Arc<Client>, mut line: watch::Receiver<Line>) -> Step {
        if self.ahead.is_empty() {
            match self
                .hub
                .store
                .queue_front(self.instance(), READ_AHEAD)
                .await
            {
                Ok(front) => self.ahead.extend(front),
                Err(e) => return self.store_failed(e),
            }
        }
        let Some(head) = self.ahead.pop_front() else {
            return Step::Wait(IDLE);
        };
        if let Some(wait) = self.pause_before(&head) {
            self.ahead.push_front(head);
            self.paused = true;
            return Step::Wait(wait);
        }
        let jid = match self.account_of(client, &head.phone).await {
            Ok(Some(jid)) => jid,
            Ok(None) => return self.fail(&head, errors::NOT_ON_WHATSAPP).await,
            Err(why) => {
                tracing::info!(instance.id = %self.instance(), error = %why, "could not ask whether a number is on WhatsApp; trying again");
                return Step::Wait(BACKOFF);
            }
        };
        if head.attempts == 0 && head.typing_ms > 0 {
            let _ = client.chatstate().send_composing(&jid).await;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(head.typing_ms as u64)) => {}
                // Dropped, unlinked, or another number linked: look at the line again.
                changed = line.changed() => return match changed {
                    Ok(()) => Step::Again,
                    // The instance is going: the run loop sees it and ends.
                    Err(_) => Step::Wait(BACKOFF),
                },
            }
        }
        let message = self.content(client, &head).await;
        // The line changed while the number was looked up or the text marked: it is
        // not sent from a connection that may be another number's (and, not marked as
        // sending yet, it keeps its pause and typing for when it goes).
        match line.has_changed() {
            Ok(false) => {}
            Ok(true) => return Step::Again,
            // The instance is going: the run loop sees it and ends.
            Err(_) => return Step::Wait(BACKOFF),
        }
        let ack = self.lane.expect_ack(&head.message_id);
        match self.hub.store.message_sending(&head).await {
            Ok(true) => {}
            // Deleted from the queue meanwhile: it does not go.
            Ok(false) => {
                self.lane.forget_ack(&head.message_id);
                return Step::Again;
            }
            Err(e) => {
                self.lane.forget_ack(&head.message_id);
                return self.store_failed(e);
            }
        }
        let sent = match &head.edit_of {
            Some(original) => client
                .edit_message_with_options(
                    jid.clone(),
                    original.clone(),
                    message,
                    EditOptions::default().with_stanza_id(&head.message_id),
                )
                .await
                .map(|_| ()),
            None => client
                .send_message_with_options(
                    jid.clone(),
                    message,
                    SendOptions::default().with_message_id(&head.message_id),
                )
                .await
                .map(|_| ()),
        };
        if let Err(e) = sent {
            self.lane.forget_ack(&head.message_id);
            tracing::warn!(instance.id = %self.instance(), message.id = %head.message_id, error = %e, "a message could not be sent");
            if line.has_changed().unwrap_or(true) || !client.is_connected() {
                return Step::Wait(BACKOFF);
            }
            let strikes = self.strike(&head);
            if strikes >= MAX_STRIKES {
                return self.fail(&head, errors::FAILED).await;
            }
            return Step::Wait((BACKOFF * 2u32.pow(strikes - 1)).min(MAX_BACKOFF));
        }
        let ack = tokio::select! {
            acked = tokio::time::timeout(self.hub.config.ack_wait, ack) => match acked {
                Ok(Ok(None)) => Ack::Taken,
                Ok(Ok(Some(code))) => Ack::Refused(code),
                _ => Ack::Late,
            },
            _ = line.changed() => Ack::Dropped,
        };
        match ack {
            Ack::Taken => self.sent(&head).await,
            Ack::Refused(code) => {
                tracing::warn!(instance.id = %self.instance(), message.id = %head.message_id, code, "WhatsApp refused a message");
                self.fail(&head, zapi::refusal(&code)).await
            }
            Ack::Late | Ack::Dropped => {
                self.lane.forget_ack(&head.message_id);
                if matches!(ack, Ack::Late) && self.strike(&head) >= MAX_STRIKES {
                    return self.fail(&head, errors::TIMEOUT).await;
                }
                tracing::info!(instance.id = %self.instance(), message.id = %head.message_id, "no ack from WhatsApp; the message goes again with the same id");
                Step::Again
            }
        }
    }

    /// One more failure of the head while connected; how many it has had.
    fn strike(&mut self, head: &Outbound) -> u32 {
        let (seq, strikes) = &mut self.strikes;
        if *seq != head.seq {
            (*seq, *strikes) = (head.seq, 0);
        }
        *strikes += 1;
        *strikes
    }

    /// How long the head must still wait after the previous message: its own
    /// `delayMessage`, or the gateway's pacing. A first try only; a message whose
    /// earlier try went out is not paused again.
    fn pause_before(&mut self, head: &Outbound) -> Option<Duration> {
        let last = self.last_sent?;
        if head.attempts > 0 {
            return None;
        }
        let not_before = match self.pause {
            Some((seq, at)) if seq == head.seq => at,
            _ => {
                let pause = match head.delay_ms {
                    Some(ms) => Duration::from_millis(ms.max(0) as u64),
                    None => self.hub.config.pacing.pick(),
                };
                let at = last + pause;
                self.pause = Some((head.seq, at));
                at
            }
        };
        let now = Instant::now();
        (not_before > now).then(|| not_before - now)
    }

    /// The account behind a number, asked of WhatsApp (and remembered): the id it
    /// answers with (which may differ from the number as given), or `None` when the
    /// number is not on WhatsApp.
    async fn account_of(&mut self, client: &Client, phone: &str) -> Result<Option<Jid>, String> {
        if let Some(lid) = phone.strip_suffix("@lid") {
            return Ok(Some(Jid::lid(lid)));
        }
        if let Some((answer, until)) = self.known.get(phone) {
            if *until > Instant::now() {
                return Ok(answer.clone());
            }
        }
        let asked = client
            .contacts()
            .is_on_whatsapp(&[Jid::pn(phone)])
            .await
            .map_err(|e| e.to_string())?;
        let answer = asked
            .into_iter()
            .find(|r| r.is_registered)
            .map(|r| r.pn_jid.unwrap_or(r.jid));
        let keep = match answer {
            Some(_) => KNOWN_ON_WHATSAPP,
            None => KNOWN_NOT_ON_WHATSAPP,
        };
        if self.known.len() >= KNOWN_MAX {
            self.known.clear();
        }
        self.known
            .insert(phone.to_owned(), (answer.clone(), Instant::now() + keep));
        Ok(answer)
    }

    /// The message itself: its text, quoting the message it answers when we know it.
    async fn content(&self, client: &Client, head: &Outbound) -> wa::Message {
        let Some(quoted_id) = &head.reply_to else {
            return wa::Message::text(head.text.clone());
        };
        let store = &self.hub.store;
        let quoted = match store.outbound_by_id(self.instance(), quoted_id).await {
            Ok(Some(ours)) => Some((client.pn().map(|j| j.to_non_ad().to_string()), ours.text)),
            _ => match store.inbound_text(self.instance(), quoted_id).await {
                Ok(Some((sender, text))) => Some((Some(sender), text)),
                _ => None,
            },
        };
        let mut context = wa::ContextInfo {
            stanza_id: Some(quoted_id.clone()),
            ..Default::default()
        };
        if let Some((participant, text)) = quoted {
            context.participant = participant;
            context.quoted_message =
                whatsapp_rust::buffa::MessageField::some(wa::Message::text(text));
        }
        wa::Message::text_with_context(head.text.clone(), context)
    }

    /// WhatsApp took the message: DeliveryCallback, and status SENT.
    async fn sent(&mut self, head: &Outbound) -> Step {
        let (id, now) = (self.instance().to_owned(), crate::unix_millis());
        let delivery = zapi::delivery(&id, &head.phone, &head.zaap_id, &head.message_id, None, now);
        let status = zapi::status(
            &id,
            Status::Sent,
            std::slice::from_ref(&head.message_id),
            &head.phone,
            now,
        );
        self.last_sent = Some(Instant::now());
        match self
            .hub
            .store
            .message_sent(head.seq, now, &delivery, &status)
            .await
        {
            Ok(written) => {
                self.settled += 1;
                self.hub.webhooks_due.notify_one();
                let told = [
                    Told::Sent {
                        waited_ms: now - head.created_at,
                    },
                    Told::Status(Status::Sent),
                ];
                for (told, event) in told.into_iter().zip([&delivery, &status]).take(written) {
                    self.hub.note(told, event);
                }
                Step::Again
            }
            // Sent again later with the same id: a duplicate WhatsApp drops.
            Err(e) => self.store_failed(e),
        }
    }

    /// The message will never leave: DeliveryCallback with Z-API's error text.
    async fn fail(&mut self, head: &Outbound, error: &str) -> Step {
        let (id, now) = (self.instance().to_owned(), crate::unix_millis());
        let delivery = zapi::delivery(
            &id,
            &head.phone,
            &head.zaap_id,
            &head.message_id,
            Some(error),
            now,
        );
        tracing::warn!(instance.id = %id, message.id = %head.message_id, error, "a message was not sent");
        match self
            .hub
            .store
            .message_failed(head.seq, error, std::slice::from_ref(&delivery))
            .await
        {
            Ok(written) => {
                self.settled += 1;
                if written {
                    self.hub.webhooks_due.notify_one();
                    self.hub.note(Told::NotSent, &delivery);
                }
                Step::Again
            }
            Err(e) => self.store_failed(e),
        }
    }

    /// The number was unlinked: what waited will never leave from it (nor from a
    /// number linked later).
    async fn fail_all(&mut self) -> Step {
        loop {
            match self.hub.store.queue_head(self.instance()).await {
                Ok(Some(head)) => {
                    if let Step::Wait(wait) = self.fail(&head, errors::UNLINKED).await {
                        return Step::Wait(wait);
                    }
                }
                Ok(None) => return Step::Wait(IDLE),
                Err(e) => return self.store_failed(e),
            }
        }
    }

    fn store_failed(&self, e: StoreError) -> Step {
        tracing::error!(instance.id = %self.instance(), error = %e, "the message queue could not be read or written; trying again");
        Step::Wait(BACKOFF)
    }
}
