//! What happens to an instance, as events: published by its task, from the one place
//! it publishes its snapshot, for every reader (the event stream of the API and the
//! panel, and later the webhooks' outbox and the metrics).

use std::sync::Arc;

use super::{Cause, Device, PairCode, Problem, QrCode, State};

/// Events a slow reader of one instance may fall behind by before it must start again
/// from the current snapshot.
pub(super) const BACKLOG: usize = 16;
/// The same for a reader of every instance's events.
pub(super) const BUS_BACKLOG: usize = 1024;

/// One event of one instance, numbered in the order its task published it.
#[derive(Clone, Debug)]
pub struct Event {
    pub instance: Arc<str>,
    pub id: u64,
    pub kind: EventKind,
}

#[derive(Clone, Debug)]
pub enum EventKind {
    /// The instance's state, with the linked device and any problem.
    State {
        state: State,
        device: Option<Device>,
        problem: Option<Problem>,
    },
    /// WhatsApp issued a new QR code.
    Qr(Arc<QrCode>),
    /// WhatsApp issued a pairing code.
    PairCode(PairCode),
    /// A client could not reach WhatsApp (or open its session) for this reason.
    ConnectionError(Cause),
}

/// What the task last published, to tell what changed.
pub(super) struct Published {
    instance: Arc<str>,
    id: u64,
    state: Option<State>,
    device: Option<(String, Option<u16>, String)>,
    problem: Option<Problem>,
    qr: Option<String>,
    pair_code: Option<PairCode>,
}

impl Published {
    pub(super) fn new(instance: &str) -> Self {
        Self {
            instance: instance.into(),
            id: 0,
            state: None,
            device: None,
            problem: None,
            qr: None,
            pair_code: None,
        }
    }

    /// The id of the last event published (0 before the first).
    pub(super) fn last_id(&self) -> u64 {
        self.id
    }

    /// An event that changes nothing in the snapshot (a connection error), numbered.
    pub(super) fn happened(&mut self, kind: EventKind) -> Arc<Event> {
        self.id += 1;
        Arc::new(Event {
            instance: self.instance.clone(),
            id: self.id,
            kind,
        })
    }

    /// An event for each thing that changed since the last call, numbered.
    pub(super) fn changes(
        &mut self,
        state: State,
        device: Option<&Device>,
        problem: Option<&Problem>,
        qr: Option<&Arc<QrCode>>,
        pair_code: Option<&PairCode>,
    ) -> Vec<Arc<Event>> {
        let mut changes = Vec::new();
        let device_key = device.map(|d| (d.phone.clone(), d.device_id, d.name.clone()));
        if self.state != Some(state)
            || self.device != device_key
            || self.problem.as_ref() != problem
        {
            self.state = Some(state);
            self.device = device_key;
            self.problem = problem.cloned();
            changes.push(EventKind::State {
                state,
                device: device.cloned(),
                problem: problem.cloned(),
            });
        }
        let qr_value = qr.map(|q| q.value.clone());
        if qr_value != self.qr {
            self.qr = qr_value;
            if let Some(qr) = qr {
                changes.push(EventKind::Qr(qr.clone()));
            }
        }
        if pair_code != self.pair_code.as_ref() {
            self.pair_code = pair_code.cloned();
            if let Some(code) = pair_code {
                changes.push(EventKind::PairCode(code.clone()));
            }
        }
        changes
            .into_iter()
            .map(|kind| {
                self.id += 1;
                Arc::new(Event {
                    instance: self.instance.clone(),
                    id: self.id,
                    kind,
                })
            })
            .collect()
    }
}
