//! The task that owns one instance: its state, its WhatsApp client and every decision
//! about them. It turns API commands, client events and the reports of its child tasks
//! into state-machine inputs, carries out the resulting actions, and publishes a
//! snapshot after each step. Nothing in here waits on the network: starting a client,
//! stopping one and unlinking run in child tasks (`work`) that report back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::RngExt as _;
use tokio::sync::{Mutex as AsyncMutex, broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use whatsapp_rust::types::events::Event;

use super::events::{Event as InstanceEvent, Published};
use super::linking::Window;
use super::session::{ClientFactory, Running, Signal, SignalKind};
use super::state::{self, Action, Input, State};
use super::work::{self, StartError, Work};
use super::{Cause, Device, InstanceHandle, LinkError, Problem, Requester, Snapshot, Unlinked};
use crate::messaging::Line;
use crate::store::{InstanceRecord, Link, Store};

pub(crate) type Reply<T> = oneshot::Sender<Result<T, LinkError>>;

pub(crate) enum Command {
    QrCode {
        by: Requester,
        reply: Reply<Arc<super::QrCode>>,
    },
    PairCode {
        phone: String,
        by: Requester,
        reply: Reply<String>,
    },
    Restart {
        reply: Reply<()>,
    },
    Restore {
        reply: Reply<()>,
    },
    Disconnect {
        reply: Reply<Unlinked>,
    },
    /// Unlink, forget the session, delete the instance's row, and end the task.
    Cancel {
        reply: Reply<Unlinked>,
    },
    /// Close the linking window, if one is open and nothing is linked yet: WhatsApp
    /// hears nothing more. Never unlinks a number that just linked. A link page
    /// closes only a window it opened.
    StopLinking {
        by: Requester,
        reply: Reply<()>,
    },
}

/// What every instance task shares.
pub(crate) struct Context {
    pub(crate) factory: ClientFactory,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) link_wait: Duration,
    pub(crate) link_rate_per_minute: u32,
    pub(crate) tracker: TaskTracker,
    /// Cancelled when the gateway stops: child tasks start no new client after it.
    pub(crate) shutdown: CancellationToken,
    /// Every instance's events, for readers of them all (the panel's list).
    pub(crate) bus: broadcast::Sender<Arc<InstanceEvent>>,
    /// Woken when a webhook event is written, for the delivery worker.
    pub(crate) webhooks_due: Arc<tokio::sync::Notify>,
    /// Room for running sessions under the open-file limit: one permit each.
    pub(crate) sessions: Arc<tokio::sync::Semaphore>,
    pub(crate) max_sessions: usize,
    /// On a shared database, the instances this node holds a lease on.
    pub(crate) leases: Option<Arc<crate::store::leases::Leases>>,
}

/// A connection down for longer than this is a disconnect for the webhooks; one back
/// within it is neither a disconnect nor a new connect.
pub(crate) const DISCONNECT_GRACE: Duration = Duration::from_secs(10);
/// Pending webhook events kept per instance; past it the oldest are dropped.
const OUTBOX_CAP: u64 = 1000;

/// Queued commands, client events and child reports; each side waits when full.
const QUEUE: usize = 32;
/// Restores in a row make the client skip its backoff at most this often.
const RECONNECT_NOW_EVERY: Duration = Duration::from_secs(5);
/// How long a new link may wait for a busy database before it is undone at WhatsApp,
/// and the pause between attempts, in milliseconds (random, so a crowd spreads out).
const LINK_RECORD_WAIT: Duration = Duration::from_secs(20);
const LINK_RECORD_PAUSE: std::ops::Range<u64> = 100..600;

