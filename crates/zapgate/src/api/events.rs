//! The instance's event stream: its state, new QR codes and pairing codes as
//! server-sent events, so an app (and the panel) follows linking without polling.
//! Every client first gets the current state (and the code showing now, if any), so a
//! client that reconnects, with `Last-Event-ID` or not, is up to date at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse as _, Response};
use futures_util::stream::{self, Stream, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use axum::extract::State as AxumState;

use super::auth::Instance;
use super::limits::StreamSlot;
use super::{ApiError, AppState};
use crate::instance::{Device, EventKind, InstanceHandle, Problem, Snapshot, State};

/// A comment every 15 s keeps proxies from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub(super) async fn events(
    AxumState(state): AxumState<AppState>,
    Instance(instance): Instance,
) -> Result<Response, ApiError> {
    let slot = state.streams.take(&instance_key(&instance))?;
    // Ended with the instance's task, as its own events are.
    let mut watch = instance.watch();
    let ended = async move { while watch.changed().await.is_ok() {} };
    let notes =
        messages(state.messaging.notes(), instance.record.id.as_str().into()).take_until(ended);
    let events = stream::select(body(instance, state.shutdown.clone(), View::Full), notes)
        .take_until(state.shutdown.clone().cancelled_owned());
    Ok(respond(holding(slot, events)))
}

