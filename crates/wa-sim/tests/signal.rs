//! The phone and the service as Signal peers of the unmodified whatsapp-rust client:
//! the account's device list, prekey bundles between devices of one account, and a
//! message the device could not decrypt, asked for again and sent again.

mod common;

use common::Harness;
use serde_json::json;
use wa_sim::Config;
use whatsapp_rust::NodeBuilder;
use whatsapp_rust::wacore::request::InfoQuery;
use whatsapp_rust::wacore_binary::{Jid, NodeContent};

const PHONE: &str = "5511977770001";

fn jid(s: &str) -> Jid {
    s.parse().unwrap()
}

/// Waits until wa-sim holds `n` one-time prekeys for `device_jid`.
async fn prekeys_reach(h: &Harness, device_jid: &str, n: u64) {
    h.device_until(device_jid, |d| d["preKeys"] == json!(n))
        .await;
}

#[tokio::test]
async fn devices_list_an_account_and_open_sessions_from_fetched_bundles() {
    const OTHER: &str = "5511977770002";
    let h = Harness::start().await;
    let first = h.linked_companion(&h.store("first"), PHONE).await;
    let second = h.linked_companion(&h.store("second"), PHONE).await;
    let other = h.linked_companion(&h.store("other"), OTHER).await;
    let first_jid = format!("{PHONE}:1@s.whatsapp.net");
    let second_jid = format!("{PHONE}:2@s.whatsapp.net");
    prekeys_reach(&h, &second_jid, 812).await;

    // usync: another account's devices, which only the service can tell: the phone
    // (device 0) and its companion.
    let listed = first
        .client
        .signal()
        .get_user_devices(&[jid(&format!("{OTHER}@s.whatsapp.net"))])
        .await
        .expect("usync answers");
    let mut devices: Vec<u16> = listed.iter().map(|j| j.device).collect();
    devices.sort_unstable();
    assert_eq!(devices, vec![0, 1], "{listed:?}");

    // A session with the other companion of the account, from the bundle the service
    // hands out (its device identity, signed by the phone and the device, verifies):
    // what it encrypts, that companion decrypts with its own keys.
    assert!(
        first
            .client
            .signal()
            .session_info(&jid(&second_jid))
            .await
            .unwrap()
            .is_none()
    );
    first
        .client
        .signal()
        .assert_sessions(&[jid(&second_jid)])
        .await
        .expect("a session opens from the fetched bundle");
    // One of its one-time prekeys was handed out, and only once.
    prekeys_reach(&h, &second_jid, 811).await;
    let (kind, sealed) = first
        .client
        .signal()
        .encrypt_message(&jid(&second_jid), b"from the first companion")
        .await
        .expect("a session exists");
    let opened = second
        .client
        .signal()
        .decrypt_message(&jid(&first_jid), kind, &sealed)
        .await
        .expect("the other companion decrypts it");
    assert_eq!(opened, b"from the first companion");

    // A device the account does not have: the service answers 406 for it (asked
    // directly, since the client takes the refusal quietly), and no session opens.
    let missing = jid(&format!("{PHONE}:9@s.whatsapp.net"));
    let ask = NodeBuilder::new("key")
        .children([NodeBuilder::new("user")
            .attr("jid", missing.to_string())
            .build()])
        .build();
    let answer = first
        .client
        .send_iq(InfoQuery::get(
            "encrypt",
            jid("s.whatsapp.net"),
            Some(NodeContent::Nodes(vec![ask])),
        ))
        .await
        .expect("the service answers")
        .to_owned_node();
    let error = answer
        .get_optional_child_by_tag(&["list", "user", "error"])
        .expect("an error for the unknown device");
    assert_eq!(
        error.attrs.get("code").map(|v| v.as_str().into_owned()),
        Some("406".to_owned()),
        "{answer:?}"
    );
    first
        .client
        .signal()
        .assert_sessions(std::slice::from_ref(&missing))
        .await
        .expect("the client takes a refused device quietly");
    assert!(
        first
            .client
            .signal()
            .session_info(&missing)
            .await
            .unwrap()
            .is_none()
    );

    for companion in [first, second, other] {
        companion.stop().await;
    }
}

#[tokio::test]
async fn a_message_the_device_cannot_decrypt_is_asked_for_again_and_sent_again() {
    let h = Harness::with_config(Config {
        garble_peer_messages: 1,
        ..Config::default()
    })
    .await;
    let store = h.store("garbled");
    let companion = h.linked_companion(&store, PHONE).await;
    let stats = h.stats_until(|s| s["resentMessages"] == json!(1)).await;
    assert_eq!(stats["retryReceipts"], json!(1), "{stats}");
    // The welcome's two messages, then the key share again.
    assert_eq!(stats["peerMessages"], json!(3), "{stats}");
    companion.stop().await;
    // The key share the device could not read the first time is the one it kept.
    assert_eq!(
        common::kept_sync_key_len(&store).await,
        Some(6),
        "the resent key is stored"
    );
}
