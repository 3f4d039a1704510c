//! The life of one instance as a pure function: (state, input) -> (state, actions).
//! The actor feeds it API requests and client events and carries out the actions.

/// Where an instance stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No WhatsApp session is stored and nothing talks to WhatsApp.
    NoSession,
    /// A linking window is open: a fresh client shows QR codes or a pairing code.
    Linking,
    /// Linked and online.
    Connected,
    /// A stored session that is (re)connecting; the client retries with backoff.
    Reconnecting,
    /// A stored session whose client is not running: replaced by another client,
    /// refused for a reason other than logout, or stopped. Restore to reconnect.
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Someone asked for a QR or pairing code.
    OpenLink,
    /// No code came from WhatsApp within the wait.
    AbortLink,
    /// Reconnect the stored session from scratch.
    Restart,
    /// Make sure the stored session is connecting (at start-up, or on request).
    Restore,
    /// Unlink at WhatsApp and forget the session.
    Disconnect,
    /// The phone accepted the link.
    Paired,
    Connected,
    /// The connection dropped; the client reconnects by itself.
    Disconnected,
    /// WhatsApp says the device is no longer linked (phone unlinked it, or the
    /// credentials were refused).
    LoggedOut,
    /// Another client logged in with this session.
    Replaced,
    /// The linking window closed with no link.
    CodesExhausted,
    /// The client's run loop ended.
    ClientStopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a client with a fresh (empty) session store: it registers and shows codes.
    StartLinkClient,
    /// Start a client on the stored session.
    StartSessionClient,
    /// Have the running client skip its backoff and reconnect now.
    ReconnectNow,
    /// Tell WhatsApp to remove this device, if connected.
    Logout,
    StopClient,
    /// Persist the linked number.
    RecordLink,
    /// Delete the stored session keys and the linked number.
    WipeSession,
}

use Action::*;
use State::*;

