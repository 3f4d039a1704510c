//! Reading client stanzas and building the service's own.

use wacore_binary::builder::NodeBuilder;
use wacore_binary::{Node, NodeContent, SERVER_JID};

pub(crate) fn attr(node: &Node, key: &str) -> Option<String> {
    node.attrs.get(key).map(|v| v.as_str().into_owned())
}

pub(crate) fn bytes(node: &Node) -> Option<&[u8]> {
    match &node.content {
        Some(NodeContent::Bytes(b)) => Some(b),
        _ => None,
    }
}

/// An element's text, whether it came as a string or as bytes.
pub(crate) fn text(node: &Node) -> Option<String> {
    match &node.content {
        Some(NodeContent::Bytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(NodeContent::String(s)) => Some(s.to_string()),
        _ => None,
    }
}

pub(crate) fn child_bytes<'a>(node: &'a Node, tag: &str) -> Option<&'a [u8]> {
    node.get_optional_child(tag).and_then(bytes)
}

/// The first child element, whose tag says what an iq is about.
pub(crate) fn first_child(node: &Node) -> Option<&Node> {
    node.children().and_then(|c| c.first())
}

pub(crate) fn iq_result(request: &Node) -> NodeBuilder {
    NodeBuilder::new("iq").attrs([
        ("type", "result".to_owned()),
        ("id", attr(request, "id").unwrap_or_default()),
        (
            "from",
            attr(request, "to").unwrap_or_else(|| SERVER_JID.to_owned()),
        ),
    ])
}

pub(crate) fn iq_error(request: &Node, code: u16, text: &str) -> Node {
    NodeBuilder::new("iq")
        .attrs([
            ("type", "error".to_owned()),
            ("id", attr(request, "id").unwrap_or_default()),
            ("from", SERVER_JID.to_owned()),
        ])
        .children([NodeBuilder::new("error")
            .attrs([("code", code.to_string()), ("text", text.to_owned())])
            .build()])
        .build()
}

/// A server-initiated iq; `id` is ours, so the answer can be matched to it.
pub(crate) fn server_iq(id: &str, xmlns: &'static str, child: Node) -> Node {
    NodeBuilder::new("iq")
        .attrs([
            ("from", SERVER_JID.to_owned()),
            ("type", "set".to_owned()),
            ("id", id.to_owned()),
            ("xmlns", xmlns.to_owned()),
            ("t", crate::unix_secs().to_string()),
        ])
        .children([child])
        .build()
}

pub(crate) fn pair_device(id: &str, refs: &[String]) -> Node {
    let refs = refs
        .iter()
        .map(|r| NodeBuilder::new("ref").bytes(r.as_bytes().to_vec()).build());
    server_iq(
        id,
        "md",
        NodeBuilder::new("pair-device").children(refs).build(),
    )
}

pub(crate) fn stream_error_code(code: u16) -> Node {
    NodeBuilder::new("stream:error")
        .attr("code", code.to_string())
        .build()
}

pub(crate) fn stream_conflict(code: Option<u16>, kind: &str) -> Node {
    let mut node = NodeBuilder::new("stream:error");
    if let Some(code) = code {
        node = node.attr("code", code.to_string());
    }
    node.children([NodeBuilder::new("conflict")
        .attr("type", kind.to_owned())
        .build()])
        .build()
}

pub(crate) fn success(lid: &str, device: u32) -> Node {
    NodeBuilder::new("success")
        .attrs([
            ("t", crate::unix_secs().to_string()),
            ("lid", format!("{lid}:{device}@lid")),
        ])
        .build()
}

pub(crate) fn failure(reason: u16) -> Node {
    NodeBuilder::new("failure")
        .attr("reason", reason.to_string())
        .build()
}

/// The end of the offline backlog, `count` stanzas long.
pub(crate) fn offline_done(count: usize) -> Node {
    NodeBuilder::new("ib")
        .attr("from", SERVER_JID)
        .children([NodeBuilder::new("offline")
            .attr("count", count.to_string())
            .build()])
        .build()
}

/// The service's ack of a device's receipt.
pub(crate) fn receipt_ack(receipt: &Node) -> Node {
    let mut ack = NodeBuilder::new("ack").attrs([
        ("class", "receipt".to_owned()),
        ("id", attr(receipt, "id").unwrap_or_default()),
    ]);
    if let Some(to) = attr(receipt, "to") {
        ack = ack.attr("from", to);
    }
    if let Some(kind) = attr(receipt, "type") {
        ack = ack.attr("type", kind);
    }
    ack.build()
}

/// A fresh id for an iq the service sends.
pub(crate) fn fresh_id() -> String {
    use rand::RngExt as _;
    format!("sim-{:016x}", rand::rng().random::<u64>())
}
