//! The account's device list as the service publishes it: in `usync` answers (with the
//! account's LID), in the signed key-index list, and in the `account_sync` notification
//! the account's devices receive at login and whenever the list changes.

use std::sync::Arc;

use buffa::Message as _;
use wacore_binary::Node;
use wacore_binary::builder::NodeBuilder;
use waproto::whatsapp::{self as wa, ADVEncryptionType};

use crate::conn::{Connection, Session};
use crate::registry::{Command, Phone, Registry};
use crate::sim::Sim;
use crate::stanza::{attr, fresh_id, iq_error, iq_result};

/// The prefix the account key signs a key-index list under, after the device-identity
/// prefixes (6,0 and 6,1). Neither client checks this signature today.
const ADV_KEY_INDEX_LIST_PREFIX: [u8; 2] = [6, 2];

/// The account's devices: the phone (device 0) and each companion, whose key index is
/// its device id (the index the phone signed into its identity at pairing).
fn entries(account: &Phone) -> impl Iterator<Item = (u32, Option<u32>)> + '_ {
    std::iter::once((0, None)).chain(account.devices.keys().map(|&d| (d, Some(d))))
}

/// `ADVSignedKeyIndexList`: which key indexes are valid, signed by the account key.
/// The current index is the highest ever given, so a removed device's index is not
/// mistaken for one newer than the list.
pub(crate) fn key_index_list(account: &Phone) -> Vec<u8> {
    let details = wa::ADVKeyIndexList {
        raw_id: Some(account.adv_raw_id),
        timestamp: Some(account.devices_changed),
        current_index: Some(account.highest_index()),
        valid_indexes: account.devices.keys().copied().collect(),
        account_type: Some(ADVEncryptionType::E2EE),
    }
    .encode_to_vec();
    let signature = account
        .identity
        .private_key
        .calculate_signature(
            &[&ADV_KEY_INDEX_LIST_PREFIX[..], &details].concat(),
            &mut rand::rng(),
        )
        .expect("the account key signs");
    wa::ADVSignedKeyIndexList {
        details: Some(details),
        account_signature: Some(signature.to_vec()),
        account_signature_key: Some(account.identity.public_key.public_key_bytes().to_vec()),
    }
    .encode_to_vec()
}

fn key_index_node(account: &Phone) -> Node {
    NodeBuilder::new("key-index-list")
        .attr("ts", account.devices_changed.to_string())
        .bytes(account.signed_key_index.clone())
        .build()
}

/// At most this many users in one `usync` query.
const MAX_USYNC_USERS: usize = 1000;

/// `<notification type="account_sync">` from the account itself, listing its devices;
/// at login it also carries the account's push name (WhatsApp's phone shares the name
/// through app state; this attribute is the short way, which whatsapp-rust reads).
pub(crate) fn account_sync(phone: &str, account: &Phone, push_name: Option<&str>) -> Node {
    let devices = entries(account).map(|(device, key_index)| {
        let jid = if device == 0 {
            format!("{phone}@s.whatsapp.net")
        } else {
            format!("{phone}:{device}@s.whatsapp.net")
        };
        let mut node = NodeBuilder::new("device").attr("jid", jid);
        if let Some(index) = key_index {
            node = node.attr("key-index", index.to_string());
        }
        node.build()
    });
    let mut attrs = vec![
        ("from", format!("{phone}@s.whatsapp.net")),
        ("type", "account_sync".to_owned()),
        ("id", fresh_id()),
        ("t", crate::unix_secs().to_string()),
    ];
    if let Some(name) = push_name {
        attrs.push(("pushname", name.to_owned()));
    }
    NodeBuilder::new("notification")
        .attrs(attrs)
        .children([NodeBuilder::new("devices")
            .children(devices.chain([key_index_node(account)]))
            .build()])
        .build()
}

/// Tells every connected device of `phone` that the account's device list changed.
pub(crate) fn announce(sim: &Arc<Sim>, phone: &str) {
    let registry = sim.registry();
    let Some(account) = registry.phones.get(phone) else {
        return;
    };
    for (_, tx) in registry.device_conns(phone, None) {
        let _ = tx.try_send(Command::Send(account_sync(phone, account, None)));
    }
}