/// The instance's message events (`message`, `status`), with Z-API's webhook bodies.
/// They carry no id: a stream that reconnects does not get them again (the webhooks
/// deliver every one).
fn messages(
    notes: tokio::sync::broadcast::Receiver<crate::messaging::Note>,
    instance: Arc<str>,
) -> impl Stream<Item = Result<Sse, Infallible>> + Send + 'static {
    stream::unfold(notes, move |mut notes| {
        let instance = instance.clone();
        async move {
            loop {
                match notes.recv().await {
                    Ok(note) if note.instance == instance => {
                        let event = Sse::default().event(note.name).data(&*note.body);
                        return Some((Ok(event), notes));
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    })
}

/// The stream slots an instance's streams count against (its own, and the panel's of it).
pub(super) fn instance_key(instance: &InstanceHandle) -> String {
    format!("instance/{}", instance.record.id)
}

/// `stream`, holding `slot` for as long as it is open.
pub(super) fn holding<S: Stream>(slot: StreamSlot, stream: S) -> impl Stream<Item = S::Item> {
    stream.map(move |item| {
        let _held = &slot;
        item
    })
}

/// Who reads a stream: the instance's own API client or operator, or the holder of a
/// link page (by its token's hash), who learns only what linking needs, and the linked
/// number only when it was linked through that page.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum View {
    Full,
    Page(Arc<str>),
}

/// The instance's events from now on, after its state as it stands. The stream ends
/// when the instance's task does (a cancel) and when the gateway shuts down.
pub(super) fn stream(
    instance: InstanceHandle,
    shutdown: tokio_util::sync::CancellationToken,
    slot: StreamSlot,
) -> Response {
    respond(holding(slot, body(instance, shutdown, View::Full)))
}

/// Events as a `text/event-stream` response, with keep-alive comments.
pub(super) fn respond<S: Stream<Item = Result<Sse, Infallible>> + Send + 'static>(
    events: S,
) -> Response {
    axum::response::Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// The events of [`stream`], for a caller that adds its own end.
pub(super) fn body(
    instance: InstanceHandle,
    shutdown: tokio_util::sync::CancellationToken,
    view: View,
) -> impl Stream<Item = Result<Sse, Infallible>> + Send + 'static {
    let (receiver, snapshot) = instance.subscribe();
    let first = current(&snapshot, &view);
    let rest = stream::unfold(
        (receiver, snapshot.event_id, instance),
        move |(receiver, seen, instance)| {
            let view = view.clone();
            async move {
                let mut receiver = receiver?;
                loop {
                    match receiver.recv().await {
                        Ok(event) if event.id <= seen => continue,
                        Ok(event)
                            if !shown(&event.kind, &view, |page| {
                                instance.snapshot().pages_handed.contains(page)
                            }) =>
                        {
                            continue;
                        }
                        Ok(event) => {
                            let sent = vec![sse(event.id, &event.kind, &view)];
                            return Some((sent, (Some(receiver), event.id, instance)));
                        }
                        // Too far behind: start again from the state as it stands.
                        Err(RecvError::Lagged(_)) => {
                            let snapshot = instance.snapshot();
                            let sent = current(&snapshot, &view);
                            let next = (Some(receiver), snapshot.event_id, instance);
                            return Some((sent, next));
                        }
                        Err(RecvError::Closed) => return None,
                    }
                }
            }
        },
    );
    stream::iter([first])
        .chain(rest)
        .flat_map(stream::iter)
        .map(Ok)
        .take_until(shutdown.cancelled_owned())
}

/// The state as it stands, and the code showing now.
fn current(snapshot: &Snapshot, view: &View) -> Vec<Sse> {
    let id = snapshot.event_id;
    let mut sent = vec![sse(
        id,
        &EventKind::State {
            state: snapshot.state,
            device: snapshot.device.clone(),
            problem: snapshot.problem.clone(),
        },
        view,
    )];
    let codes = [
        snapshot.qr.clone().map(EventKind::Qr),
        snapshot.pair_code.clone().map(EventKind::PairCode),
    ];
    for code in codes.into_iter().flatten() {
        if shown(&code, view, |page| snapshot.pages_handed.contains(page)) {
            sent.push(sse(id, &code, view));
        }
    }
    sent
}

/// Whether the reader sees the event: a link page sees a window's codes only once it
/// was handed them (it asked, which `handed` tells, asked only then), not those of a
/// window someone else is linking with.
fn shown(kind: &EventKind, view: &View, handed: impl FnOnce(&Arc<str>) -> bool) -> bool {
    match (kind, view) {
        (EventKind::Qr(_) | EventKind::PairCode(_), View::Page(page)) => handed(page),
        _ => true,
    }
}

fn sse(id: u64, kind: &EventKind, view: &View) -> Sse {
    let (name, data) = match (kind, view) {
        (EventKind::State { state, device, .. }, View::Page(page)) => {
            let connected = *state == State::Connected;
            let phone = device
                .as_ref()
                .filter(|d| connected && d.linked_through.as_ref() == Some(page))
                .map(|d| &d.phone);
            (
                "state",
                json!({
                    "state": state_name(*state),
                    "connected": connected,
                    "phone": phone,
                }),
            )
        }
        (
            EventKind::State {
                state,
                device,
                problem,
            },
            View::Full,
        ) => (
            "state",
            state_body(*state, device.as_ref(), problem.as_ref()),
        ),
        (EventKind::Qr(qr), _) => (
            "qr",
            json!({
                "value": qr.value,
                "image": qr.image_data_url(),
                "expiresIn": seconds_left(qr.expires),
            }),
        ),
        (EventKind::ConnectionError(cause), _) => (
            "connection-error",
            if *view == View::Full {
                json!({ "cause": cause.kind(), "error": cause.to_string() })
            } else {
                json!({ "error": "WhatsApp cannot be reached right now: try again in a moment." })
            },
        ),
        (EventKind::PairCode(code), _) => (
            "pairing-code",
            json!({
                // Whoever asked typed this number; a link page's holder is not told it.
                "phone": Some(&code.phone).filter(|_| *view == View::Full),
                "code": code.code,
                "expiresIn": seconds_left(code.expires),
            }),
        ),
    };
    Sse::default()
        .id(id.to_string())
        .event(name)
        .data(data.to_string())
}

fn seconds_left(at: Instant) -> u64 {
    at.saturating_duration_since(Instant::now()).as_secs()
}

/// `{"state", "connected", "error", "phone", "device", "name", "linkedSince", "problem"}`:
/// `/status`'s answer, with the state's name, the linked device and what is wrong.
pub(super) fn state_body(
    state: State,
    device: Option<&Device>,
    problem: Option<&Problem>,
) -> Value {
    let mut body = super::instance::status_body(state, problem);
    body["state"] = json!(state_name(state));
    body["phone"] = json!(device.map(|d| &d.phone));
    body["device"] = json!(device.and_then(|d| d.device_id));
    body["name"] = json!(device.map(|d| &d.name).filter(|n| !n.is_empty()));
    body["linkedSince"] = json!(device.map(|d| crate::iso_time(d.linked_at)));
    body["problem"] = json!(problem.map(ToString::to_string));
    body
}

pub(crate) fn state_name(state: State) -> &'static str {
    match state {
        State::NoSession => "noSession",
        State::Linking => "linking",
        State::Connected => "connected",
        State::Reconnecting => "reconnecting",
        State::Stopped => "stopped",
        State::SessionMissing => "sessionMissing",
        State::Unlinking => "unlinking",
    }
}

