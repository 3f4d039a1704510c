//! What a contact reads out of a decrypted message: its text, the message it replies
//! to, and the message it edits.

use waproto::whatsapp as wa;

#[derive(Debug, PartialEq)]
pub(super) struct Text {
    pub(super) text: String,
    pub(super) reply_to: Option<String>,
    pub(super) edit_of: Option<String>,
}

impl Text {
    /// A plain or extended text, or an edit of one; None for anything else.
    pub(super) fn of(message: &wa::Message) -> Option<Self> {
        let edit = message
            .protocol_message
            .as_option()
            .filter(|p| p.r#type == Some(wa::message::protocol_message::Type::MESSAGE_EDIT));
        if let Some(edit) = edit {
            let edited = Self::of(edit.edited_message.as_option()?)?;
            return Some(Self {
                edit_of: edit.key.as_option().and_then(|k| k.id.clone()),
                ..edited
            });
        }
        let extended = message.extended_text_message.as_option();
        let text = message
            .conversation
            .clone()
            .or_else(|| extended.and_then(|e| e.text.clone()))?;
        let reply_to = extended
            .and_then(|e| e.context_info.as_option())
            .and_then(|c| c.stanza_id.clone());
        Some(Self {
            text,
            reply_to,
            edit_of: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wa::message::{ExtendedTextMessage, ProtocolMessage, protocol_message};

    fn reply(text: &str, to: &str) -> wa::Message {
        wa::Message {
            extended_text_message: buffa::MessageField::some(ExtendedTextMessage {
                text: Some(text.to_owned()),
                context_info: buffa::MessageField::some(wa::ContextInfo {
                    stanza_id: Some(to.to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn texts_replies_and_edits_are_read_and_anything_else_is_not() {
        let plain = wa::Message {
            conversation: Some("hi".to_owned()),
            ..Default::default()
        };
        assert_eq!(
            Text::of(&plain),
            Some(Text {
                text: "hi".into(),
                reply_to: None,
                edit_of: None
            })
        );
        assert_eq!(
            Text::of(&reply("yes", "3EB0A")),
            Some(Text {
                text: "yes".into(),
                reply_to: Some("3EB0A".into()),
                edit_of: None
            })
        );
        let edit = wa::Message {
            protocol_message: buffa::MessageField::some(ProtocolMessage {
                r#type: Some(protocol_message::Type::MESSAGE_EDIT),
                key: buffa::MessageField::some(wa::MessageKey {
                    id: Some("3EB0B".to_owned()),
                    ..Default::default()
                }),
                edited_message: buffa::MessageField::some(plain.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            Text::of(&edit),
            Some(Text {
                text: "hi".into(),
                reply_to: None,
                edit_of: Some("3EB0B".into())
            })
        );
        assert_eq!(Text::of(&wa::Message::default()), None);
    }
}
