//! The task that owns one instance's WhatsApp client. It turns API commands and client
//! events into state-machine inputs, carries out the resulting actions, and publishes a
//! snapshot after each step.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use whatsapp_rust::pair_code::PairCodeOptions;
use whatsapp_rust::types::events::Event;

use super::session::{ClientFactory, Running, Signal, SignalKind};
use super::state::{self, Action, Input, State};
use super::{Device, InstanceHandle, LinkError, PairCode, QrCode, Snapshot};
use crate::store::{InstanceRecord, Link, Store};

pub(crate) enum Command {
    Input(Input, oneshot::Sender<()>),
    PairCode {
        phone: String,
        reply: oneshot::Sender<Result<String, LinkError>>,
    },
    /// Unlink, forget the session, and end the task.
    Cancel(oneshot::Sender<()>),
}

/// What every instance task shares.
pub(crate) struct Context {
    pub(crate) factory: ClientFactory,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) link_wait: Duration,
}

/// How long a graceful client stop or a logout may take before we move on.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(5);

struct Actor {
    record: Arc<InstanceRecord>,
    ctx: Arc<Context>,
    state: State,
    link: Option<Link>,
    client: Option<Running>,
    generation: u64,
    code_phone: Option<String>,
    signal_tx: mpsc::UnboundedSender<Signal>,
    signals: mpsc::UnboundedReceiver<Signal>,
    commands: mpsc::Receiver<Command>,
    snapshot: watch::Sender<Snapshot>,
}