/// Every instance's state changes, for the panel's list: `instance` events
/// (`{"id", "state", "phone"}`), and `resync` when the reader fell behind and should
/// load the list again. Ends at shutdown.
pub(super) fn every_instance<S>(
    states: S,
    shutdown: tokio_util::sync::CancellationToken,
    slot: StreamSlot,
) -> axum::response::Sse<impl Stream<Item = Result<Sse, Infallible>>>
where
    S: Stream<Item = Sse> + Send + 'static,
{
    let events = states.map(Ok).take_until(shutdown.cancelled_owned());
    axum::response::Sse::new(holding(slot, events))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// The state changes of every instance this node runs, from now on; `resync` when
/// some were missed.
pub(super) fn instance_states(
    receiver: tokio::sync::broadcast::Receiver<std::sync::Arc<crate::instance::Event>>,
) -> impl Stream<Item = Sse> + Send + 'static {
    stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(event) => {
                    if let EventKind::State { state, device, .. } = &event.kind {
                        let data = json!({
                            "id": &*event.instance,
                            "state": state_name(*state),
                            "phone": device.as_ref().map(|d| &d.phone),
                        });
                        let sent = Sse::default().event("instance").data(data.to_string());
                        return Some((sent, receiver));
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    return Some((Sse::default().event("resync").data("{}"), receiver));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

/// Longest event read from another node: past it, the stream is taken as broken.
const LONGEST_EVENT: usize = 64 * 1024;

/// The events of a server-sent event stream read from another node (its comments and
/// fields other than `event` and `data` left out); `None` once it ended or failed.
pub(super) fn read_events(
    answer: reqwest::Response,
) -> impl Stream<Item = Option<Sse>> + Send + 'static {
    stream::unfold(
        (answer, Vec::<u8>::new(), false),
        |(mut answer, mut buffer, ended)| async move {
            if ended {
                return None;
            }
            loop {
                if let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                    let frame: Vec<u8> = buffer.drain(..end + 2).collect();
                    if let Some(event) = parse_event(&String::from_utf8_lossy(&frame)) {
                        return Some((Some(event), (answer, buffer, false)));
                    }
                    continue;
                }
                if buffer.len() > LONGEST_EVENT {
                    return Some((None, (answer, buffer, true)));
                }
                match answer.chunk().await {
                    Ok(Some(chunk)) => buffer.extend_from_slice(&chunk),
                    Ok(None) | Err(_) => return Some((None, (answer, buffer, true))),
                }
            }
        },
    )
}

/// One event of a stream, from its lines; none for a comment alone, or for one this
/// gateway never writes (a carriage return in it).
fn parse_event(frame: &str) -> Option<Sse> {
    if frame.contains('\r') {
        return None;
    }
    let (mut name, mut data) = (None, Vec::new());
    for line in frame.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = Some(value),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() {
        return None;
    }
    let event = Sse::default().data(data.join("\n"));
    Some(match name {
        Some(name) => event.event(name),
        None => event,
    })
}
