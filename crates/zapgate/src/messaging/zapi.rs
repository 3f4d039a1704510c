//! The bodies of Z-API's message webhooks, field for field (its timestamp field is
//! spelt `momment`).

use serde_json::{Value, json};

use crate::store::{Status, WebhookEvent, WebhookKind};

/// Z-API's error texts for a message that was not sent.
pub(crate) mod errors {
    pub(crate) const NOT_ON_WHATSAPP: &str = "Phone number does not exist";
    pub(crate) const TIMEOUT: &str = "Timeout on send message";
    pub(crate) const FAILED: &str = "Error on send message";
    pub(crate) const NOT_ALLOWED: &str = "Whatsapp did not allow sending this message";
    pub(crate) const REJECTED: &str = "Whatsapp rejected sending this message";
    /// The number was unlinked before the message could leave: it never will.
    pub(crate) const UNLINKED: &str =
        "Message has not been sent because the instance was disconnected";
}

/// The error a DeliveryCallback reports for WhatsApp's refusal code of a message.
pub(crate) fn refusal(code: &str) -> &'static str {
    match code {
        "404" => errors::NOT_ON_WHATSAPP,
        "463" | "479" => errors::NOT_ALLOWED,
        "400" | "406" | "421" => errors::REJECTED,
        _ => errors::FAILED,
    }
}

/// An event written now (its retry window counts from now, whenever WhatsApp says the
/// thing happened: receipts drained after a long time offline are still delivered).
pub(crate) fn event(instance_id: &str, kind: WebhookKind, body: Value) -> WebhookEvent {
    WebhookEvent {
        event_id: crate::random_hex(16),
        instance_id: instance_id.to_owned(),
        kind,
        body: body.to_string(),
        created_at: crate::unix_millis(),
    }
}

/// `DeliveryCallback`: WhatsApp took the message (or, with `error`, it was not sent).
pub(crate) fn delivery(
    instance_id: &str,
    phone: &str,
    zaap_id: &str,
    message_id: &str,
    error: Option<&str>,
    at: i64,
) -> WebhookEvent {
    let mut body = json!({
        "phone": phone,
        "zaapId": zaap_id,
        "messageId": message_id,
        "instanceId": instance_id,
        "momment": at,
        "type": "DeliveryCallback",
    });
    if let Some(error) = error {
        body["error"] = json!(error);
    }
    event(instance_id, WebhookKind::Delivery, body)
}

pub(crate) fn status_name(status: Status) -> &'static str {
    match status {
        Status::Sent => "SENT",
        Status::Received => "RECEIVED",
        Status::Read => "READ",
        Status::Played => "PLAYED",
    }
}

/// `MessageStatusCallback` for the messages `ids` sent to `phone`.
pub(crate) fn status(
    instance_id: &str,
    status: Status,
    ids: &[String],
    phone: &str,
    at: i64,
) -> WebhookEvent {
    let body = json!({
        "instanceId": instance_id,
        "status": status_name(status),
        "ids": ids,
        "momment": at,
        "phoneDevice": 0,
        "phone": phone,
        "type": "MessageStatusCallback",
        "isGroup": false,
    });
    event(instance_id, WebhookKind::MessageStatus, body)
}

/// A message received, as its `ReceivedCallback` tells it.
pub(crate) struct Received<'a> {
    pub(crate) instance_id: &'a str,
    /// The linked number.
    pub(crate) connected_phone: &'a str,
    pub(crate) message_id: &'a str,
    /// The contact's number, or its `...@lid` id when no number is known.
    pub(crate) phone: &'a str,
    pub(crate) lid: Option<&'a str>,
    pub(crate) from_me: bool,
    pub(crate) from_api: bool,
    /// The message's own time (unix milliseconds).
    pub(crate) sent_at: i64,
    pub(crate) push_name: &'a str,
    /// `None`: not decrypted yet ("waiting for this message").
    pub(crate) text: Option<&'a str>,
    pub(crate) is_edit: bool,
    pub(crate) reply_to: Option<&'a str>,
}

impl Received<'_> {
    pub(crate) fn body(&self) -> Value {
        let name = (!self.push_name.is_empty()).then_some(self.push_name);
        let mut body = json!({
            "isStatusReply": false,
            "senderLid": self.lid,
            "chatLid": self.lid,
            "connectedPhone": self.connected_phone,
            "waitingMessage": self.text.is_none(),
            "isEdit": self.is_edit,
            "isGroup": false,
            "isNewsletter": false,
            "instanceId": self.instance_id,
            "messageId": self.message_id,
            "phone": self.phone,
            "fromMe": self.from_me,
            "fromApi": self.from_api,
            "momment": self.sent_at,
            "status": if self.from_me { "SENT" } else { "RECEIVED" },
            "chatName": name,
            "senderPhoto": null,
            "senderName": name,
            "participantPhone": null,
            "participantLid": null,
            "photo": null,
            "broadcast": false,
            "forwarded": false,
            "type": "ReceivedCallback",
        });
        if let Some(text) = self.text {
            body["text"] = json!({ "message": text });
        }
        if let Some(reply_to) = self.reply_to {
            body["referenceMessageId"] = json!(reply_to);
        }
        body
    }

    pub(crate) fn event(&self) -> WebhookEvent {
        event(self.instance_id, WebhookKind::Received, self.body())
    }
}