pub(super) struct Actor {
    pub(super) record: Arc<InstanceRecord>,
    pub(super) ctx: Arc<Context>,
    pub(super) state: State,
    pub(super) link: Option<Link>,
    /// The link page the number was linked through, if it was one alone.
    linked_through: Option<Arc<str>>,
    /// The current client's generation; anything about another one is stale.
    pub(super) generation: u64,
    pub(super) client: Option<Running>,
    pub(super) problem: Option<Problem>,
    pub(super) window: Window,
    restarts: Vec<Reply<()>>,
    /// The generation of a restart or restore still on its way to WhatsApp.
    restarting: Option<u64>,
    /// When a restore last made the client skip its backoff.
    reconnected_at: Option<Instant>,
    /// The current generation, for child tasks to see that theirs was superseded.
    pub(super) current: Arc<AtomicU64>,
    unlinks: Vec<Reply<Unlinked>>,
    cancelling: bool,
    /// How the unlink of a cancel went, told once the row is gone too.
    cancelled: Option<Unlinked>,
    /// Held by whichever client uses the session; never awaited by this task.
    pub(super) session_lock: Arc<AsyncMutex<()>>,
    pub(super) signal_tx: mpsc::Sender<Signal>,
    signals: mpsc::Receiver<Signal>,
    pub(super) work_tx: mpsc::Sender<Work>,
    work: mpsc::Receiver<Work>,
    commands: mpsc::Receiver<Command>,
    snapshot: watch::Sender<Snapshot>,
    events: broadcast::Sender<Arc<InstanceEvent>>,
    published: Published,
    /// Whether the last webhook event said connected (`None`: not read from the
    /// outbox yet).
    announced: Option<bool>,
    /// A connection webhook to write at a time, if still true then: a disconnect at
    /// the end of a drop's grace, or one whose write failed, tried again.
    announce_at: Option<(Instant, bool)>,
    /// Whether messages can go out, for the instance's sender.
    line: watch::Sender<Line>,
}

