//! Messages and receipts between accounts, as WhatsApp's servers pass them: a device's
//! `<message>` is acknowledged at once, deduplicated by (device, id) and fanned out per
//! recipient device; a companion gets what is addressed to it live, and everything
//! stays queued for it until it says it has it (a receipt or an ack), so a device that
//! was away gets it at its next login, marked `offline`, before `<ib><offline>`.

use wacore_binary::builder::NodeBuilder;
use wacore_binary::{Jid, Node};

use crate::conn::{Connection, Session};
use crate::contact::{self, Command as ContactCommand, Incoming};
use crate::phone::Bundle;
use crate::registry::{Command, ConnId, Registry};
use crate::sim::{Sim, bump};
use crate::stanza::attr;

/// A stanza waiting for one device.
pub(crate) struct Queued {
    class: &'static str,
    id: String,
    /// A receipt's type (None for a delivery receipt).
    kind: Option<String>,
    node: Node,
    /// The connection it last went out on.
    sent_on: Option<ConnId>,
}

impl Queued {
    pub(crate) fn message(id: String, node: Node) -> Self {
        Self {
            class: "message",
            id,
            kind: None,
            node,
            sent_on: None,
        }
    }

    pub(crate) fn receipt(id: String, kind: Option<String>, node: Node) -> Self {
        Self {
            class: "receipt",
            id,
            kind,
            node,
            sent_on: None,
        }
    }
}

/// Queues `queued` for a companion and sends it at once if the device is connected.
fn deliver(sim: &Sim, registry: &mut Registry, number: &str, device: u32, mut queued: Queued) {
    let conn = registry
        .device_conns(number, Some(device))
        .into_iter()
        .next();
    match conn {
        Some((id, tx)) => {
            queued.sent_on = Some(id);
            match tx.try_send(Command::Send(queued.node.clone())) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(command)) => {
                    tokio::spawn(async move { tx.send(command).await });
                }
                Err(_) => queued.sent_on = None,
            }
        }
        None => bump(
            &sim.stats.messages_queued,
            u64::from(queued.class == "message"),
        ),
    }
    let queue = registry
        .queues
        .entry((number.to_owned(), device))
        .or_default();
    if queue.len() >= MAX_QUEUED {
        queue.pop_front();
    }
    queue.push_back(queued);
}

/// At most this many stanzas wait for one device; the oldest go first.
const MAX_QUEUED: usize = 10_000;

/// The devices of an account: the phone and its companions, or a contact's one.
pub(crate) fn devices_of(sim: &Sim, number: &str) -> Vec<u32> {
    let registry = sim.registry();
    if let Some(phone) = registry.phones.get(number) {
        return std::iter::once(0)
            .chain(phone.devices.keys().copied())
            .collect();
    }
    if registry.contacts.contains_key(number) {
        return vec![0];
    }
    Vec::new()
}

/// A device's prekey bundle, handing out one of its one-time prekeys.
pub(crate) fn bundle_of(sim: &Sim, number: &str, device: u32) -> Option<Bundle> {
    let mut registry = sim.registry();
    if let Some(contact) = registry.contacts.get_mut(number) {
        return (device == 0).then(|| contact.bundle());
    }
    let phone = registry.phones.get_mut(number)?;
    if device == 0 {
        let primary = &phone.primary;
        return Some(Bundle::primary(
            primary.registration_id,
            crate::key32(phone.identity.public_key.public_key_bytes())?,
            (
                primary.signed_prekey_id,
                crate::key32(primary.signed_prekey.public_key.public_key_bytes())?,
                primary.signature.clone(),
            ),
            None,
        ));
    }
    let record = phone.devices.get_mut(&device)?;
    let prekey = record.prekeys.pop_first();
    Some(Bundle::registered(&record.companion, prekey))
}

/// A contact's sealed message for one device of `to`: into another contact's task,
/// accepted for a phone, or queued for a companion.
pub(crate) fn message_from_contact(
    sim: &Sim,
    from: &str,
    to: &str,
    device: u32,
    id: &str,
    enc: Node,
    stanza: Node,
) {
    bump(&sim.stats.messages_routed, 1);
    let incoming = Incoming {
        sender: from.to_owned(),
        device: 0,
        id: id.to_owned(),
        t: crate::unix_secs(),
        enc,
    };
    if contact::tell(sim, to, ContactCommand::Incoming(incoming)) || device == 0 {
        return;
    }
    deliver(
        sim,
        &mut sim.registry(),
        to,
        device,
        Queued::message(id.to_owned(), stanza),
    );
}

/// A contact's receipt for one device's message(s).
pub(crate) fn deliver_from_contact(sim: &Sim, to: &str, device: u32, receipt: Queued) {
    bump(&sim.stats.receipts_routed, 1);
    let command = ContactCommand::Receipt {
        from: attr(&receipt.node, "from").unwrap_or_default(),
        ids: ids_of(&receipt.node),
        kind: receipt.kind.clone(),
    };
    if contact::tell(sim, to, command) || device == 0 {
        return;
    }
    deliver(sim, &mut sim.registry(), to, device, receipt);
}

