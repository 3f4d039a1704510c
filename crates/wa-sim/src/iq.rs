//! Answers to the iqs a companion sends. Every get or set gets an answer: while one is
//! pending the client stops pinging, and silence makes it reconnect.

use wacore_binary::Node;
use wacore_binary::builder::NodeBuilder;

use crate::conn::{Connection, Session};
use crate::phone;
use crate::stanza::{attr, first_child, iq_error, iq_result, offline_done};

pub(crate) fn answer(conn: &Connection, iq: &Node) -> Vec<Node> {
    let xmlns = attr(iq, "xmlns");
    let child = first_child(iq);
    match (xmlns.as_deref(), child) {
        // Going active: answer, send what waited for the device (marked offline),
        // say where that backlog ends (the client holds every send until it knows),
        // and share the account's push name. A device that knows it logs in without
        // waiting for the first app-state sync (the name would otherwise come from
        // there).
        (Some("passive"), _) => {
            let mut replies = vec![iq_result(iq).build()];
            if let Session::Device { phone, device } = &conn.session {
                let backlog = crate::routing::take_offline(&conn.sim, phone, *device, conn.id);
                let count = backlog.len();
                replies.extend(backlog);
                replies.push(offline_done(count));
                if let Some(account) = conn.sim.registry().phones.get(phone) {
                    let name = phone::push_name(phone);
                    replies.push(crate::devices::account_sync(phone, account, Some(&name)));
                }
            }
            replies
        }
        (Some("usync"), _) => vec![crate::devices::usync(conn, iq)],
        (Some("w:sync:app:state"), _) => vec![app_state(iq)],
        (Some("abt"), Some(child)) if child.tag == "props" => vec![ab_props(iq)],
        (Some("privacy"), Some(child))
            if child.tag == "privacy" && attr(iq, "type").as_deref() == Some("get") =>
        {
            vec![privacy_settings(iq)]
        }
        (Some("encrypt"), Some(child)) if child.tag == "count" => {
            vec![crate::prekeys::count(conn, iq)]
        }
        (Some("encrypt"), Some(child)) if child.tag == "digest" => {
            vec![crate::prekeys::digest(conn, iq)]
        }
        (Some("encrypt"), Some(child)) if child.tag == "key" => {
            vec![crate::prekeys::bundles(conn, iq, child)]
        }
        (Some("encrypt"), _)
            if attr(iq, "type").as_deref() == Some("set")
                && (iq.get_optional_child("list").is_some()
                    || iq.get_optional_child("rotate").is_some()) =>
        {
            vec![crate::prekeys::upload(conn, iq)]
        }
        (Some("md"), Some(child)) if child.tag == "remove-companion-device" => {
            vec![remove_companion_device(conn, iq, child)]
        }
        (Some("md"), Some(child)) if child.tag == "link_code_companion_reg" => {
            vec![link_code(conn, iq, child)]
        }
        _ => vec![iq_result(iq).build()],
    }
}

/// Every requested collection exists at version 0 with nothing in it.
fn app_state(iq: &Node) -> Node {
    let collections = iq
        .get_optional_child("sync")
        .into_iter()
        .flat_map(|sync| sync.get_children_by_tag("collection"))
        .filter_map(|c| attr(c, "name"))
        .map(|name| {
            NodeBuilder::new("collection")
                .attrs([("name", name), ("version", "0".to_owned())])
                .build()
        });
    iq_result(iq)
        .children([NodeBuilder::new("sync").children(collections).build()])
        .build()
}

/// No A/B experiments: the props list is empty, to be fetched again in a day.
fn ab_props(iq: &Node) -> Node {
    let props = NodeBuilder::new("props")
        .attrs([
            ("protocol", "1"),
            ("ab_key", "wa-sim"),
            ("hash", "0"),
            ("refresh", "86400"),
        ])
        .build();
    iq_result(iq).children([props]).build()
}

/// A new account's privacy settings, as WhatsApp's defaults are.
fn privacy_settings(iq: &Node) -> Node {
    let categories = [
        ("last", "all"),
        ("online", "all"),
        ("profile", "all"),
        ("status", "contacts"),
        ("readreceipts", "all"),
        ("groupadd", "all"),
        ("calladd", "all"),
    ]
    .map(|(name, value)| {
        NodeBuilder::new("category")
            .attrs([("name", name), ("value", value)])
            .build()
    });
    iq_result(iq)
        .children([NodeBuilder::new("privacy").children(categories).build()])
        .build()
}

/// Client logout: a device may remove itself and nothing else.
fn remove_companion_device(conn: &Connection, iq: &Node, child: &Node) -> Node {
    let Session::Device { phone, device } = &conn.session else {
        return iq_error(iq, 401, "not-authorized");
    };
    let own = attr(child, "jid")
        .and_then(|jid| jid.parse::<wacore_binary::Jid>().ok())
        .is_some_and(|jid| jid.user.as_str() == phone.as_str() && u32::from(jid.device) == *device);
    if !own {
        return iq_error(iq, 403, "forbidden");
    }
    conn.sim.remove_own_device(phone, *device);
    iq_result(iq).build()
}

fn link_code(conn: &Connection, iq: &Node, child: &Node) -> Node {
    if !matches!(conn.session, Session::Linking) {
        return iq_error(iq, 400, "bad-request");
    }
    let outcome = match attr(child, "stage").as_deref() {
        Some("companion_hello") => {
            crate::sim::bump(&conn.sim.stats.code_requests, 1);
            phone::companion_hello(&conn.sim, conn.id, child).map(|pairing_ref| {
                NodeBuilder::new("link_code_companion_reg")
                    .children([NodeBuilder::new("link_code_pairing_ref")
                        .bytes(pairing_ref)
                        .build()])
                    .build()
            })
        }
        Some("companion_finish") => phone::companion_finish(&conn.sim, conn.id, child)
            .map(|()| NodeBuilder::new("link_code_companion_reg").build()),
        _ => Err((400, "bad-request")),
    };
    match outcome {
        Ok(reply) => iq_result(iq).children([reply]).build(),
        Err((code, text)) => iq_error(iq, code, text),
    }
}
