//! What the client reports about messages: received ones, recorded (with their
//! ReceivedCallback) before WhatsApp hears they arrived; acks of ours, handed to the
//! sender waiting for them; receipts, moving our messages' status.

use std::sync::Arc;

use whatsapp_rust::client::Client;
use whatsapp_rust::proto_helpers::MessageExt as _;
use whatsapp_rust::types::events::{Event, EventKind, InboundMessage};
use whatsapp_rust::waproto::whatsapp as wa;
use whatsapp_rust::{InboundDurabilityHook, Jid};

use super::zapi::{self, Received};
use super::{Hub, Told};
use crate::store::{Inbound, Status, StoreError};

/// The client events messaging acts on.
pub(crate) const MESSAGE_EVENTS: &[EventKind] = &[
    EventKind::ServerAck,
    EventKind::Receipt,
    EventKind::UndecryptableMessage,
];

/// Records an instance's received messages before the client acknowledges them: a
/// crash before the commit leaves them unacknowledged, and WhatsApp sends them again.
pub(crate) struct Hook {
    pub(crate) hub: Arc<Hub>,
    pub(crate) instance: String,
}

#[whatsapp_rust::async_trait]
impl InboundDurabilityHook for Hook {
    async fn on_messages(
        &self,
        client: Arc<Client>,
        batch: &[InboundMessage],
    ) -> anyhow::Result<()> {
        let mut rows = Vec::with_capacity(batch.len());
        for item in batch {
            if let Some(row) = self.row(&client, item).await? {
                rows.push(row);
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let new = self.hub.store.record_inbound(&rows).await?;
        if new.contains(&true) {
            self.hub.webhooks_due.notify_one();
            // A message recorded before (a redelivery) was announced then.
            for (row, _) in rows.iter().zip(&new).filter(|(_, new)| **new) {
                if let Some(event) = &row.event {
                    self.hub.note(Told::Received, event);
                }
            }
        }
        self.auto_read(client, &rows);
        Ok(())
    }
}

impl Hook {
    /// The row (and ReceivedCallback) of a text message in a chat with one person;
    /// anything else (protocol messages, groups, media for now) is not recorded. An
    /// error leaves the batch unacknowledged: WhatsApp sends it again.
    async fn row(
        &self,
        client: &Client,
        item: &InboundMessage,
    ) -> Result<Option<Inbound>, StoreError> {
        let info = &item.info;
        let source = &info.source;
        if source.is_group || !is_person(&source.chat) {
            return Ok(None);
        }
        let base = item.message.get_base_message();
        let (text, is_edit, shown_id) = match edited(base) {
            Some((original, text)) => (text, true, original),
            None => match item.message.text_content() {
                Some(text) => (text.to_owned(), false, info.id.to_string()),
                None => return Ok(None),
            },
        };
        let reply_to = base
            .extended_text_message
            .as_option()
            .and_then(|m| m.context_info.as_option())
            .and_then(|c| c.stanza_id.clone());
        let from_me = source.is_from_me;
        let from_api = from_me
            && self
                .hub
                .store
                .outbound_by_id(&self.instance, &info.id)
                .await?
                .is_some();
        // The other person: the chat, as their number when known.
        let chat = source
            .recipient
            .as_ref()
            .filter(|_| from_me)
            .unwrap_or(&source.chat);
        let (phone, lid) = person(client, chat, source.sender_alt.as_ref()).await;
        let own = client.pn().map(|j| j.user.to_string()).unwrap_or_default();
        let received = Received {
            instance_id: &self.instance,
            connected_phone: &own,
            message_id: &shown_id,
            phone: &phone,
            lid: lid.as_deref(),
            from_me,
            from_api,
            sent_at: info.timestamp.timestamp_millis(),
            push_name: if from_me { "" } else { &info.push_name },
            text: Some(&text),
            is_edit,
            reply_to: reply_to.as_deref(),
        };
        // Messages this number sent elsewhere are told only with notifySentByMe.
        let notify = !from_me
            || (self.hub.store.instance(&self.instance).await?)
                .is_some_and(|r| r.webhooks.notify_sent_by_me);
        Ok(Some(Inbound {
            instance_id: self.instance.clone(),
            chat: source.chat.to_non_ad().to_string(),
            sender: source.sender.to_non_ad().to_string(),
            message_id: info.id.to_string(),
            waiting: false,
            text: Some(text.clone()),
            from_me,
            sent_at: received.sent_at,
            event: notify.then(|| received.event()),
        }))
    }

    /// Marks the messages read, if the instance reads automatically: after the
    /// commit, never inside the hook (the client holds the sender's lock there).
    fn auto_read(&self, client: Arc<Client>, rows: &[Inbound]) {
        let incoming: Vec<(String, String)> = rows
            .iter()
            .filter(|r| !r.from_me)
            .map(|r| (r.chat.clone(), r.message_id.clone()))
            .collect();
        if incoming.is_empty() {
            return;
        }
        let (store, instance) = (self.hub.store.clone(), self.instance.clone());
        tokio::spawn(async move {
            if !matches!(store.message_settings(&instance).await, Ok((true, _))) {
                return;
            }
            for (chat, id) in incoming {
                let Ok(chat) = chat.parse::<Jid>() else {
                    continue;
                };
                if let Err(e) = client.mark_as_read(&chat, None, &[id.as_str()]).await {
                    tracing::info!(instance.id = %instance, error = %e, "could not mark a message read");
                }
            }
        });
    }
}

/// An edit of an earlier message: the edited message's id and its new text.
fn edited(message: &wa::Message) -> Option<(String, String)> {
    let protocol = message.protocol_message.as_option()?;
    let edit = wa::message::protocol_message::Type::MESSAGE_EDIT;
    if protocol.r#type != Some(edit) {
        return None;
    }
    let original = protocol.key.as_option()?.id.clone()?;
    let text = protocol
        .edited_message
        .as_option()?
        .text_content()?
        .to_owned();
    Some((original, text))
}

/// A chat with one person (by number or by LID).
fn is_person(jid: &Jid) -> bool {
    jid.is_pn() || jid.is_lid()
}

/// A person's number (digits, or their `...@lid` when no number is known) and LID.
async fn person(client: &Client, chat: &Jid, alt: Option<&Jid>) -> (String, Option<String>) {
    let (pn, lid) = match (chat.is_lid(), alt) {
        (true, Some(alt)) if alt.is_pn() => {
            (Some(alt.user.to_string()), Some(chat.user.to_string()))
        }
        (false, Some(alt)) if alt.is_lid() => {
            (Some(chat.user.to_string()), Some(alt.user.to_string()))
        }
        (true, _) => (None, Some(chat.user.to_string())),
        (false, _) => (Some(chat.user.to_string()), None),
    };
    let (pn, lid) = match (pn, lid) {
        (Some(pn), Some(lid)) => (Some(pn), Some(lid)),
        (pn, lid) => match client.get_lid_pn_entry(chat).await {
            Ok(Some(entry)) => (
                pn.or(Some(entry.phone_number.to_string())),
                lid.or(Some(entry.lid.to_string())),
            ),
            _ => (pn, lid),
        },
    };
    let lid = lid.map(|l| format!("{l}@lid"));
    match pn {
        Some(pn) => (pn, lid),
        None => (lid.clone().unwrap_or_default(), lid),
    }
}

impl Hub {
    /// A client event about messages, for `instance`.
    pub(crate) async fn on_event(&self, instance: &str, event: &Event, client: &Client) {
        match event {
            Event::ServerAck(ack) if ack.class.as_deref() == Some("message") => {
                if let Some(lane) = self.lane(instance) {
                    lane.acked(&ack.id, ack.error.clone());
                }
            }
            Event::Receipt(receipt) if !receipt.source.is_from_me => {
                use whatsapp_rust::types::presence::ReceiptType;
                let status = match receipt.r#type {
                    // `inactive`: delivered to a device whose user is not online (a
                    // client that does not mark itself available, such as Baileys').
                    ReceiptType::Delivered | ReceiptType::Inactive => Status::Received,
                    ReceiptType::Read => Status::Read,
                    ReceiptType::Played => Status::Played,
                    _ => return,
                };
                let ids: Vec<String> = receipt
                    .message_ids
                    .iter()
                    .map(|id| id.to_string())
                    .collect();
                let at = receipt.timestamp.timestamp_millis();
                let event = |status: Status, ids: &[String], phone: &str| {
                    zapi::status(instance, status, ids, phone, at)
                };
                match self
                    .store
                    .message_status(instance, &ids, status, at, &event)
                    .await
                {
                    Ok(written) if written.is_empty() => {}
                    Ok(written) => {
                        self.webhooks_due.notify_one();
                        for (moved, event) in &written {
                            self.note(Told::Status(*moved), event);
                        }
                    }
                    Err(e) => {
                        tracing::error!(instance.id = %instance, error = %e, "could not record a receipt")
                    }
                }
            }
            Event::UndecryptableMessage(failed) => {
                let info = &failed.info;
                let source = &info.source;
                if source.is_group || !is_person(&source.chat) || source.is_from_me {
                    return;
                }
                let (phone, lid) = person(client, &source.chat, source.sender_alt.as_ref()).await;
                let own = client.pn().map(|j| j.user.to_string()).unwrap_or_default();
                let received = Received {
                    instance_id: instance,
                    connected_phone: &own,
                    message_id: &info.id,
                    phone: &phone,
                    lid: lid.as_deref(),
                    from_me: false,
                    from_api: false,
                    sent_at: info.timestamp.timestamp_millis(),
                    push_name: &info.push_name,
                    text: None,
                    is_edit: false,
                    reply_to: None,
                };
                let row = Inbound {
                    instance_id: instance.to_owned(),
                    chat: source.chat.to_non_ad().to_string(),
                    sender: source.sender.to_non_ad().to_string(),
                    message_id: info.id.to_string(),
                    waiting: true,
                    text: None,
                    from_me: false,
                    sent_at: received.sent_at,
                    event: Some(received.event()),
                };
                match self.store.record_inbound(std::slice::from_ref(&row)).await {
                    Ok(new) if new != [true] => {}
                    Ok(_) => {
                        self.webhooks_due.notify_one();
                        if let Some(event) = &row.event {
                            self.note(Told::Received, event);
                        }
                    }
                    Err(e) => {
                        tracing::error!(instance.id = %instance, error = %e, "could not record a message waiting to be decrypted")
                    }
                }
            }
            _ => {}
        }
    }
}