/// The id of a receipt and those of its `<list><item id/></list>`.
pub(crate) fn ids_of(node: &Node) -> Vec<String> {
    attr(node, "id")
        .into_iter()
        .chain(
            node.get_optional_child("list")
                .into_iter()
                .flat_map(|l| l.get_children_by_tag("item"))
                .filter_map(|item| attr(item, "id")),
        )
        .collect()
}

fn device_jid(number: &str, device: u32, server: &str) -> String {
    if device == 0 {
        format!("{number}@{server}")
    } else {
        format!("{number}:{device}@{server}")
    }
}

/// A `<message>` from a logged-in device: the answer to send back (an ack, or a nack
/// with an error code), the message routed to every recipient device.
pub(crate) fn on_message(conn: &Connection, node: &Node) -> Node {
    let id = attr(node, "id").unwrap_or_default();
    let to = attr(node, "to").unwrap_or_default();
    let ack = |error: Option<u16>| {
        let mut ack = NodeBuilder::new("ack").attrs([
            ("class", "message".to_owned()),
            ("id", id.clone()),
            ("from", to.clone()),
            ("t", crate::unix_secs().to_string()),
        ]);
        if let Some(code) = error {
            ack = ack.attr("error", code.to_string());
        }
        ack.build()
    };
    let Session::Device { phone, device } = &conn.session else {
        return ack(Some(401));
    };
    let sim = &conn.sim;
    let mut registry = sim.registry();
    let Some((to_number, _)) = to.parse::<Jid>().ok().and_then(|j| registry.resolve(&j)) else {
        return ack(Some(404));
    };
    if let Some(code) = registry.nack_faults.remove(&to_number) {
        return ack(Some(code));
    }
    // A resend answering a retry receipt carries the same id, with a count.
    let retry = node
        .get_optional_child("enc")
        .is_some_and(|enc| attr(enc, "count").is_some());
    if !retry
        && !registry
            .seen
            .insert((format!("{phone}:{device}"), id.clone()))
    {
        bump(&sim.stats.messages_deduped, 1);
        return ack(None);
    }
    // Each recipient device's `<enc>`: from `<participants>`, or the message's own.
    let mut targets: Vec<(String, u32, Node)> = Vec::new();
    for to_node in node
        .get_optional_child("participants")
        .into_iter()
        .flat_map(|p| p.get_children_by_tag("to"))
    {
        let target = attr(to_node, "jid")
            .and_then(|j| j.parse::<Jid>().ok())
            .and_then(|j| registry.resolve(&j));
        if let (Some((number, device)), Some(enc)) = (target, to_node.get_optional_child("enc")) {
            targets.push((number, device, enc.clone()));
        }
    }
    if let Some(enc) = node.get_optional_child("enc") {
        let device = to.parse::<Jid>().map_or(0, |j| u32::from(j.device));
        targets.push((to_number.clone(), device, enc.clone()));
    }
    let identity = node.get_optional_child("device-identity").cloned();
    let kind = attr(node, "type").unwrap_or_else(|| "text".to_owned());
    let t = crate::unix_secs();
    let sender_lid = registry.lid_of(phone).unwrap_or_default().to_owned();
    for (number, target_device, enc) in targets {
        bump(&sim.stats.messages_routed, 1);
        if registry.contacts.contains_key(&number) {
            let incoming = Incoming {
                sender: phone.clone(),
                device: *device,
                id: id.clone(),
                t,
                enc,
            };
            if let Some(c) = registry.contacts.get(&number) {
                let _ = c.tx.send(ContactCommand::Incoming(incoming));
            }
            continue;
        }
        let known = registry
            .phones
            .get(&number)
            .is_some_and(|p| p.devices.contains_key(&target_device));
        if target_device == 0 || !known || (number == *phone && target_device == *device) {
            // The phone takes its copy; a device the account does not have gets none.
            continue;
        }
        let mut attrs = vec![
            ("from", device_jid(phone, *device, "s.whatsapp.net")),
            ("id", id.clone()),
            ("t", t.to_string()),
            ("type", kind.clone()),
        ];
        if number == *phone {
            attrs.push(("recipient", to.clone()));
        } else {
            attrs.push(("notify", crate::phone::push_name(phone)));
            attrs.push(("sender_lid", device_jid(&sender_lid, *device, "lid")));
        }
        let pkmsg = attr(&enc, "type").as_deref() == Some("pkmsg");
        let children = std::iter::once(enc).chain(identity.clone().filter(|_| pkmsg));
        let stanza = NodeBuilder::new("message")
            .attrs(attrs)
            .children(children)
            .build();
        deliver(
            sim,
            &mut registry,
            &number,
            target_device,
            Queued::message(id.clone(), stanza),
        );
    }
    ack(None)
}

/// Whose a device's receipt is: handled here (routed to a contact or another
/// account), or about the phone's own messages to the device.
pub(crate) enum ReceiptFor {
    Routed,
    Phone,
}

