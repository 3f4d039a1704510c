//! Instances: one task per WhatsApp number owning its client and taking every decision
//! about it (`actor`, with its linking flows in `linking`, what each requester may ask
//! for in `budget`, and its slow work in `work`), the registry of them (`manager`), the
//! pure state machine (`state`), the clients on their sessions (`session`), and the
//! removal of devices set-aside sessions left linked at WhatsApp (`ghosts`). No HTTP
//! types here.

mod actor;
mod budget;
pub mod events;
mod ghosts;
mod linking;
mod manager;
mod session;
pub mod state;
mod work;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

pub use events::{Event, EventKind};
pub use manager::{Manager, ManagerConfig, NewInstance};
pub use state::State;

pub(crate) use crate::store::InstanceRecord;
use actor::Command;

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

#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// When the number was linked (unix milliseconds).
    pub linked_at: i64,
    /// The link page (its token's hash) the number was linked through: set only when
    /// that page alone was handed codes in the window that linked.
    pub linked_through: Option<Arc<str>>,
}

/// Pairing codes one link page may be given over its life.
pub const PAGE_PAIR_CODES: u32 = 10;

/// Who asks for linking: the operator (the API and the panel), or the holder of a link
/// page, who has budgets of their own and may stop only the linking they started.
#[derive(Clone, Debug)]
pub enum Requester {
    Operator,
    Page {
        /// The page's token's hash.
        id: Arc<str>,
        /// Pairing codes the page was given so far, as stored.
        pair_codes: u32,
    },
}

impl Requester {
    /// The link page asking, if it is one.
    fn page(&self) -> Option<&Arc<str>> {
        match self {
            Requester::Operator => None,
            Requester::Page { id, .. } => Some(id),
        }
    }

    /// The same operator or page (whatever its count said).
    fn is(&self, other: &Requester) -> bool {
        self.page() == other.page()
    }
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
    /// Why the instance is not connected, when there is more to say than its state.
    pub problem: Option<Problem>,
    /// The id of the last event published with this snapshot.
    pub event_id: u64,
    /// The link pages (by their tokens' hashes) handed the open window's codes: only
    /// their event streams show them.
    pub pages_handed: Arc<[Arc<str>]>,
}

/// Something the user must hear about, beyond the state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error(
        "Its stored WhatsApp session is missing from the gateway's data directory; the operator must check it, then restore the session."
    )]
    SessionMissing,
    #[error(
        "The link could not be saved, so the device was unlinked at WhatsApp; link the number again."
    )]
    LinkNotSaved,
}

/// Why WhatsApp could not be reached; the first line of what a user sees.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Cause {
    #[error("WhatsApp is unreachable: {0}")]
    Unreachable(String),
    #[error(
        "WhatsApp's certificate was refused: the server at the WhatsApp URL could not prove it is WhatsApp"
    )]
    CertificateRefused,
    #[error(
        "WhatsApp's web version is unknown: set --whatsapp-version (ZAPGATE_WHATSAPP_VERSION), e.g. 2.3000.1030000000\n{0}"
    )]
    VersionUnknown(String),
    #[error("WhatsApp did not answer in time; try again later")]
    NoAnswer,
    #[error("the session could not be opened here: {0}")]
    Storage(String),
    #[error(
        "this gateway's open-file limit leaves room for {0} sessions at once, all in use: raise the limit (ulimit -n, or LimitNOFILE= under systemd) and restart"
    )]
    TooManySessions(usize),
}