/// The next state and what to do to get there. `linked` says whether a session is
/// stored (a pairing completed and was not wiped since).
pub fn step(state: State, linked: bool, input: Input) -> (State, Vec<Action>) {
    match (state, input) {
        (NoSession, Input::OpenLink) => (Linking, vec![StartLinkClient]),
        (Linking, Input::OpenLink) => (Linking, vec![]),
        (Linking, Input::Paired) => (Linking, vec![RecordLink]),
        (Linking | Reconnecting, Input::Connected) if linked => (Connected, vec![]),
        (Linking, Input::AbortLink | Input::CodesExhausted) if !linked => {
            (NoSession, vec![StopClient, WipeSession])
        }
        (Linking, Input::ClientStopped) if !linked => (NoSession, vec![WipeSession]),

        (_, Input::Disconnect) if linked => (NoSession, vec![Logout, StopClient, WipeSession]),
        (Linking, Input::Disconnect) => (NoSession, vec![StopClient, WipeSession]),

        (_, Input::Restart) if linked => (Reconnecting, vec![StopClient, StartSessionClient]),
        (Stopped, Input::Restore) if linked => (Reconnecting, vec![StartSessionClient]),
        (Reconnecting, Input::Restore) => (Reconnecting, vec![ReconnectNow]),
        (NoSession, Input::Restore) if linked => (Reconnecting, vec![StartSessionClient]),

        (Connected, Input::Disconnected) => (Reconnecting, vec![]),
        // Also when stopped: the run loop's end can overtake the client's last event.
        (Linking | Connected | Reconnecting | Stopped, Input::LoggedOut) => {
            (NoSession, vec![StopClient, WipeSession])
        }
        (Linking | Connected | Reconnecting, Input::Replaced) if linked => {
            (Stopped, vec![StopClient])
        }
        (Linking | Connected | Reconnecting, Input::ClientStopped) if linked => (Stopped, vec![]),

        // Anything else changes nothing: a connected instance never opens a window,
        // a request without a session has nothing to restore, late events are ignored.
        (state, _) => (state, vec![]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linking_opens_once_and_ends_connected_with_the_link_recorded() {
        assert_eq!(
            step(NoSession, false, Input::OpenLink),
            (Linking, vec![StartLinkClient])
        );
        assert_eq!(step(Linking, false, Input::OpenLink), (Linking, vec![]));
        assert_eq!(
            step(Linking, false, Input::Paired),
            (Linking, vec![RecordLink])
        );
        assert_eq!(step(Linking, true, Input::Connected), (Connected, vec![]));
    }

    #[test]
    fn a_window_that_closes_unlinked_stops_talking_to_whatsapp() {
        for input in [Input::AbortLink, Input::CodesExhausted] {
            assert_eq!(
                step(Linking, false, input),
                (NoSession, vec![StopClient, WipeSession])
            );
        }
        assert_eq!(
            step(Linking, false, Input::ClientStopped),
            (NoSession, vec![WipeSession])
        );
    }

    #[test]
    fn a_connected_instance_never_opens_a_window() {
        assert_eq!(step(Connected, true, Input::OpenLink), (Connected, vec![]));
        assert_eq!(
            step(Reconnecting, true, Input::OpenLink),
            (Reconnecting, vec![])
        );
        assert_eq!(step(Stopped, true, Input::OpenLink), (Stopped, vec![]));
    }

    #[test]
    fn drops_reconnect_and_logouts_wipe() {
        assert_eq!(
            step(Connected, true, Input::Disconnected),
            (Reconnecting, vec![])
        );
        assert_eq!(
            step(Reconnecting, true, Input::Connected),
            (Connected, vec![])
        );
        assert_eq!(
            step(Connected, true, Input::LoggedOut),
            (NoSession, vec![StopClient, WipeSession])
        );
        assert_eq!(
            step(Stopped, true, Input::LoggedOut),
            (NoSession, vec![StopClient, WipeSession])
        );
        assert_eq!(
            step(Reconnecting, true, Input::LoggedOut),
            (NoSession, vec![StopClient, WipeSession])
        );
    }

    #[test]
    fn a_replaced_stream_stays_down_until_restored() {
        assert_eq!(
            step(Connected, true, Input::Replaced),
            (Stopped, vec![StopClient])
        );
        assert_eq!(step(Stopped, true, Input::Disconnected), (Stopped, vec![]));
        assert_eq!(
            step(Stopped, true, Input::Restore),
            (Reconnecting, vec![StartSessionClient])
        );
    }

    #[test]
    fn restart_and_restore_need_a_session() {
        assert_eq!(
            step(Connected, true, Input::Restart),
            (Reconnecting, vec![StopClient, StartSessionClient])
        );
        assert_eq!(step(NoSession, false, Input::Restart), (NoSession, vec![]));
        assert_eq!(step(NoSession, false, Input::Restore), (NoSession, vec![]));
        assert_eq!(
            step(NoSession, true, Input::Restore),
            (Reconnecting, vec![StartSessionClient])
        );
        assert_eq!(step(Connected, true, Input::Restore), (Connected, vec![]));
        assert_eq!(
            step(Reconnecting, true, Input::Restore),
            (Reconnecting, vec![ReconnectNow])
        );
    }

    #[test]
    fn disconnect_unlinks_a_session_and_closes_a_window() {
        for state in [Connected, Reconnecting, Stopped] {
            assert_eq!(
                step(state, true, Input::Disconnect),
                (NoSession, vec![Logout, StopClient, WipeSession])
            );
        }
        assert_eq!(
            step(Linking, false, Input::Disconnect),
            (NoSession, vec![StopClient, WipeSession])
        );
        assert_eq!(
            step(NoSession, false, Input::Disconnect),
            (NoSession, vec![])
        );
    }

    #[test]
    fn late_events_from_a_stopped_client_change_nothing() {
        for input in [
            Input::Connected,
            Input::Disconnected,
            Input::ClientStopped,
            Input::CodesExhausted,
        ] {
            assert_eq!(step(NoSession, false, input), (NoSession, vec![]));
        }
    }
}