/// `usync` queries, for the protocols a device asks at login, before it sends and to
/// learn whether numbers are on WhatsApp: `devices` (the device list and its signed
/// key-index list; a contact has device 0 only), `lid` and `contact` (`in` for a number
/// on WhatsApp, `out` for one that is not). Users the query names by a jid that is no
/// account are left out of the answer.
pub(crate) fn usync(conn: &Connection, iq: &Node) -> Node {
    if !matches!(conn.session, Session::Device { .. }) {
        return iq_error(iq, 401, "not-authorized");
    }
    let Some(query) = iq.get_optional_child("usync") else {
        return iq_error(iq, 400, "bad-request");
    };
    let asks = |protocol: &str| {
        query
            .get_optional_child("query")
            .and_then(|q| q.get_optional_child(protocol))
            .is_some()
    };
    let (devices, lid, contact) = (asks("devices"), asks("lid"), asks("contact"));
    let asked = query
        .get_optional_child("list")
        .map_or(0, |list| list.get_children_by_tag("user").count());
    if asked > MAX_USYNC_USERS {
        return iq_error(iq, 400, "bad-request");
    }
    let registry = conn.sim.registry();
    let users = query
        .get_optional_child("list")
        .into_iter()
        .flat_map(|list| list.get_children_by_tag("user"))
        .filter_map(|user| usync_user(&registry, user, devices, lid, contact))
        .collect::<Vec<_>>();
    drop(registry);
    let mut answer = NodeBuilder::new("usync");
    for name in ["sid", "mode", "context", "index", "last"] {
        if let Some(value) = attr(query, name) {
            answer = answer.attr(name, value);
        }
    }
    iq_result(iq)
        .children([answer
            .children([NodeBuilder::new("list").children(users).build()])
            .build()])
        .build()
}

/// One `<user>` of a usync answer.
fn usync_user(
    registry: &Registry,
    user: &Node,
    devices: bool,
    lid: bool,
    contact: bool,
) -> Option<Node> {
    let by_number = user
        .get_optional_child("contact")
        .and_then(crate::stanza::text)
        .map(|t| t.trim_start_matches('+').to_owned());
    let (asked, number) = match (attr(user, "jid"), by_number) {
        (Some(jid), _) => {
            let number = registry.resolve(&jid.parse().ok()?).map(|(n, _)| n);
            (jid, number)
        }
        (None, Some(number)) => {
            let known = registry.is_registered(&number).then(|| number.clone());
            (format!("{number}@s.whatsapp.net"), known)
        }
        (None, None) => return None,
    };
    let mut answers = Vec::new();
    let Some(number) = number else {
        if !contact {
            return None;
        }
        let digits = asked.split('@').next().unwrap_or_default();
        answers.push(
            NodeBuilder::new("contact")
                .attr("type", "out")
                .string_content(format!("+{digits}"))
                .build(),
        );
        return Some(
            NodeBuilder::new("user")
                .attr("jid", asked)
                .children(answers)
                .build(),
        );
    };
    if contact {
        answers.push(
            NodeBuilder::new("contact")
                .attr("type", "in")
                .string_content(format!("+{number}"))
                .build(),
        );
    }
    let account = registry.phones.get(&number);
    if devices {
        let list: Vec<Node> = match account {
            Some(account) => entries(account)
                .map(|(device, key_index)| {
                    let mut node = NodeBuilder::new("device").attr("id", device.to_string());
                    if let Some(index) = key_index {
                        node = node.attr("key-index", index.to_string());
                    }
                    node.build()
                })
                .collect(),
            None => vec![NodeBuilder::new("device").attr("id", "0").build()],
        };
        let mut children = vec![NodeBuilder::new("device-list").children(list).build()];
        children.extend(account.map(key_index_node));
        answers.push(NodeBuilder::new("devices").children(children).build());
    }
    if lid {
        answers.push(
            NodeBuilder::new("lid")
                .attr("val", format!("{}@lid", registry.lid_of(&number)?))
                .build(),
        );
    }
    Some(
        NodeBuilder::new("user")
            .attr("jid", asked)
            .children(answers)
            .build(),
    )
}
