//! Instances: one task per WhatsApp number owning its client (`actor`), the registry
//! of them (`manager`), the pure state machine (`state`) and client start-up (`session`).
//! No HTTP types here.

mod actor;
mod manager;
mod session;
pub mod state;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

pub use manager::{Manager, ManagerConfig, NewInstance};
pub use state::State;

use crate::store::InstanceRecord;
use actor::Command;
use state::Input;

/// A QR code as WhatsApp issued it, valid until `expires`.
#[derive(Debug)]
pub struct QrCode {
    pub value: String,
    pub expires: Instant,
    /// The PNG data URL, rendered on first use and kept for this code only.
    image: OnceLock<Option<String>>,
}

impl QrCode {
    fn new(value: String, valid_for: Duration) -> Self {
        Self {
            value,
            expires: Instant::now() + valid_for,
            image: OnceLock::new(),
        }
    }

    /// Still valid for at least a moment: a code is never served as it expires.
    fn is_fresh(&self) -> bool {
        self.expires > Instant::now() + Duration::from_millis(500)
    }

    /// `None` if the code is too long for a QR symbol (WhatsApp's are ~150 bytes).
    pub fn image_data_url(&self) -> Option<&str> {
        self.image
            .get_or_init(|| crate::qr::png_data_url(&self.value))
            .as_deref()
    }
}

#[derive(Clone, Debug)]
pub struct PairCode {
    pub phone: String,
    pub code: String,
    pub expires: Instant,
}

/// The linked phone, as seen once connected.
#[derive(Clone, Debug, Default)]
pub struct Device {
    pub phone: String,
    /// The account's push name, when WhatsApp shared it.
    pub name: String,
    /// Our companion device number on the account (`phone:N@s.whatsapp.net`).
    pub device_id: Option<u16>,
    /// The phone's platform as reported at linking.
    pub platform: Option<String>,
}

/// What an instance looks like right now; read without waiting on its task.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub state: State,
    pub qr: Option<Arc<QrCode>>,
    pub pair_code: Option<PairCode>,
    pub device: Option<Device>,
    /// The current client reached WhatsApp (handshake done, logging in).
    pub socket_up: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("You are already connected.")]
    AlreadyConnected,
    #[error("You need to restore the session.")]
    SessionStored,
    #[error("WhatsApp did not answer in time; try again later")]
    Unreachable,
    #[error("the linking window closed before a code was issued; ask again")]
    WindowClosed,
    #[error("WhatsApp refused the pairing code request: {0}")]
    Refused(String),
    #[error("the instance is shutting down")]
    Gone,
}

/// A cheap handle to one instance's task.
#[derive(Clone)]
pub struct InstanceHandle {
    pub record: Arc<InstanceRecord>,
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Snapshot>,
    link_wait: Duration,
}

impl InstanceHandle {
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    async fn send(&self, input: Input) -> Result<(), LinkError> {
        let (done, applied) = oneshot::channel();
        self.commands
            .send(Command::Input(input, done))
            .await
            .map_err(|_| LinkError::Gone)?;
        applied.await.map_err(|_| LinkError::Gone)
    }

    pub async fn restart(&self) -> Result<(), LinkError> {
        self.send(Input::Restart).await
    }

    pub async fn restore(&self) -> Result<(), LinkError> {
        self.send(Input::Restore).await
    }

    pub async fn disconnect(&self) -> Result<(), LinkError> {
        self.send(Input::Disconnect).await
    }

    /// The QR code valid now, opening a linking window if none is open.
    pub async fn qr_code(&self) -> Result<Arc<QrCode>, LinkError> {
        self.open_window().await?;
        let fresh = self
            .wait_for(|s| s.qr.as_ref().filter(|q| q.is_fresh()).cloned())
            .await;
        self.abort_if_silent(fresh).await
    }

    /// A pairing code for `phone` (already validated), opening a window if needed.
    /// A code already issued for that phone and still valid is served again.
    pub async fn phone_code(&self, phone: &str) -> Result<String, LinkError> {
        if let Some(code) = self
            .snapshot()
            .pair_code
            .filter(|c| c.phone == phone && c.expires > Instant::now())
        {
            return Ok(code.code);
        }
        self.open_window().await?;
        // The window is usable once the client shows its first QR (it is registered).
        let registered = self.wait_for(|s| s.qr.clone()).await;
        self.abort_if_silent(registered).await?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::PairCode {
                phone: phone.to_owned(),
                reply,
            })
            .await
            .map_err(|_| LinkError::Gone)?;
        let code = match tokio::time::timeout(self.link_wait, answer).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(LinkError::Gone),
            Err(_) => return Err(LinkError::Unreachable),
        };
        // The client announces the code as an event too; once the snapshot holds it,
        // asking again serves it without a new request.
        let mut rx = self.snapshot.clone();
        let known = rx.wait_for(|s| s.pair_code.as_ref().is_some_and(|c| c.code == code));
        let _ = tokio::time::timeout(Duration::from_secs(2), known).await;
        Ok(code)
    }

    async fn open_window(&self) -> Result<(), LinkError> {
        match self.snapshot().state {
            State::Connected => Err(LinkError::AlreadyConnected),
            State::Reconnecting | State::Stopped => Err(LinkError::SessionStored),
            State::NoSession => self.send(Input::OpenLink).await,
            State::Linking => Ok(()),
        }
    }

    /// Waits up to the link wait for `pick` to find something in a snapshot, or for
    /// the window to end.
    async fn wait_for<T>(
        &self,
        mut pick: impl FnMut(&Snapshot) -> Option<T>,
    ) -> Result<T, LinkError> {
        let mut rx = self.snapshot.clone();
        let deadline = Instant::now() + self.link_wait;
        loop {
            {
                let snapshot = rx.borrow_and_update();
                if let Some(found) = pick(&snapshot) {
                    return Ok(found);
                }
                match snapshot.state {
                    State::Linking => {}
                    State::Connected => return Err(LinkError::AlreadyConnected),
                    State::Reconnecting | State::Stopped => return Err(LinkError::SessionStored),
                    State::NoSession => return Err(LinkError::WindowClosed),
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(LinkError::Gone),
                Err(_) => return Err(LinkError::Unreachable),
            }
        }
    }

    /// A window that produced nothing within the wait is closed again, so the instance
    /// does not keep knocking on an unreachable WhatsApp.
    async fn abort_if_silent<T>(&self, outcome: Result<T, LinkError>) -> Result<T, LinkError> {
        if matches!(outcome, Err(LinkError::Unreachable)) && self.snapshot().qr.is_none() {
            let _ = self.send(Input::AbortLink).await;
        }
        outcome
    }
}
