//! The life of one instance as a pure function: (state, input) -> (state, actions).
//! The instance's task feeds it API requests, client events and the results of its
//! child tasks, and carries out the actions.

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
    /// A link is recorded but its session is missing or unreadable (a data
    /// directory that is not mounted, say). Nothing is forgotten: restore once the
    /// sessions database is back.
    SessionMissing,
    /// The device is being removed at WhatsApp, then the session deleted.
    Unlinking,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Someone asked for a QR or pairing code.
    OpenLink,
    /// The window's client could not start, or produced no code in time.
    LinkFailed,
    /// WhatsApp ended the linking window: codes exhausted, or the socket closed.
    WindowEnded,
    /// The link could not be recorded: it must not stay linked at WhatsApp.
    LinkNotRecorded,
    /// Reconnect the stored session from scratch.
    Restart,
    /// Make sure the stored session is connecting (at start-up, or on request).
    Restore,
    /// Unlink at WhatsApp and forget the session.
    Disconnect,
    /// The device was removed at WhatsApp (or could not be) and its client stopped.
    Unlinked,
    /// A session client could not start.
    StartFailed,
    /// The stored session's file is gone.
    FileMissing,
    Connected,
    /// The connection dropped; the client reconnects by itself.
    Disconnected,
    /// WhatsApp says the device is no longer linked (phone unlinked it, or the
    /// credentials were refused).
    LoggedOut,
    /// Another client logged in with this session.
    Replaced,
    /// The client's run loop ended.
    ClientStopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a client on an empty session: it registers and shows codes.
    StartLinkClient,
    /// Start a client on the stored session.
    StartSessionClient,
    /// Have the running client skip its backoff and reconnect now.
    ReconnectNow,
    /// Stop the client, keeping the session.
    StopClient,
    /// Stop the window's client and delete its unlinked session.
    CloseWindow,
    /// Remove the device at WhatsApp (connecting the session if needed), then stop.
    Unlink,
    /// Forget the link and delete the session (WhatsApp already dropped the device, or
    /// the unlink finished).
    Forget,
}

use Action::*;
use State::*;