pub(crate) fn spawn(
    record: InstanceRecord,
    ctx: Arc<Context>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> InstanceHandle {
    let record = Arc::new(record);
    let (commands_tx, commands) = mpsc::channel(16);
    let (signal_tx, signals) = mpsc::unbounded_channel();
    let (snapshot, snapshot_rx) = watch::channel(Snapshot {
        state: State::NoSession,
        qr: None,
        pair_code: None,
        device: None,
        socket_up: false,
    });
    let actor = Actor {
        link: record.link.clone(),
        state: if record.link.is_some() {
            State::Stopped
        } else {
            State::NoSession
        },
        record: record.clone(),
        ctx: ctx.clone(),
        client: None,
        generation: 0,
        code_phone: None,
        signal_tx,
        signals,
        commands,
        snapshot,
    };
    tracker.spawn(actor.run(shutdown));
    InstanceHandle {
        record,
        commands: commands_tx,
        snapshot: snapshot_rx,
        link_wait: ctx.link_wait,
    }
}

impl Actor {
    async fn run(mut self, shutdown: CancellationToken) {
        if self.link.is_none() {
            // A session file without a recorded link is a linking window that never
            // completed (or a crash mid-link): it holds nothing of the user's.
            self.wipe_files();
        } else if !self.ctx.factory.has_session_file(&self.record.id) {
            tracing::warn!(instance.id = %self.record.id, "the stored session is missing; the number must be linked again");
            self.link = None;
            self.state = State::NoSession;
            self.save_link().await;
        }
        self.publish();
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::Input(input, done)) => {
                        self.apply(input).await;
                        let _ = done.send(());
                    }
                    Some(Command::PairCode { phone, reply }) => self.request_pair_code(phone, reply),
                    Some(Command::Cancel(done)) => {
                        self.apply(Input::Disconnect).await;
                        let _ = done.send(());
                        return;
                    }
                    None => break,
                },
                Some(signal) = self.signals.recv() => self.on_signal(signal).await,
                () = shutdown.cancelled() => break,
            }
        }
        // The gateway is stopping: close the connection, keep the session.
        self.run_action(Action::StopClient).await;
    }

    async fn apply(&mut self, input: Input) {
        let (next, actions) = state::step(self.state, self.link.is_some(), input);
        if next != self.state {
            tracing::info!(instance.id = %self.record.id, from = ?self.state, to = ?next, ?input, "instance state");
        }
        self.state = next;
        for action in actions {
            self.run_action(action).await;
        }
        self.publish();
    }

    async fn on_signal(&mut self, signal: Signal) {
        if self.client.as_ref().map(|c| c.generation) != Some(signal.generation) {
            return; // from a client we already stopped
        }
        let event = match signal.kind {
            // The client is kept: its last events may still be on their way (they are
            // delivered by another task and can arrive after the run loop's end).
            SignalKind::Stopped => return self.apply(Input::ClientStopped).await,
            SignalKind::SocketUp => {
                self.snapshot.send_modify(|s| s.socket_up = true);
                return;
            }
            SignalKind::Event(event) => event,
        };
        match &*event {
            // Codes only while a window is open: a stopped client's late code is void.
            Event::PairingQrCode(qr) if self.state == State::Linking => {
                self.snapshot.send_modify(|s| {
                    s.qr = Some(Arc::new(QrCode::new(qr.code.clone(), qr.timeout)))
                });
            }
            Event::PairingCode(code) if self.state == State::Linking => {
                let phone = self.code_phone.clone().unwrap_or_default();
                self.snapshot.send_modify(|s| {
                    s.pair_code = Some(PairCode {
                        phone,
                        code: group_code(&code.code),
                        expires: Instant::now() + code.timeout,
                    })
                });
            }
            Event::PairSuccess(paired) => {
                self.link = Some(Link {
                    phone: paired.id.user.to_string(),
                    linked_at: crate::unix_millis(),
                    platform: Some(paired.platform.clone()).filter(|p| !p.is_empty()),
                });
                self.apply(Input::Paired).await;
            }
            Event::Connected(_) => self.apply(Input::Connected).await,
            Event::Disconnected(_) => self.apply(Input::Disconnected).await,
            Event::LoggedOut(_) => self.apply(Input::LoggedOut).await,
            Event::StreamReplaced(_) => self.apply(Input::Replaced).await,
            Event::PairingQrCodesExhausted(done) if done.disconnected => {
                self.apply(Input::CodesExhausted).await
            }
            Event::ConnectFailure(_) | Event::TemporaryBan(_) | Event::ClientOutdated(_) => {
                tracing::warn!(instance.id = %self.record.id, event = ?event, "WhatsApp refused the connection");
            }
            _ => {}
        }
    }

    async fn run_action(&mut self, action: Action) {
        match action {
            Action::StartLinkClient => {
                self.wipe_files();
                self.start_client().await;
            }
            Action::StartSessionClient => self.start_client().await,
            Action::ReconnectNow => {
                if let Some(running) = &self.client {
                    running.client.reconnect_immediately().await;
                }
            }
            Action::Logout => self.logout().await,
            Action::StopClient => self.stop_client().await,
            Action::RecordLink => self.save_link().await,
            Action::WipeSession => {
                self.link = None;
                self.wipe_files();
                self.save_link().await;
            }
        }
    }

    /// Tells WhatsApp to remove this device, connecting the stored session first if it
    /// is not online (within the link wait), so the phone forgets the device too.
    async fn logout(&mut self) {
        if !self
            .client
            .as_ref()
            .is_some_and(|r| r.client.is_connected())
        {
            self.stop_client().await;
            self.generation += 1;
            let started = self
                .ctx
                .factory
                .start(&self.record.id, self.generation, self.signal_tx.clone())
                .await;
            if let Ok(running) = started {
                let _ = running.client.wait_for_socket(self.ctx.link_wait).await;
                self.client = Some(running);
            }
        }
        match self.client.as_ref().filter(|r| r.client.is_connected()) {
            Some(running) => {
                if timeout(LOGOUT_TIMEOUT, running.client.logout())
                    .await
                    .is_err()
                {
                    tracing::warn!(instance.id = %self.record.id, "WhatsApp did not confirm the logout");
                }
            }
            None => tracing::warn!(
                instance.id = %self.record.id,
                "WhatsApp could not be reached to unlink the device; the phone still lists it"
            ),
        }
    }

    async fn stop_client(&mut self) {
        if let Some(running) = self.client.take() {
            let _ = timeout(STOP_TIMEOUT, running.client.disconnect()).await;
        }
    }

    async fn start_client(&mut self) {
        self.generation += 1;
        self.snapshot.send_modify(|s| s.socket_up = false);
        match self
            .ctx
            .factory
            .start(&self.record.id, self.generation, self.signal_tx.clone())
            .await
        {
            Ok(running) => self.client = Some(running),
            Err(e) => {
                tracing::error!(instance.id = %self.record.id, error = %format!("{e:#}"), "could not start the WhatsApp client");
                self.state = if self.link.is_some() {
                    State::Stopped
                } else {
                    State::NoSession
                };
            }
        }
    }

    fn request_pair_code(
        &mut self,
        phone: String,
        reply: oneshot::Sender<Result<String, LinkError>>,
    ) {
        let Some(running) = self
            .client
            .as_ref()
            .filter(|_| self.state == State::Linking)
        else {
            let _ = reply.send(Err(LinkError::WindowClosed));
            return;
        };
        let client = running.client.clone();
        let replace = self.code_phone.as_ref().is_some_and(|p| *p != phone);
        self.code_phone = Some(phone.clone());
        tokio::spawn(async move {
            if replace {
                client.cancel_pair_code().await;
            }
            let options = PairCodeOptions {
                phone_number: phone,
                ..Default::default()
            };
            let result = client
                .pair_with_code(options)
                .await
                .map(|code| group_code(&code))
                .map_err(|e| LinkError::Refused(e.to_string()));
            let _ = reply.send(result);
        });
    }

    async fn save_link(&self) {
        if let Err(e) = self
            .ctx
            .store
            .set_link(&self.record.id, self.link.as_ref())
            .await
        {
            tracing::error!(instance.id = %self.record.id, error = %e, "could not save the instance's link");
        }
    }

    fn wipe_files(&self) {
        if let Err(e) = self.ctx.factory.wipe(&self.record.id) {
            tracing::error!(instance.id = %self.record.id, error = %e, "could not delete the stored session");
        }
    }

    fn publish(&self) {
        let linking = self.state == State::Linking;
        let device = match (&self.link, self.state) {
            (Some(link), State::Connected | State::Reconnecting | State::Stopped) => {
                let client = self.client.as_ref().map(|c| &c.client);
                Some(Device {
                    phone: link.phone.clone(),
                    name: client.map(|c| c.push_name()).unwrap_or_default(),
                    device_id: client.and_then(|c| c.pn()).map(|j| j.device),
                    platform: link.platform.clone(),
                })
            }
            _ => None,
        };
        self.snapshot.send_modify(|s| {
            s.state = self.state;
            if !linking {
                s.qr = None;
                s.pair_code = None;
            }
            s.device = device;
        });
    }
}

/// WhatsApp shows pairing codes as two groups of four: `ABCD-EFGH`.
fn group_code(code: &str) -> String {
    if code.len() == 8 && code.is_ascii() {
        format!("{}-{}", &code[..4], &code[4..])
    } else {
        code.to_owned()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn codes_are_grouped_four_and_four() {
        assert_eq!(super::group_code("ABCDEFGH"), "ABCD-EFGH");
        assert_eq!(super::group_code("ABC"), "ABC");
    }
}