/// Starts the task of one instance. A cancelled record's task finishes the cancel.
/// `session_found` is whether the session store holds the instance's session (read
/// for a linked one only).
pub(crate) fn spawn(
    record: InstanceRecord,
    session_found: Result<bool, String>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> InstanceHandle {
    let record = Arc::new(record);
    let (commands_tx, commands) = mpsc::channel(QUEUE);
    let (signal_tx, signals) = mpsc::channel(QUEUE);
    let (work_tx, work) = mpsc::channel(QUEUE);
    let (snapshot, snapshot_rx) = watch::channel(Snapshot {
        state: State::NoSession,
        qr: None,
        pair_code: None,
        device: None,
        socket_up: false,
        problem: None,
        event_id: 0,
        pages_handed: Arc::new([]),
    });
    let (events, _) = broadcast::channel(super::events::BACKLOG);
    let mut actor = Actor {
        link: record.link.clone(),
        linked_through: None,
        state: State::NoSession,
        window: Window::new(ctx.link_rate_per_minute),
        record: record.clone(),
        ctx: ctx.clone(),
        client: None,
        generation: 0,
        problem: None,
        restarts: Vec::new(),
        restarting: None,
        reconnected_at: None,
        current: Arc::new(AtomicU64::new(0)),
        unlinks: Vec::new(),
        cancelling: false,
        cancelled: None,
        session_lock: Arc::new(AsyncMutex::new(())),
        signal_tx,
        signals,
        work_tx,
        work,
        commands,
        snapshot,
        events: events.clone(),
        published: Published::new(&record.id),
        announced: None,
        announce_at: None,
        line: watch::channel(Line::Down).0,
    };
    let line = actor.line.subscribe();
    if actor.link.is_some() {
        actor.state = actor.stored_session_state(session_found);
    }
    // Published before anyone can ask: the first /status already tells the truth.
    actor.publish();
    ctx.factory
        .messaging
        .open_lane(&record.id, line, shutdown.child_token());
    ctx.tracker.spawn(actor.run(shutdown));
    InstanceHandle {
        record,
        commands: commands_tx,
        snapshot: snapshot_rx,
        events: events.downgrade(),
    }
}

impl Actor {
    async fn run(mut self, shutdown: CancellationToken) {
        // Webhooks pick up where they were: a number unlinked (or missing) meanwhile
        // gets its disconnect; one that was connected gets the grace to come back.
        if self.link.is_some() && self.state != State::SessionMissing {
            if self.said().await == Some(true) {
                self.announce_at = Some((Instant::now() + DISCONNECT_GRACE, false));
            }
        } else {
            self.announce(false).await;
        }
        loop {
            let wake = self.window.next_deadline();
            let announce_at = self.announce_at.map(|(at, _)| at);
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(work) = self.work.recv() => self.on_work(work).await,
                Some(signal) = self.signals.recv() => self.on_signal(signal).await,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    None => break,
                },
                () = sleep_until(wake), if wake.is_some() => self.on_deadline().await,
                () = sleep_until(announce_at), if announce_at.is_some() => {
                    if let Some((_, connected)) = self.announce_at.take() {
                        if (self.state == State::Connected) == connected {
                            self.announce(connected).await;
                        }
                    }
                }
            }
            if self.cancelled.is_some() {
                return self.finish_cancel(shutdown).await;
            }
        }
        self.close().await;
    }

    /// The gateway is stopping: close the connection, keep the session, and stop any
    /// client a child task started meanwhile. Children that report later find the
    /// channel closed and stop their client themselves.
    async fn close(mut self) {
        self.work.close();
        if let Some(running) = self.client.take() {
            drop(running.stop(work::STOP_TIMEOUT).await);
        }
        while let Some(report) = self.work.recv().await {
            if let Work::Started {
                result: Ok(running),
                ..
            } = report
            {
                drop(running.stop(work::STOP_TIMEOUT).await);
            }
        }
    }

    /// A recorded link whose session is stored reconnects; a missing or unreadable one
    /// is reported, never forgotten. `found` is whether the session store has it.
    fn stored_session_state(&mut self, found: Result<bool, String>) -> State {
        match found {
            Ok(true) => {
                self.problem = None;
                State::Stopped
            }
            found => {
                let error = found.err();
                tracing::warn!(
                    instance.id = %self.record.id, sessions = %self.ctx.factory.sessions.location(), error,
                    "the linked number's session is missing or unreadable; it stays linked, restore the sessions database to bring it back"
                );
                self.problem = Some(Problem::SessionMissing);
                State::SessionMissing
            }
        }
    }

    pub(super) async fn apply(&mut self, input: Input) {
        let (next, actions) = state::step(self.state, self.link.is_some(), input);
        let before = self.state;
        if next != self.state {
            tracing::info!(instance.id = %self.record.id, from = ?self.state, to = ?next, ?input, "instance state");
        }
        self.state = next;
        for action in actions {
            self.run_action(action).await;
        }
        if self.state != before {
            self.webhooks_after(before).await;
        }
        if self.restarting.is_some()
            && (self.restarting != Some(self.generation) || next != State::Reconnecting)
        {
            // The restart was overtaken: its callers hear where things stand now.
            self.restarting = None;
            let answer = match self.state {
                State::Unlinking => Err(LinkError::Unlinking),
                State::Stopped => Err(LinkError::SessionStored),
                State::SessionMissing => Err(LinkError::Problem(Problem::SessionMissing)),
                _ => Ok(()),
            };
            self.settle_restarts(answer);
        }
        if self.state != State::Linking {
            let answer = self.window_answer();
            self.window.close(answer);
        }
        self.publish();
    }

    /// The connection webhooks a state change calls for: a connect at once, a drop only
    /// once it has lasted [`DISCONNECT_GRACE`], an unlink or a stop at once.
    async fn webhooks_after(&mut self, before: State) {
        match self.state {
            State::Connected => {
                self.announce_at = None;
                self.announce(true).await;
            }
            State::Reconnecting => {
                if before == State::Connected {
                    self.announce_at = Some((Instant::now() + DISCONNECT_GRACE, false));
                }
            }
            State::Linking => {}
            State::NoSession | State::Stopped | State::SessionMissing | State::Unlinking => {
                self.announce_at = None;
                self.announce(false).await;
            }
        }
    }

    /// What the connection webhooks last said, read once from the store.
    async fn said(&mut self) -> Option<bool> {
        if self.announced.is_none() {
            let read = tokio::time::timeout(
                work::STORE_TIMEOUT,
                self.ctx.store.webhook_announced(&self.record.id),
            )
            .await;
            match read {
                // Nothing said yet counts as disconnected: a first connect is news.
                Ok(Ok(said)) => self.announced = Some(said.unwrap_or(false)),
                outcome => {
                    tracing::error!(instance.id = %self.record.id, ?outcome, "could not read what the webhooks last said");
                }
            }
        }
        self.announced
    }

    /// Writes a ConnectedCallback or DisconnectedCallback, once per transition. A
    /// write that fails is tried again in a few seconds.
    async fn announce(&mut self, connected: bool) {
        const AGAIN: Duration = Duration::from_secs(5);
        match self.said().await {
            None => {
                self.announce_at = Some((Instant::now() + AGAIN, connected));
                return;
            }
            Some(said) if said == connected => return,
            Some(_) => {}
        }
        let now = crate::unix_millis();
        let id = &self.record.id;
        let (kind, body) = if connected {
            (
                crate::store::WebhookKind::Connected,
                serde_json::json!({
                    "type": "ConnectedCallback",
                    "connected": true,
                    "momment": now,
                    "instanceId": id,
                    "phone": self.link.as_ref().map(|l| &l.phone),
                }),
            )
        } else {
            (
                crate::store::WebhookKind::Disconnected,
                serde_json::json!({
                    "type": "DisconnectedCallback",
                    "disconnected": true,
                    "error": "Device has been disconnected",
                    "momment": now,
                    "instanceId": id,
                }),
            )
        };
        let event = crate::store::WebhookEvent {
            event_id: crate::random_hex(16),
            instance_id: id.clone(),
            kind,
            body: body.to_string(),
            created_at: now,
        };
        let written = tokio::time::timeout(
            work::STORE_TIMEOUT,
            self.ctx.store.enqueue_webhook(&event, OUTBOX_CAP),
        )
        .await;
        match written {
            Ok(Ok(written)) => {
                self.announced = Some(connected);
                if written {
                    self.ctx.webhooks_due.notify_one();
                }
            }
            outcome => {
                tracing::error!(instance.id = %id, ?outcome, "could not write a webhook event; trying again");
                self.announce_at = Some((Instant::now() + AGAIN, connected));
            }
        }
    }

    /// What a caller still waiting for a code hears once the window is over.
    fn window_answer(&self) -> LinkError {
        match self.state {
            State::Connected => LinkError::AlreadyConnected,
            State::Reconnecting | State::Stopped => LinkError::SessionStored,
            State::SessionMissing => LinkError::Problem(Problem::SessionMissing),
            State::Unlinking => LinkError::Unlinking,
            State::NoSession | State::Linking => LinkError::WindowClosed,
        }
    }

    async fn on_command(&mut self, command: Command) {
        if self.cancelling {
            return command.refuse(LinkError::Gone);
        }
        match command {
            Command::QrCode { by, reply } => self.ask_qr(by, reply).await,
            Command::PairCode { phone, by, reply } => self.ask_pair(phone, by, reply).await,
            Command::Restart { reply } => self.restart(Input::Restart, reply).await,
            Command::Restore { reply } => self.restart(Input::Restore, reply).await,
            Command::Disconnect { reply } => self.disconnect(reply).await,
            Command::StopLinking { by, reply } => self.stop_linking(by, reply).await,
            Command::Cancel { reply } => {
                self.cancelling = true;
                self.disconnect(reply).await;
            }
        }
    }

    /// Restart and restore: one whose client is still starting answers every caller
    /// that joins it.
    async fn restart(&mut self, input: Input, reply: Reply<()>) {
        if self.restarting.is_some() {
            return self.restarts.push(reply);
        }
        if self.state == State::SessionMissing {
            let found = self.ctx.factory.sessions.exists(&self.record.id).await;
            self.state = self.stored_session_state(found.map_err(|e| e.to_string()));
            if self.state == State::SessionMissing {
                self.publish();
                let _ = reply.send(Err(LinkError::Problem(Problem::SessionMissing)));
                return;
            }
        }
        let generation = self.generation;
        self.apply(input).await;
        if self.generation != generation && self.state == State::Reconnecting {
            self.restarting = Some(self.generation);
            self.restarts.push(reply); // answered once its client has started
        } else {
            let _ = reply.send(Ok(()));
        }
    }

    async fn disconnect(&mut self, reply: Reply<Unlinked>) {
        let outcome = match self.state {
            State::SessionMissing => Unlinked::NotTold(work::KEYS_MISSING.into()),
            _ => Unlinked::Told,
        };
        self.unlinks.push(reply);
        self.apply(Input::Disconnect).await;
        if self.state != State::Unlinking {
            self.finish_unlinks(outcome);
        }
    }

    fn finish_unlinks(&mut self, outcome: Unlinked) {
        if let Unlinked::NotTold(why) = &outcome {
            tracing::warn!(instance.id = %self.record.id, why, "WhatsApp could not be told to unlink the device; the phone still lists it");
        }
        if self.cancelling {
            self.cancelled = Some(outcome);
            return;
        }
        for reply in self.unlinks.drain(..) {
            let _ = reply.send(Ok(outcome.clone()));
        }
    }

    /// The session is gone at WhatsApp and here: delete the row, answer, end.
    async fn finish_cancel(mut self, shutdown: CancellationToken) {
        // Once no client uses the session: clients still reporting are stopped.
        let lock = self.session_lock.clone();
        let acquire = lock.lock_owned();
        tokio::pin!(acquire);
        let session = loop {
            tokio::select! {
                session = &mut acquire => break session,
                Some(report) = self.work.recv() => {
                    if let Work::Started { result: Ok(running), .. } = report {
                        self.stop_in_background(running, false);
                    }
                }
                Some(_) = self.signals.recv() => {}
                // The row stays marked: the next start finishes the cancel.
                () = shutdown.cancelled() => return self.close().await,
            }
        };
        if let Err(e) = self.ctx.factory.sessions.wipe(&self.record.id).await {
            tracing::error!(instance.id = %self.record.id, error = %e, "could not delete the cancelled instance's session");
        }
        let deleted = tokio::time::timeout(
            work::STORE_TIMEOUT,
            self.ctx.store.delete_instance(&self.record.id),
        )
        .await;
        // Held until the row is gone: a start still on its way finds it superseded.
        drop(session);
        match deleted {
            Ok(Ok(())) => tracing::info!(instance.id = %self.record.id, "instance cancelled"),
            failed => {
                tracing::error!(instance.id = %self.record.id, outcome = ?failed, "could not delete the cancelled instance; the next start finishes it")
            }
        }
        self.ctx.factory.messaging.close_lane(&self.record.id);
        let outcome = self.cancelled.take().unwrap_or(Unlinked::Told);
        for reply in self.unlinks.drain(..) {
            let _ = reply.send(Ok(outcome.clone()));
        }
    }

    async fn on_work(&mut self, report: Work) {
        match report {
            Work::Started { generation, result } => self.on_started(generation, result).await,
            Work::PairCode {
                generation,
                request,
                result,
            } => self.on_pair_code(generation, request, result),
            Work::Unlinked {
                generation,
                outcome,
            } if generation == self.generation => {
                self.apply(Input::Unlinked).await;
                self.finish_unlinks(outcome);
            }
            Work::Unlinked { .. } => {}
        }
    }

    async fn on_started(&mut self, generation: u64, result: Result<Running, StartError>) {
        if generation != self.generation {
            match result {
                Ok(stale) => self.stop_in_background(stale, self.link.is_none()),
                Err(e) => {
                    tracing::info!(instance.id = %self.record.id, error = ?e, "a superseded client could not start")
                }
            }
            return;
        }
        match result {
            Ok(running) => {
                self.client = Some(running);
                self.restarting = None;
                self.settle_restarts(Ok(()));
                if self.state == State::Linking {
                    self.request_pair_code();
                }
                self.publish();
            }
            Err(StartError::SessionMissing) => {
                tracing::warn!(
                    instance.id = %self.record.id,
                    sessions = %self.ctx.factory.sessions.location(),
                    "the linked number's session is missing; it stays linked, restore the sessions database to bring it back"
                );
                self.problem = Some(Problem::SessionMissing);
                self.restarting = None;
                self.settle_restarts(Err(LinkError::Problem(Problem::SessionMissing)));
                self.apply(Input::FileMissing).await;
            }
            Err(StartError::Superseded) => {}
            Err(StartError::Unavailable(cause)) => {
                tracing::error!(instance.id = %self.record.id, error = %cause, "could not start the WhatsApp client");
                self.connection_error(&cause);
                self.restarting = None;
                self.settle_restarts(Err(LinkError::Unavailable(cause.clone())));
                if self.state == State::Linking {
                    self.window.fail(LinkError::Unavailable(cause));
                    self.apply(Input::LinkFailed).await;
                } else {
                    self.apply(Input::StartFailed).await;
                }
            }
        }
    }

    /// A new client generation: whatever is about an older one is stale from now on.
    pub(super) fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.current.store(self.generation, Ordering::Relaxed);
        self.generation
    }

    /// Answers the callers of a restart or restore.
    fn settle_restarts(&mut self, answer: Result<(), LinkError>) {
        for reply in self.restarts.drain(..) {
            let _ = reply.send(answer.clone());
        }
    }

    async fn on_signal(&mut self, signal: Signal) {
        if signal.generation != self.generation {
            return; // from a client we already let go of
        }
        let event = match signal.kind {
            SignalKind::Stopped => return self.apply(Input::ClientStopped).await,
            // Not from a client only logging out, or one already let go of.
            SignalKind::SocketUp
                if matches!(
                    self.state,
                    State::Linking | State::Reconnecting | State::Connected
                ) =>
            {
                self.snapshot.send_modify(|s| s.socket_up = true);
                return;
            }
            SignalKind::SocketUp => return,
            SignalKind::Event(event) => event,
        };
        match &*event {
            Event::PairingQrCode(qr) if self.state == State::Linking => {
                self.window.on_qr(&qr.code, qr.timeout);
                self.request_pair_code();
                self.publish();
            }
            Event::PairingCode(code) if self.state == State::Linking => {
                self.window.on_pair_code(&code.code, code.timeout);
                self.publish();
            }
            // A pairing code still valid keeps the window until it expires.
            Event::PairingQrCodesExhausted(_) if self.state == State::Linking => {
                if self.window.hold_for_pair_code() {
                    tracing::info!(instance.id = %self.record.id, "QR codes ran out; the pairing code keeps the window open until it expires");
                } else {
                    self.apply(Input::WindowEnded).await;
                }
            }
            Event::PairSuccess(paired) if self.state == State::Linking => {
                let link = Link {
                    phone: paired.id.user.to_string(),
                    linked_at: crate::unix_millis(),
                    platform: Some(paired.platform.clone()).filter(|p| !p.is_empty()),
                };
                self.record_link(link).await;
            }
            Event::Connected(_) => {
                self.apply(Input::Connected).await;
                if self.state == State::Connected && self.problem.is_some() {
                    self.problem = None;
                    self.publish();
                }
            }
            Event::Disconnected(_) => self.apply(Input::Disconnected).await,
            Event::LoggedOut(_) => self.apply(Input::LoggedOut).await,
            Event::StreamReplaced(_) => self.apply(Input::Replaced).await,
            // The device's name shows in /device.
            Event::SelfPushNameUpdated(_) => self.publish(),
            Event::ConnectFailure(_) | Event::TemporaryBan(_) | Event::ClientOutdated(_) => {
                tracing::warn!(instance.id = %self.record.id, event = ?event, "WhatsApp refused the connection");
            }
            _ => {}
        }
    }

    /// The phone accepted the link: it counts only once it is in the database. If it
    /// cannot be stored, it is undone at WhatsApp rather than left to be lost.
    ///
    /// Undoing costs the user a scan, so a write the database was too busy for (a crowd
    /// of linkings) is tried again until `LINK_RECORD_WAIT` has passed. Each attempt
    /// runs to its end, bounded by the store's own lock and pool timeouts, so whether it
    /// was written is always known: a write cut off mid-commit could still land.
    async fn record_link(&mut self, link: Link) {
        let deadline = Instant::now() + LINK_RECORD_WAIT;
        let saved = loop {
            match self.ctx.store.set_link(&self.record.id, Some(&link)).await {
                Err(e) if e.is_busy() && Instant::now() < deadline => {
                    tracing::warn!(instance.id = %self.record.id, error = %e, "could not record the new link yet; trying again");
                    let pause = rand::rng().random_range(LINK_RECORD_PAUSE);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                outcome => break outcome,
            }
        };
        match saved {
            Ok(()) => {
                tracing::info!(instance.id = %self.record.id, "number linked");
                self.link = Some(link);
                self.linked_through = self.window.linked_through();
                self.window.on_paired();
                self.publish();
            }
            Err(e) => {
                tracing::error!(instance.id = %self.record.id, error = %e, "could not record the new link; unlinking the device");
                self.problem = Some(Problem::LinkNotSaved);
                self.apply(Input::LinkNotRecorded).await;
            }
        }
    }

    /// Publishes why a client could not reach WhatsApp (metrics count these).
    fn connection_error(&mut self, cause: &Cause) {
        let event = self
            .published
            .happened(super::EventKind::ConnectionError(cause.clone()));
        let _ = self.ctx.bus.send(event.clone());
        let _ = self.events.send(event);
    }

    async fn on_deadline(&mut self) {
        let cause = self
            .client
            .as_ref()
            .and_then(|c| c.diagnosis.cause())
            .unwrap_or(Cause::NoAnswer);
        if self.window.expire(Instant::now(), self.generation, &cause) {
            self.connection_error(&cause);
            self.apply(Input::LinkFailed).await;
        } else if self.window.pair_code_over(Instant::now()) {
            self.apply(Input::WindowEnded).await;
        } else {
            self.publish();
        }
    }

    async fn run_action(&mut self, action: Action) {
        match action {
            Action::StartLinkClient => {
                self.problem = None;
                self.start_client(true);
                self.window.open(self.generation, self.ctx.link_wait);
            }
            Action::StartSessionClient => self.start_client(false),
            Action::ReconnectNow => {
                let recent = self
                    .reconnected_at
                    .is_some_and(|at| at.elapsed() < RECONNECT_NOW_EVERY);
                if let Some(running) = self.client.as_ref().filter(|_| !recent) {
                    self.reconnected_at = Some(Instant::now());
                    let client = running.client.clone();
                    self.ctx
                        .tracker
                        .spawn(async move { client.reconnect_immediately().await });
                }
            }
            Action::StopClient => match self.client.take() {
                // Its late events still count: a LoggedOut after its end still forgets.
                Some(running) => self.stop_in_background(running, false),
                // A start still on its way is stopped when it reports.
                None => {
                    self.next_generation();
                }
            },
            Action::CloseWindow => {
                self.next_generation();
                if let Some(running) = self.client.take() {
                    self.stop_in_background(running, true);
                }
            }
            Action::Unlink => self.unlink(),
            Action::Forget => {
                self.link = None;
                self.linked_through = None;
                if self.problem == Some(Problem::SessionMissing) {
                    self.problem = None;
                }
                let cleared = tokio::time::timeout(
                    work::STORE_TIMEOUT,
                    self.ctx.store.set_link(&self.record.id, None),
                )
                .await;
                if !matches!(cleared, Ok(Ok(()))) {
                    tracing::error!(instance.id = %self.record.id, outcome = ?cleared, "could not clear the instance's link; the next start reports its session missing");
                }
                self.next_generation();
                let running = self.client.take();
                self.wipe_in_background(running);
            }
        }
    }

    /// The one place the instance's view is published: its snapshot, and an event for
    /// each thing that changed.
    pub(super) fn publish(&mut self) {
        let device = match (&self.link, self.state) {
            (Some(link), State::Connected | State::Reconnecting | State::Stopped) => {
                let client = self.client.as_ref().map(|c| &c.client);
                Some(Device {
                    phone: link.phone.clone(),
                    name: client.map(|c| c.push_name()).unwrap_or_default(),
                    device_id: client.and_then(|c| c.pn()).map(|j| j.device),
                    platform: link.platform.clone(),
                    linked_at: link.linked_at,
                    linked_through: self.linked_through.clone(),
                })
            }
            _ => None,
        };
        let linking = self.state == State::Linking;
        let qr = self.window.qr().filter(|_| linking);
        let pair_code = self.window.pair_code().filter(|_| linking);
        let pages_handed = match linking {
            true => self.window.pages_handed(),
            false => Arc::new([]),
        };
        let events = self.published.changes(
            self.state,
            device.as_ref(),
            self.problem.as_ref(),
            qr.as_ref(),
            pair_code.as_ref(),
        );
        let event_id = self.published.last_id();
        // The snapshot first: a reader that subscribes in between finds the change in
        // the snapshot, and skips the event by its id.
        self.snapshot.send_modify(|s| {
            s.state = self.state;
            s.qr = qr;
            s.pair_code = pair_code;
            s.device = device;
            s.problem = self.problem.clone();
            s.event_id = event_id;
            s.pages_handed = pages_handed;
            if self.client.is_none() {
                s.socket_up = false;
            }
        });
        let line = match (self.state, &self.link, &self.client) {
            (State::Connected, Some(_), Some(running)) => Line::Up(running.client.clone()),
            (
                State::Connected | State::Reconnecting | State::Stopped | State::SessionMissing,
                Some(_),
                _,
            ) => Line::Down,
            _ => Line::Unlinked,
        };
        Line::publish(&self.line, line);
        for event in events {
            // Nobody listening is fine: the snapshot holds the same.
            let _ = self.ctx.bus.send(event.clone());
            let _ = self.events.send(event);
        }
    }
}

impl Command {
    fn refuse(self, error: LinkError) {
        match self {
            Command::QrCode { reply, .. } => drop(reply.send(Err(error))),
            Command::PairCode { reply, .. } => drop(reply.send(Err(error))),
            Command::Restart { reply }
            | Command::Restore { reply }
            | Command::StopLinking { reply, .. } => drop(reply.send(Err(error))),
            Command::Disconnect { reply } | Command::Cancel { reply } => {
                drop(reply.send(Err(error)))
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