/// The next state and what to do to get there. `linked` says whether a link is
/// recorded (a pairing completed, was stored, and was not forgotten since).
pub fn step(state: State, linked: bool, input: Input) -> (State, Vec<Action>) {
    match (state, input) {
        // Unlinking ends only when the unlink does; the client being logged out
        // reports its own end meanwhile.
        (Unlinking, Input::Unlinked) => (NoSession, vec![Forget]),
        (Unlinking, _) => (Unlinking, vec![]),

        (NoSession, Input::OpenLink) if !linked => (Linking, vec![StartLinkClient]),
        (Linking, Input::LinkNotRecorded) => (Unlinking, vec![Unlink]),
        (Linking, Input::LinkFailed | Input::WindowEnded) if !linked => {
            (NoSession, vec![CloseWindow])
        }
        (Linking, Input::ClientStopped | Input::Disconnected) if !linked => {
            (NoSession, vec![CloseWindow])
        }
        (Linking | Reconnecting, Input::Connected) if linked => (Connected, vec![]),

        (NoSession, Input::Disconnect) => (NoSession, vec![]),
        (Linking, Input::Disconnect) if !linked => (NoSession, vec![CloseWindow]),
        // Without the session nothing can tell WhatsApp; the user still asked.
        (SessionMissing, Input::Disconnect) => (NoSession, vec![Forget]),
        (_, Input::Disconnect) if linked => (Unlinking, vec![Unlink]),

        // Linking and linked: paired, but the login never completed.
        (Connected | Reconnecting | Stopped | Linking, Input::Restart) if linked => {
            (Reconnecting, vec![StopClient, StartSessionClient])
        }
        (Stopped, Input::Restore) if linked => (Reconnecting, vec![StartSessionClient]),
        (Reconnecting, Input::Restore) => (Reconnecting, vec![ReconnectNow]),
        (Reconnecting, Input::StartFailed) => (Stopped, vec![]),
        (Reconnecting | Stopped, Input::FileMissing) if linked => (SessionMissing, vec![]),

        (Connected, Input::Disconnected) => (Reconnecting, vec![]),
        (Linking | Connected | Reconnecting | Stopped, Input::LoggedOut) if linked => {
            (NoSession, vec![Forget])
        }
        (Linking, Input::LoggedOut) => (NoSession, vec![CloseWindow]),
        (Linking | Connected | Reconnecting, Input::Replaced) if linked => {
            (Stopped, vec![StopClient])
        }
        (Linking | Connected | Reconnecting, Input::ClientStopped) if linked => {
            (Stopped, vec![StopClient])
        }

        // Anything else changes nothing: a linked instance never opens a window, a
        // request without a session has nothing to restore, late events are ignored.
        (state, _) => (state, vec![]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linking_opens_once_and_ends_connected_once_recorded() {
        assert_eq!(
            step(NoSession, false, Input::OpenLink),
            (Linking, vec![StartLinkClient])
        );
        assert_eq!(step(Linking, false, Input::OpenLink), (Linking, vec![]));
        assert_eq!(step(Linking, false, Input::Connected), (Linking, vec![]));
        assert_eq!(step(Linking, true, Input::Connected), (Connected, vec![]));
    }

    #[test]
    fn a_link_that_cannot_be_recorded_is_undone_at_whatsapp() {
        assert_eq!(
            step(Linking, false, Input::LinkNotRecorded),
            (Unlinking, vec![Unlink])
        );
        assert_eq!(
            step(Unlinking, false, Input::Connected),
            (Unlinking, vec![])
        );
        assert_eq!(
            step(Unlinking, false, Input::Unlinked),
            (NoSession, vec![Forget])
        );
    }

    #[test]
    fn every_end_of_a_window_stops_talking_to_whatsapp() {
        for input in [
            Input::LinkFailed,
            Input::WindowEnded,
            Input::ClientStopped,
            Input::Disconnected,
            Input::LoggedOut,
            Input::Disconnect,
        ] {
            assert_eq!(
                step(Linking, false, input),
                (NoSession, vec![CloseWindow]),
                "{input:?}"
            );
        }
    }

    #[test]
    fn a_linked_instance_never_opens_a_window() {
        for state in [Connected, Reconnecting, Stopped, SessionMissing, Unlinking] {
            assert_eq!(step(state, true, Input::OpenLink), (state, vec![]));
        }
    }

    #[test]
    fn drops_reconnect_and_logouts_forget() {
        assert_eq!(
            step(Connected, true, Input::Disconnected),
            (Reconnecting, vec![])
        );
        assert_eq!(
            step(Reconnecting, true, Input::Connected),
            (Connected, vec![])
        );
        for state in [Connected, Reconnecting, Stopped, Linking] {
            assert_eq!(
                step(state, true, Input::LoggedOut),
                (NoSession, vec![Forget])
            );
        }
    }

    #[test]
    fn a_replaced_or_ended_client_stays_down_until_restored() {
        assert_eq!(
            step(Connected, true, Input::Replaced),
            (Stopped, vec![StopClient])
        );
        assert_eq!(
            step(Reconnecting, true, Input::ClientStopped),
            (Stopped, vec![StopClient])
        );
        assert_eq!(step(Stopped, true, Input::Disconnected), (Stopped, vec![]));
        assert_eq!(
            step(Stopped, true, Input::Restore),
            (Reconnecting, vec![StartSessionClient])
        );
        assert_eq!(
            step(Reconnecting, true, Input::StartFailed),
            (Stopped, vec![])
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
        assert_eq!(step(Connected, true, Input::Restore), (Connected, vec![]));
        assert_eq!(
            step(Reconnecting, true, Input::Restore),
            (Reconnecting, vec![ReconnectNow])
        );
        assert_eq!(
            step(SessionMissing, true, Input::Restore),
            (SessionMissing, vec![])
        );
        assert_eq!(
            step(Reconnecting, true, Input::FileMissing),
            (SessionMissing, vec![])
        );
        assert_eq!(
            step(Linking, true, Input::Restart),
            (Reconnecting, vec![StopClient, StartSessionClient])
        );
    }

    #[test]
    fn disconnect_unlinks_a_session_and_closes_a_window() {
        for state in [Connected, Reconnecting, Stopped, Linking] {
            assert_eq!(
                step(state, true, Input::Disconnect),
                (Unlinking, vec![Unlink])
            );
        }
        assert_eq!(
            step(SessionMissing, true, Input::Disconnect),
            (NoSession, vec![Forget])
        );
        assert_eq!(
            step(NoSession, false, Input::Disconnect),
            (NoSession, vec![])
        );
        assert_eq!(
            step(Unlinking, true, Input::Disconnect),
            (Unlinking, vec![])
        );
    }

    #[test]
    fn late_events_from_a_stopped_client_change_nothing() {
        for input in [
            Input::Connected,
            Input::Disconnected,
            Input::ClientStopped,
            Input::WindowEnded,
            Input::LoggedOut,
        ] {
            assert_eq!(step(NoSession, false, input), (NoSession, vec![]));
        }
    }
}