/// A `<receipt>` from a logged-in device: what it covers leaves the device's queue,
/// and the receipt goes on to the sender of those messages.
pub(crate) fn on_receipt(conn: &Connection, node: &Node) -> ReceiptFor {
    let Session::Device { phone, device } = &conn.session else {
        return ReceiptFor::Routed;
    };
    let sim = &conn.sim;
    let ids = ids_of(node);
    let kind = attr(node, "type");
    let mut registry = sim.registry();
    if kind.as_deref() != Some("retry") {
        if let Some(queue) = registry.queues.get_mut(&(phone.clone(), *device)) {
            queue.retain(|q| !(q.class == "message" && ids.contains(&q.id)));
        }
    }
    let Some((to, to_device)) = attr(node, "to")
        .and_then(|j| j.parse::<Jid>().ok())
        .and_then(|j| registry.resolve(&j))
    else {
        // No addressee the service knows: only the phone's own messages are left.
        return ReceiptFor::Phone;
    };
    if to == *phone {
        return ReceiptFor::Phone;
    }
    let from = device_jid(phone, *device, "s.whatsapp.net");
    if let Some(c) = registry.contacts.get(&to) {
        bump(&sim.stats.receipts_routed, 1);
        let command = match kind.as_deref() {
            Some("retry") => ContactCommand::Retry {
                sender: phone.clone(),
                device: *device,
                receipt: node.clone(),
            },
            _ => ContactCommand::Receipt {
                from,
                ids,
                kind: kind.clone(),
            },
        };
        let _ = c.tx.send(command);
        return ReceiptFor::Routed;
    }
    // Another linked account: its companions get it, or the one device it names.
    let devices: Vec<u32> = registry
        .phones
        .get(&to)
        .map(|p| p.devices.keys().copied().collect())
        .unwrap_or_default();
    let mut forwarded = NodeBuilder::new("receipt").attrs([
        ("from", from),
        ("id", ids.first().cloned().unwrap_or_default()),
        ("t", crate::unix_secs().to_string()),
    ]);
    if let Some(kind) = &kind {
        forwarded = forwarded.attr("type", kind.clone());
    }
    let forwarded = forwarded
        .children(node.children().map(<[Node]>::to_vec).unwrap_or_default())
        .build();
    bump(&sim.stats.receipts_routed, 1);
    for d in devices
        .into_iter()
        .filter(|&d| to_device == 0 || d == to_device)
    {
        let queued = Queued::receipt(ids[0].clone(), kind.clone(), forwarded.clone());
        deliver(sim, &mut registry, &to, d, queued);
    }
    ReceiptFor::Routed
}

/// `<ack class=C id [type]>` from a device: that stanza leaves its queue.
pub(crate) fn on_ack(conn: &Connection, node: &Node) {
    let Session::Device { phone, device } = &conn.session else {
        return;
    };
    let (Some(class), Some(id)) = (attr(node, "class"), attr(node, "id")) else {
        return;
    };
    let kind = attr(node, "type");
    let mut registry = conn.sim.registry();
    if let Some(queue) = registry.queues.get_mut(&(phone.clone(), *device)) {
        queue.retain(|q| {
            let same = q.class == class
                && q.id == id
                && (q.class != "receipt"
                    || q.kind.as_deref().unwrap_or("delivery")
                        == kind.as_deref().unwrap_or("delivery"));
            !same
        });
    }
}

/// `<chatstate to><composing/>|<paused/></chatstate>`: a contact notes it.
pub(crate) fn on_chatstate(conn: &Connection, node: &Node) {
    let Session::Device { phone, .. } = &conn.session else {
        return;
    };
    let to = attr(node, "to").and_then(|j| j.parse::<Jid>().ok());
    let Some((to, _)) = to.and_then(|j| conn.sim.registry().resolve(&j)) else {
        return;
    };
    if let Some(state) = crate::stanza::first_child(node) {
        let command = ContactCommand::Chatstate {
            from: phone.clone(),
            state: state.tag.to_string(),
        };
        contact::tell(&conn.sim, &to, command);
    }
}

/// Everything queued for this device that this connection has not sent yet, marked
/// `offline`, in order; the queue keeps them until the device says it has them.
pub(crate) fn take_offline(sim: &Sim, phone: &str, device: u32, conn: ConnId) -> Vec<Node> {
    let mut registry = sim.registry();
    let Some(queue) = registry.queues.get_mut(&(phone.to_owned(), device)) else {
        return Vec::new();
    };
    let mut nodes = Vec::new();
    for queued in queue.iter_mut().filter(|q| q.sent_on != Some(conn)) {
        if queued.sent_on.is_some() && queued.class == "message" {
            bump(&sim.stats.messages_redelivered, 1);
        }
        queued.sent_on = Some(conn);
        let mut node = queued.node.clone();
        node.attrs.insert("offline", "1");
        nodes.push(node);
    }
    nodes
}