impl Cause {
    /// A short name for it, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Cause::Unreachable(_) => "unreachable",
            Cause::CertificateRefused => "certificate_refused",
            Cause::VersionUnknown(_) => "version_unknown",
            Cause::NoAnswer => "no_answer",
            Cause::Storage(_) => "storage",
            Cause::TooManySessions(_) => "too_many_sessions",
        }
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("You are already connected.")]
    AlreadyConnected,
    #[error("You need to restore the session.")]
    SessionStored,
    #[error("You need to restore the session. {0}")]
    Problem(Problem),
    #[error("{0}")]
    Unavailable(Cause),
    #[error("the linking window closed before a code was issued; ask again")]
    WindowClosed,
    #[error(
        "WhatsApp's QR codes for this window ran out while a pairing code is still valid: type that code, or ask again once it expires"
    )]
    QrCodesRanOut,
    #[error("a pairing code was requested for another number ({0}), which replaced this request")]
    Replaced(String),
    #[error("WhatsApp refused the pairing code request: {0}")]
    Refused(String),
    #[error("the number is being disconnected; try again in a moment")]
    Unlinking,
    #[error("too many linking requests for this instance; try again in {} s", whole_seconds(*.0))]
    RateLimited(Duration),
    /// Said to a link page's holder.
    #[error(
        "This link has given all the pairing codes it may ({PAGE_PAIR_CODES}): link with the QR code instead, or ask whoever sent the link for a new one."
    )]
    PageCodesUsedUp,
    /// Said to a link page's holder who asked to stop linking that someone else started.
    #[error("This linking was not started from this link, so it stays open.")]
    NotStartedHere,
    #[error("the instance is shutting down")]
    Gone,
}

/// A wait in whole seconds, rounded up: waiting that long is always enough.
pub fn whole_seconds(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

/// How a disconnect went at WhatsApp; the session is deleted here either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unlinked {
    /// WhatsApp removed the device (or there was nothing linked).
    Told,
    /// WhatsApp could not be told; the phone still lists the device until it is
    /// removed there.
    NotTold(String),
}

/// A cheap handle to one instance's task: every method is a command it decides on.
#[derive(Clone)]
pub struct InstanceHandle {
    pub record: Arc<InstanceRecord>,
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Snapshot>,
    /// Weak: the stream of an instance whose task ended ends too.
    events: broadcast::WeakSender<Arc<Event>>,
}

impl InstanceHandle {
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// Every event from now on, and the snapshot as it stands: events with an id up to
    /// the snapshot's `event_id` are already in it.
    /// `None` for the events once the instance's task has ended.
    pub fn subscribe(&self) -> (Option<broadcast::Receiver<Arc<Event>>>, Snapshot) {
        let events = self.events.upgrade().map(|sender| sender.subscribe());
        (events, self.snapshot())
    }

    /// Closes the linking window if one is open and nothing is linked yet; a link page
    /// closes only a window it opened.
    pub async fn stop_linking(&self, by: Requester) -> Result<(), LinkError> {
        self.ask(|reply| Command::StopLinking { by, reply }).await
    }

    /// A receiver of every new snapshot, for waiting on a change.
    pub fn watch(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.clone()
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, LinkError>>) -> Command,
    ) -> Result<T, LinkError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| LinkError::Gone)?;
        answer.await.map_err(|_| LinkError::Gone)?
    }

    pub async fn restart(&self) -> Result<(), LinkError> {
        self.ask(|reply| Command::Restart { reply }).await
    }

    pub async fn restore(&self) -> Result<(), LinkError> {
        self.ask(|reply| Command::Restore { reply }).await
    }

    /// Unlinks at WhatsApp (within the link wait) and deletes the session.
    pub async fn disconnect(&self) -> Result<Unlinked, LinkError> {
        self.ask(|reply| Command::Disconnect { reply }).await
    }

    /// The QR code valid now, opening a linking window if none is open.
    pub async fn qr_code(&self, by: Requester) -> Result<Arc<QrCode>, LinkError> {
        self.ask(|reply| Command::QrCode { by, reply }).await
    }

    /// A pairing code for `phone` (already validated), opening a window if needed. The
    /// same phone in the same window gets the same code.
    pub async fn phone_code(&self, phone: &str, by: Requester) -> Result<String, LinkError> {
        let phone = phone.to_owned();
        self.ask(|reply| Command::PairCode { phone, by, reply })
            .await
    }

    /// Unlinks, deletes the session, then the instance; the row is already marked.
    pub(crate) async fn cancel(&self) -> Result<Unlinked, LinkError> {
        self.ask(|reply| Command::Cancel { reply }).await
    }
}
